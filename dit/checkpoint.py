"""Checkpoints: one directory per step, written atomically and checked on load.

``<run>/checkpoints/0001000/`` holds ``model.safetensors`` and ``ema.safetensors`` (weights, with
the model config as JSON metadata), ``state.pt`` (optimizer, step, RNG states, config,
arguments: tensors and plain Python values only, so it loads with ``weights_only=True``) and,
written last, ``manifest.json``: each file's size and SHA-256. A sharded run (``--ep``, ``--fsdp``) writes,
instead of the two weight files and the optimizer state, ``sharded/``: every process's shards of
the model, EMA and optimizer (``torch.distributed.checkpoint``), which any number of processes
can read back, resharded; ``python -m dit.checkpoint consolidate`` makes one weight file of them.

A checkpoint is written to a hidden temporary directory, flushed to disk, then renamed into
place, so a crash or a full disk mid-save leaves the previous checkpoints intact and no partial
one. Loading checks the files it reads against the manifest, so a truncated or corrupted file
is an error naming it, never a silently wrong model. ``remove_stale`` clears what a killed
process left behind.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .files import MANIFEST, check_writable, default_file_mode, fsync, is_checkpoint, replace_atomically, sha256
from .models import DiT, DiTConfig, config_from_dict, config_to_dict

_STEP_DIR = re.compile(r"^\d{7}$")
# What an interrupted save leaves: ".0001000.tmp-<pid>" (being written) and ".0001000.old-<pid>"
# (the previous copy of a step being saved again).
_LEFTOVER = re.compile(r"^\.(?P<step>\d{7})\.(?P<kind>tmp|old)-\d+$")
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")
STATE_FILE = "state.pt"
SHARDED_DIR = "sharded"
FORMAT = "dit-moe/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written, or is missing, incomplete or corrupt."""


def save_weights(state_dict: dict, path: Path, config: DiTConfig, extra: dict | None = None) -> None:
    """Weights as safetensors with the config (and ``extra`` strings) as metadata."""
    metadata = {"format": FORMAT, "config": json.dumps(config_to_dict(config)), **(extra or {})}
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(path), metadata=metadata)


def save_checkpoint(checkpoint_dir: Path, step: int, model: DiT, ema: DiT, state: dict) -> Path:
    """Write checkpoint ``step`` under ``checkpoint_dir``; ``state`` goes to ``state.pt``.

    ``state`` must hold only tensors and plain Python values (it is loaded with
    ``weights_only=True``). On any error, disk full included, the partial directory is removed,
    the checkpoints already there are untouched, and ``CheckpointError`` says what happened.
    """
    final, tmp = _paths(checkpoint_dir, step, os.getpid())
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_weights(model.state_dict(), tmp / "model.safetensors", model.config)
        save_weights(ema.state_dict(), tmp / "ema.safetensors", ema.config)
        torch.save({**state, "step": step, "config": config_to_dict(model.config)}, tmp / STATE_FILE)
        _publish(tmp, final, step, {name: _describe(tmp / name) for name in (*WEIGHT_FILES, STATE_FILE)})
    except OSError as error:
        raise _write_error(tmp, final, error) from error
    return final


def save_sharded_checkpoint(
    checkpoint_dir: Path, step: int, model: DiT, ema: DiT, optimizer: torch.optim.Optimizer, state: dict, tag: int
) -> Path:
    """Write checkpoint ``step`` from every process of a sharded run (all must call this, with
    the same ``tag``, e.g. the main process's pid): each writes its shards of the model, EMA and
    optimizer (``torch.distributed.checkpoint`` under ``sharded/``) and hashes them; the main
    process writes ``state.pt`` (``state`` plus step and config) and the manifest, then renames
    the directory into place. Atomic like ``save_checkpoint``; the directory must be shared."""
    # torch.distributed.checkpoint takes a second or more to import: only sharded runs pay it.
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    final, tmp = _paths(checkpoint_dir, step, tag)
    main = dist.get_rank() == 0
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        model_sd, optimizer_sd = get_state_dict(model, optimizer)
        sharded = {"model": model_sd, "ema": get_model_state_dict(ema), "optimizer": optimizer_sd}
        dcp.save(sharded, checkpoint_id=tmp / SHARDED_DIR)
        # Each process hashes the shards it wrote; the coordinator also wrote the metadata.
        mine = [p for p in (tmp / SHARDED_DIR).iterdir() if p.name.startswith(f"__{dist.get_rank()}_")]
        if main:
            mine += [p for p in (tmp / SHARDED_DIR).iterdir() if not p.name.startswith("__")]
        files = {f"{SHARDED_DIR}/{p.name}": _describe(p) for p in mine}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, files)
        if main:
            torch.save({**state, "step": step, "config": config_to_dict(model.config)}, tmp / STATE_FILE)
            files = {STATE_FILE: _describe(tmp / STATE_FILE)}
            for part in gathered:
                files.update(part)
            fsync(tmp / SHARDED_DIR)
            _publish(tmp, final, step, files)
        dist.barrier()
    except (OSError, CheckpointException) as error:
        # The main process created the temporary directory, so it alone removes it: a worker
        # outliving its job must not delete what a restarted job is writing or cleaning.
        raise _write_error(tmp, final, error, clean=main) from error
    return final


def _paths(checkpoint_dir: Path, step: int, tag: int) -> tuple[Path, Path]:
    """The checkpoint's final directory and the temporary one it is written to."""
    return checkpoint_dir / f"{step:07d}", checkpoint_dir / f".{step:07d}.tmp-{tag}"


def _describe(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def _publish(tmp: Path, final: Path, step: int, files: dict[str, dict]) -> None:
    """Write the manifest last, give every file the same permissions (safetensors writes its
    files for their owner alone, ``torch.save`` by the umask), flush everything, rename ``tmp``
    to ``final``."""
    (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
    mode = default_file_mode()
    for name in (*files, MANIFEST):
        os.chmod(tmp / name, mode)
        fsync(tmp / name)
    if final.exists():  # re-saving a step: move the old copy aside first, drop it after
        old = final.parent / f".{step:07d}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync(final.parent)


def _write_error(tmp: Path, final: Path, error: BaseException, clean: bool = True) -> CheckpointError:
    if clean:
        shutil.rmtree(tmp, ignore_errors=True)
    kept = latest_checkpoint(final.parent)
    return CheckpointError(
        f"could not write checkpoint {final}: {getattr(error, 'strerror', None) or error}; "
        + (f"the last checkpoint, {kept}, is intact" if kept else "no earlier checkpoint exists")
    )


def remove_stale(checkpoint_dir: Path) -> list[str]:
    """Clear what killed saves left in ``checkpoint_dir``; return a line per action taken.

    Temporary directories are deleted. A step's previous copy that was moved aside is put back
    if the save that replaced it never completed, and deleted otherwise.
    """
    actions = []
    if not checkpoint_dir.is_dir():
        return actions
    for path in sorted(checkpoint_dir.iterdir()):
        match = _LEFTOVER.match(path.name)
        if match is None or not path.is_dir():
            continue
        final = checkpoint_dir / match["step"]
        if match["kind"] == "old" and not final.exists():
            try:
                path.rename(final)
            except FileNotFoundError:  # gone meanwhile: whoever took it also handled it
                continue
            actions.append(f"restored {final} from {path.name}, left by an interrupted save")
        else:
            remove_tree(path)
            actions.append(f"removed {path}, left by an interrupted save")
    return actions


def remove_tree(path: Path, patience: float = 30.0) -> None:
    """``shutil.rmtree(path)``, tolerating what vanishes or appears under it for up to
    ``patience`` seconds (a process of a killed job still writing or cleaning up)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            if not path.exists():  # removed by someone else: the job is done all the same
                return
        except OSError as error:  # a file created in a directory being emptied
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if time.monotonic() > deadline:
            raise CheckpointError(f"could not remove {path}: files kept appearing under it for {patience:.0f} s")
        time.sleep(0.05)


def is_sharded(path: Path) -> bool:
    """Whether a checkpoint directory was written by a sharded run (``save_sharded_checkpoint``)."""
    return (path / SHARDED_DIR).is_dir()


def is_step_dir(path: Path) -> bool:
    """Whether ``path`` is meant as one checkpoint (named by its step, or complete), not a run."""
    return bool(_STEP_DIR.match(path.name)) or is_checkpoint(path)


def verify(checkpoint: Path, names: tuple[str, ...] | None = None) -> None:
    """Check a checkpoint directory against its manifest: the manifest's schema, that it lists
    exactly the files present, and the size and SHA-256 of the files ``names`` (default: all)."""
    files = read_manifest(checkpoint)
    present = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()} - {MANIFEST}
    required = (STATE_FILE, f"{SHARDED_DIR}/.metadata") if is_sharded(checkpoint) else (*WEIGHT_FILES, STATE_FILE)
    missing, unlisted = sorted({*required, *files} - present), sorted(present - set(files))
    if missing:
        raise CheckpointError(f"checkpoint {checkpoint} is incomplete: {', '.join(missing)} missing")
    if unlisted:
        raise CheckpointError(
            f"checkpoint {checkpoint} holds {', '.join(unlisted)}, which its {MANIFEST} does not list: written into "
            "it after the save, or its manifest was replaced"
        )
    for name in sorted(files) if names is None else names:
        path = checkpoint / name
        size = path.stat().st_size
        if size != files[name]["bytes"]:
            raise CheckpointError(
                f"{path} is {size} bytes, its manifest says {files[name]['bytes']}: truncated or overwritten"
            )
        if sha256(path) != files[name]["sha256"]:
            raise CheckpointError(f"{path} does not match the SHA-256 in its manifest: the file is corrupt")


def read_manifest(checkpoint: Path) -> dict[str, dict]:
    """The ``files`` of a checkpoint's manifest (name -> ``{"bytes", "sha256"}``), after checking
    that it is one: a ``CheckpointError`` says what is wrong with it otherwise."""
    path = checkpoint / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} is incomplete: it has no {MANIFEST} (its save did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"checkpoint {checkpoint}: {MANIFEST} is corrupt ({error})") from error
    except RecursionError:  # nested deeper than the parser goes: no manifest _publish writes
        raise CheckpointError(f"checkpoint {checkpoint}: {MANIFEST} is corrupt (nested too deep to read)") from None
    problem = _manifest_problem(manifest, checkpoint)
    if problem:
        raise CheckpointError(f"checkpoint {checkpoint}: {MANIFEST} is malformed: {problem}")
    return manifest["files"]


def _manifest_problem(manifest: object, checkpoint: Path) -> str | None:
    """What keeps ``manifest`` from being one that ``_publish`` writes, or ``None``."""
    if not isinstance(manifest, dict):
        return f"expected a JSON object, got {type(manifest).__name__}"
    if manifest.get("format") != FORMAT:
        return f"its format is {manifest.get('format')!r}, expected {FORMAT!r}"
    step = manifest.get("step")
    if type(step) is not int or step < 0:
        return f"its step must be an integer >= 0, got {step!r}"
    if _STEP_DIR.match(checkpoint.name) and int(checkpoint.name) != step:
        return f"it describes step {step}, but the directory is named for step {int(checkpoint.name)}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "its files must map each file name to its bytes and sha256"
    for name, entry in files.items():
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts or name == MANIFEST:
            return f"{name!r} is not the name of a file inside the checkpoint"
        if not isinstance(entry, dict) or set(entry) != {"bytes", "sha256"}:
            return f"the entry of {name} must hold exactly bytes and sha256, got {entry!r}"
        if type(entry["bytes"]) is not int or entry["bytes"] < 0:
            return f"the bytes of {name} must be an integer >= 0, got {entry['bytes']!r}"
        if not isinstance(entry["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
            return f"the sha256 of {name} must be 64 hexadecimal digits, got {entry['sha256']!r}"
    return None


def fingerprint(path: str | Path) -> str:
    """What identifies the weights at ``path``: a checkpoint directory's manifest (which holds
    every file's SHA-256) hashed, or a single file's size and modification time."""
    path = Path(path)
    if path.is_dir():
        return "manifest sha256 " + sha256(path / MANIFEST)
    stat = path.stat()
    return f"{stat.st_size} bytes, modified {stat.st_mtime_ns} ns"


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The highest-step complete checkpoint in ``checkpoint_dir``, or ``None`` (not verified)."""
    if not checkpoint_dir.is_dir():
        return None
    steps = [p for p in checkpoint_dir.iterdir() if _STEP_DIR.match(p.name) and is_checkpoint(p)]
    return max(steps, key=lambda p: int(p.name)) if steps else None


def latest_intact_checkpoint(checkpoint_dir: Path, warn: Callable[[str], None]) -> Path | None:
    """The highest-step checkpoint whose files all match its manifest; each newer one that
    does not (corrupt, or incomplete) is skipped with a ``warn`` naming it."""
    if not checkpoint_dir.is_dir():
        return None
    steps = sorted(
        (p for p in checkpoint_dir.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=lambda p: -int(p.name)
    )
    for step in steps:
        try:
            verify(step)
            checkpoint_config(step, verified=True)
        except CheckpointError as error:
            warn(f"skipping checkpoint {step}: {error}")
            continue
        return step
    return None


def load_weights(path: str | Path, which: str = "ema", verified: bool = False) -> tuple[dict, DiTConfig]:
    """Weights and config from a checkpoint directory (its ``ema`` or ``model`` weights, checked
    against the manifest unless the caller ``verified`` them already) or from a single
    ``.safetensors`` file written by this package or by ``dit.convert`` (which carries no
    manifest: safetensors checks its structure)."""
    path = Path(path)
    if path.is_dir():
        if is_sharded(path):
            return _load_sharded_weights(path, which, verified)
        if not verified:
            verify(path, (f"{which}.safetensors",))
        path = path / f"{which}.safetensors"
    config = read_config(path)
    try:
        state_dict = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file: {error}") from error
    return check_finite(state_dict, path), config


def _load_sharded_weights(checkpoint: Path, which: str, verified: bool) -> tuple[dict, DiTConfig]:
    """The full ``which`` weights of a sharded checkpoint, assembled from its shards in this process."""
    from torch.distributed.checkpoint.api import CheckpointException

    if not verified:
        verify(checkpoint)
    config = checkpoint_config(checkpoint, verified=True)
    with torch.device("meta"):
        shapes = DiT(config).state_dict()
    state_dict = {name: torch.empty(t.shape, dtype=t.dtype) for name, t in shapes.items()}
    try:
        _read_shards({which: state_dict}, checkpoint)
    except (CheckpointException, RuntimeError, ValueError) as error:
        raise CheckpointError(
            f"sharded checkpoint {checkpoint} does not hold {which} weights for its config: {error}"
        ) from error
    return check_finite(state_dict, checkpoint), config


def load_sharded(checkpoint: Path, model: DiT, ema: DiT, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint (verified) into a run's model, EMA and optimizer, resharding
    it to however the model is laid out now: any number of processes, any ``--ep``."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    model_sd, optimizer_sd = get_state_dict(model, optimizer)
    sharded = {"model": model_sd, "ema": get_model_state_dict(ema), "optimizer": optimizer_sd}
    _read_shards(sharded, checkpoint)
    set_state_dict(model, optimizer, model_state_dict=sharded["model"], optim_state_dict=sharded["optimizer"])
    set_model_state_dict(ema, sharded["ema"])


def _read_shards(state_dict: dict, checkpoint: Path) -> None:
    """``torch.distributed.checkpoint.load`` into ``state_dict``, by all processes of a run or,
    with no process group, by this one alone."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # reading alone, without a process group, is intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state_dict, checkpoint_id=checkpoint / SHARDED_DIR, no_dist=not dist.is_initialized())


def checkpoint_config(checkpoint: Path, verified: bool = False) -> DiTConfig:
    """The model config of a checkpoint directory, sharded or not."""
    if is_sharded(checkpoint):
        return stored_config(load_state(checkpoint, verified).get("config"), checkpoint)
    if not verified:
        verify(checkpoint, ("model.safetensors",))
    return read_config(checkpoint / "model.safetensors")


def read_config(path: Path) -> DiTConfig:
    """The model config in the metadata of a weights file, without reading its tensors."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file: {error}") from error
    if "config" not in metadata:
        raise CheckpointError(f"checkpoint {path} carries no model config; was it written by dit.train or dit.convert?")
    try:
        values = json.loads(metadata["config"])
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"checkpoint {path} holds a damaged model config: {error}") from None
    return stored_config(values, path)


def stored_config(values: object, where: str | Path) -> DiTConfig:
    """The model config a checkpoint stores, checked as any config is: a value of the wrong type
    or out of range makes the checkpoint damaged (``CheckpointError``), as a wrong hash does."""
    try:
        return config_from_dict(values)
    except (TypeError, ValueError, RecursionError) as error:
        raise CheckpointError(f"checkpoint {where} holds a damaged model config: {error}") from None


def check_finite(state_dict: dict[str, torch.Tensor], where: str | Path) -> dict[str, torch.Tensor]:
    """``state_dict``, after checking that no floating-point tensor holds NaN or Inf: such weights
    would sample NaN images or train from a NaN loss; ``CheckpointError`` names the first."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"checkpoint {where}: {name} holds NaN or Inf; these weights cannot be used")
    return state_dict


def load_state(checkpoint: Path, verified: bool = False) -> dict:
    """The training state (``state.pt``) of a checkpoint directory, checked against the manifest
    unless the caller ``verified`` it already.

    It is unpickled with ``weights_only=True``: a file holding anything but tensors and plain
    Python values is refused, since unpickling arbitrary objects can run arbitrary code.
    """
    if not verified:
        verify(checkpoint, (STATE_FILE,))
    path = checkpoint / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f"a reference to {found[1]}" if found else "objects other than tensors and plain Python values"
        raise CheckpointError(
            f"refusing to load {path}: it holds {what}, and unpickling such objects can run arbitrary "
            "code; a training state written by dit.train holds only tensors and plain values"
        ) from error
    except Exception as error:
        raise CheckpointError(f"training state {path} is corrupt or unreadable: {error}") from error
    kinds = {"step": int, "args": dict, "config": dict, "rng": list}
    wrong = [key for key, kind in kinds.items() if not isinstance(state, dict) or type(state.get(key)) is not kind]
    if wrong:
        raise CheckpointError(
            f"training state {path} is damaged: its {', '.join(wrong)} are missing or of the wrong type"
        )
    return state


def load_into(model: torch.nn.Module, state_dict: dict, source: str | Path) -> None:
    """``model.load_state_dict`` with a clear error naming what does not match."""
    check_matches(model.state_dict(), state_dict, source)
    model.load_state_dict(state_dict)


def check_matches(own: dict, state_dict: dict, source: str | Path) -> None:
    """Raise ``ValueError`` naming the keys of ``state_dict`` missing, unexpected or of another
    shape than in ``own`` (a model's state dict, which may live on the meta device)."""
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                parts.append(f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
        raise ValueError(f"checkpoint {source} does not match the model ({'; '.join(parts)})")


def build_from_checkpoint(path: str | Path, which: str = "ema", moe_backend: str | None = "auto") -> DiT:
    """The model a checkpoint describes, with its weights loaded."""
    state_dict, config = load_weights(path, which)
    model = DiT(config, moe_backend=moe_backend)
    load_into(model, state_dict, path)
    return model


def consolidate(checkpoint: Path, out: Path, which: str = "ema") -> Path:
    """Write the ``which`` weights of a checkpoint directory (sharded or not) as one safetensors
    file with its config, the form ``dit.sample``, ``dit.analyze`` and ``dit.evaluate`` share."""
    state_dict, config = load_weights(checkpoint, which)
    replace_atomically(lambda tmp: save_weights(state_dict, tmp, config), out)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dit.checkpoint", description="Check and convert training checkpoints."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser(
        "consolidate", help="write a checkpoint's weights (sharded or not) as one .safetensors file"
    )
    merge.add_argument("checkpoint", type=Path, help="a checkpoint directory, RUN/checkpoints/STEP")
    merge.add_argument("out", type=Path, help="the .safetensors file to write")
    merge.add_argument(
        "--which", choices=("ema", "model"), default="ema", help="the EMA weights (for sampling) or the trained ones"
    )
    check = commands.add_parser("verify", help="check every file of a checkpoint against its manifest")
    check.add_argument("checkpoint", type=Path)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if not args.checkpoint.is_dir():
            raise CheckpointError(f"checkpoint {args.checkpoint} is not a directory")
        if args.command == "verify":
            verify(args.checkpoint)
            checkpoint_config(args.checkpoint, verified=True)
            print(f"{args.checkpoint}: intact")
        else:
            out = consolidate(args.checkpoint, check_writable(args.out, "OUT"), args.which)
            print(f"wrote the {args.which} weights of {args.checkpoint} to {out}")
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error


if __name__ == "__main__":
    main()
