"""Checkpoints: one directory per step, written atomically.

``<run>/checkpoints/0001000/`` holds ``model.safetensors`` and ``ema.safetensors`` (weights, with
the model config as JSON metadata) and ``state.pt`` (optimizer, step, RNG states, config,
arguments). A checkpoint is first written to a hidden temporary directory, flushed to disk, then
renamed into place, so a crash mid-save leaves the previous checkpoints intact and no partial
one that ``latest`` could pick.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .models import DiT, DiTConfig, config_from_dict, config_to_dict

_STEP_DIR = re.compile(r"^\d{7}$")
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")
STATE_FILE = "state.pt"
FORMAT = "dit-moe/1"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_weights(state_dict: dict, path: Path, config: DiTConfig, extra: dict | None = None) -> None:
    """Weights as safetensors with the config (and ``extra`` strings) as metadata."""
    metadata = {"format": FORMAT, "config": json.dumps(config_to_dict(config)), **(extra or {})}
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(path), metadata=metadata)


def save_checkpoint(checkpoint_dir: Path, step: int, model: DiT, ema: DiT, state: dict) -> Path:
    """Write checkpoint ``step`` under ``checkpoint_dir``; ``state`` goes to ``state.pt``."""
    final = checkpoint_dir / f"{step:07d}"
    tmp = checkpoint_dir / f".{step:07d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model.state_dict(), tmp / "model.safetensors", model.config)
    save_weights(ema.state_dict(), tmp / "ema.safetensors", ema.config)
    torch.save({**state, "step": step, "config": config_to_dict(model.config)}, tmp / STATE_FILE)
    for name in (*WEIGHT_FILES, STATE_FILE):
        _fsync(tmp / name)
    if final.exists():  # re-saving a step: move the old copy aside first, drop it after
        old = checkpoint_dir / f".{step:07d}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync(checkpoint_dir)
    return final


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in (*WEIGHT_FILES, STATE_FILE))


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The highest-step complete checkpoint in ``checkpoint_dir``, or ``None``."""
    if not checkpoint_dir.is_dir():
        return None
    steps = [p for p in checkpoint_dir.iterdir() if _STEP_DIR.match(p.name) and is_checkpoint(p)]
    return max(steps, key=lambda p: int(p.name)) if steps else None


def load_weights(path: str | Path, which: str = "ema") -> tuple[dict, DiTConfig]:
    """Weights and config from a checkpoint directory (its ``ema`` or ``model`` weights) or
    from a single ``.safetensors`` file written by this package or by ``dit.convert``."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{which}.safetensors"
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state_dict = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"checkpoint {path} is corrupt or not a safetensors file: {error}") from error
    if "config" not in metadata:
        raise ValueError(f"checkpoint {path} carries no model config; was it written by dit.train or dit.convert?")
    return state_dict, config_from_dict(json.loads(metadata["config"]))


def load_state(checkpoint: Path) -> dict:
    """The training state (``state.pt``) of a checkpoint directory."""
    try:
        return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ValueError(f"training state {checkpoint / STATE_FILE} is corrupt or unreadable: {error}") from error


def load_into(model: torch.nn.Module, state_dict: dict, source: str | Path) -> None:
    """``model.load_state_dict`` with a clear error naming what does not match."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                parts.append(f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
        raise ValueError(f"checkpoint {source} does not match the model ({'; '.join(parts)})")
    model.load_state_dict(state_dict)


def build_from_checkpoint(path: str | Path, which: str = "ema", moe_backend: str | None = "auto") -> DiT:
    """The model a checkpoint describes, with its weights loaded."""
    state_dict, config = load_weights(path, which)
    model = DiT(config, moe_backend=moe_backend)
    load_into(model, state_dict, path)
    return model
