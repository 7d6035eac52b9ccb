"""The ``--precision`` of the trainer and the sampler: how the model's arithmetic runs.

- ``"tf32"`` (default): fp32 values, matrix products on tensor cores in TF32, as DiT's and
  DiT-MoE's own scripts run (``allow_tf32 = True``). The Triton GEMMs follow the same switch.
- ``"fp32"``: IEEE fp32 matrix products: exact, and much slower on a GPU.
- ``"bf16"``: the model under bf16 autocast; the weights stay fp32.

On a CPU ``"tf32"`` and ``"fp32"`` are the same.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

PRECISIONS = ("tf32", "fp32", "bf16")


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--precision`` flag, the same for every command that runs the model."""
    parser.add_argument("--precision", choices=PRECISIONS, default="tf32",
                        help="tf32: fp32 with TF32 matmuls on GPU, as DiT runs; fp32: IEEE matmuls; bf16: autocast")


def use_precision(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Set torch's fp32 matmul mode for ``precision`` and return the context to run the model in."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
