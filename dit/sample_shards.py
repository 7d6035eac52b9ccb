"""Samples written in shards, then merged into one ``.npz``: what lets ``dit.sample`` split a run
over processes, resume it after an interruption, and write 50,000 images without holding them.

A run writing ``OUT.npz`` keeps its work in ``OUT.npz.parts/``: ``settings.json`` (everything
that decides the samples: checkpoint, seed, guidance, sampler, steps, batch...) and one
``shard-<first>-<end>.npz`` per range of ``shard_size`` sample indices, each written atomically
once its samples are done. Shard ``k`` belongs to process ``k % world_size``, and its samples are
drawn in batches that depend on the shard alone, so the samples do not depend on the number of
processes. Running the same command again skips the shards already written; different settings
are refused rather than mixed. When every shard is there, the main process streams them into
``OUT.npz`` (``arr_0`` uint8 ``[N, H, W, C]``, ``arr_1`` int64 labels; as ``np.savez`` writes,
so ``np.load`` and ADM's evaluator read it) and removes the parts.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .files import replace_atomically


class ShardedRun:
    def __init__(self, out: Path, num_samples: int, shard_size: int, settings: dict):
        self.out, self.num_samples, self.shard_size = out, num_samples, shard_size
        self.parts = out.with_name(out.name + ".parts")
        self.settings = {**settings, "num_samples": num_samples, "shard_size": shard_size}

    def ranges(self) -> list[tuple[int, int]]:
        """``(first, end)`` sample indices of every shard."""
        size = self.shard_size
        return [(first, min(first + size, self.num_samples)) for first in range(0, self.num_samples, size)]

    def mine(self, rank: int, world_size: int) -> list[tuple[int, int]]:
        """The shards of process ``rank``."""
        return self.ranges()[rank::world_size]

    def shard_path(self, first: int, end: int) -> Path:
        return self.parts / f"shard-{first:09d}-{end:09d}.npz"

    def prepare(self) -> None:
        """Create the parts directory with its settings, or check that an interrupted run's are
        these (``ValueError`` naming the differences); run by the main process alone."""
        self.parts.mkdir(exist_ok=True)
        path = self.parts / "settings.json"
        if path.exists():
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                raise ValueError(f"{path} is unreadable ({error}); remove {self.parts} to start over") from error
            differ = sorted(
                key for key in self.settings.keys() | saved.keys() if saved.get(key) != self.settings.get(key)
            )
            if differ:
                shown = ", ".join(f"{key} {saved.get(key)!r} -> {self.settings.get(key)!r}" for key in differ)
                raise ValueError(
                    f"{self.parts} holds part of a run with other settings ({shown}); run it with its own settings "
                    f"to finish it, or remove {self.parts} to start over"
                )
        else:
            replace_atomically(lambda tmp: tmp.write_text(json.dumps(self.settings, indent=2)), path)

    def done(self, first: int, end: int, warn: Callable[[str], None]) -> bool:
        """Whether the shard is written and whole; a damaged one is removed (to be drawn again)."""
        path = self.shard_path(first, end)
        if not path.exists():
            return False
        try:
            with np.load(path, allow_pickle=False) as data:
                if len(data["arr_0"]) == len(data["arr_1"]) == end - first:
                    return True
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            warn(f"shard {path} is damaged ({error}); drawing its samples again")
        path.unlink()
        return False

    def write(self, first: int, end: int, images: np.ndarray, labels: np.ndarray) -> None:
        replace_atomically(lambda tmp: np.savez(tmp, arr_0=images, arr_1=labels), self.shard_path(first, end))

    def merge(self) -> None:
        """Stream every shard, in order, into ``OUT.npz`` (atomically), then remove the parts."""
        ranges = self.ranges()
        missing = [str(self.shard_path(*r)) for r in ranges if not self.shard_path(*r).exists()]
        if missing:
            raise ValueError(f"cannot merge: {len(missing)} shard(s) missing, e.g. {missing[0]}")
        with np.load(self.shard_path(*ranges[0])) as data:
            image_shape = data["arr_0"].shape[1:]

        def write(tmp: Path) -> None:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                for key, dtype, shape in (("arr_0", np.uint8, image_shape), ("arr_1", np.int64, ())):
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False}
                    with archive.open(f"{key}.npy", "w", force_zip64=True) as entry:
                        np.lib.format.write_array_header_2_0(entry, {**header, "shape": (self.num_samples, *shape)})
                        for r in ranges:
                            with np.load(self.shard_path(*r)) as data:
                                entry.write(np.ascontiguousarray(data[key], dtype=dtype).tobytes())

        replace_atomically(write, self.out)
        shutil.rmtree(self.parts)
