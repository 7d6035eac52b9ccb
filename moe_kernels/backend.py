"""Which implementation an op runs: the Triton kernels or the PyTorch path.

``backend=None`` and ``"auto"`` pick Triton for CUDA tensors and PyTorch elsewhere;
the environment variable ``MOE_KERNELS_BACKEND`` overrides that choice.
"""

from __future__ import annotations

import os

import torch

# The two implementations an op can run, and the values ``backend=`` accepts.
IMPLEMENTATIONS = ("triton", "torch")
BACKENDS = ("auto", *IMPLEMENTATIONS)

# Triton decides at decoration time whether a kernel is compiled or interpreted, so what
# matters is the setting when this package was imported, not the current environment.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op whose tensors live on ``device``."""
    if backend is None:
        backend = "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("MOE_KERNELS_BACKEND", "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(
                f"MOE_KERNELS_BACKEND must be one of {BACKENDS}, got {os.environ['MOE_KERNELS_BACKEND']!r}"
            )
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got tensors on {device}; to run the Triton kernels "
            "on the CPU, set TRITON_INTERPRET=1 before importing moe_kernels"
        )
    return backend
