"""Which implementation an op runs: the Triton kernels or the PyTorch path.

``backend=None`` and ``"auto"`` pick Triton for CUDA tensors and PyTorch elsewhere;
the environment variable ``MOE_KERNELS_BACKEND`` overrides that choice.
"""

from __future__ import annotations

import os

import torch
import triton

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


# ``MOE_KERNELS_AUTOTUNE=0`` keeps one config per kernel on the GPU, the smallest: correctness
# runs then compile each kernel once instead of once per candidate.
AUTOTUNE = os.environ.get("MOE_KERNELS_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


# Bytes of shared memory one block may use on Hopper (227 KiB): the autotuner's candidates are
# pruned to those whose software pipeline fits, rather than compiled only to fail at launch.
SHARED_MEMORY_LIMIT = 232448


def pipeline_size(config: triton.Config) -> int:
    """Elements a config's software pipeline holds (its tiles times its stages): the smallest
    config is the one that fits in shared memory for every dtype."""
    m, n, k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return config.num_stages * (m * k + k * n)


def autotune_configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """The autotuner's candidates: ``gpu`` (only its smallest with ``MOE_KERNELS_AUTOTUNE=0``),
    or under the interpreter, which cannot benchmark and runs every program in Python, the single
    small ``interpreter`` config."""
    if INTERPRET:
        return [interpreter]
    return gpu if AUTOTUNE else [min(gpu, key=pipeline_size)]
