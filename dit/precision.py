"""The ``--precision`` of the trainer and the sampler: how the model's arithmetic runs.

- ``"tf32"`` (default): fp32 values, matrix products on tensor cores in TF32, as DiT's and
  DiT-MoE's own scripts run (``allow_tf32 = True``). The Triton GEMMs follow the same switch.
- ``"fp32"``: IEEE fp32 matrix products: exact, and much slower on a GPU.
- ``"bf16"``: the model under bf16 autocast; the weights stay fp32 in training. For sampling,
  ``inference_weights`` stores them in bf16 (see there).
- ``"fp8"`` (sampling only, so far): ``"bf16"`` with the routed experts stored in FP8 (e4m3 with
  128x128 block scales, ``MoE.to_fp8``), their GEMMs run on FP8 tensor cores.

On a CPU ``"tf32"`` and ``"fp32"`` are the same.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from moe_kernels import MoE

TRAINING_PRECISIONS = ("tf32", "fp32", "bf16")
PRECISIONS = (*TRAINING_PRECISIONS, "fp8")


def add_precision_argument(parser: argparse.ArgumentParser, inference: bool = True) -> None:
    """The ``--precision`` flag, the same for every command that runs the model (``fp8`` for
    inference only)."""
    parser.add_argument(
        "--precision",
        choices=PRECISIONS if inference else TRAINING_PRECISIONS,
        default="tf32",
        help="tf32: fp32 with TF32 matmuls on GPU, as DiT runs; fp32: IEEE matmuls; bf16: autocast"
        + ("; fp8: bf16 with the routed experts in FP8" if inference else ""),
    )


def _check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """Within the block, torch's fp32 matmuls (and so the Triton GEMMs) use TF32 unless
    ``precision`` is ``"fp32"``; torch's global switches are restored on exit. A training step's
    backward pass must run inside it too, so it wraps a whole run."""
    _check(precision)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``"bf16"``, for the forward pass only (as torch recommends); else nothing."""
    _check(precision)
    if precision in ("bf16", "fp8"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def use_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Both of the above, for inference (sampling, analysis)."""
    with matmul_precision(precision), autocast(precision, device):
        yield


def inference_weights(model: nn.Module, precision: str) -> nn.Module:
    """For sampling under ``"bf16"``: store the model's parameters in bf16, in place; under
    ``"fp8"`` the same, then the MoE layers' routed experts in FP8 (other precisions leave the
    model as it is). Returns ``model``.

    Autocast rounds each weight to bf16 wherever it is used, so the numbers hardly change (an
    embedding table, read without autocast, is rounded once too). But nothing is cast any more on
    each forward: the MoE layers cast their expert weights explicitly, and for DiT-MoE-XL/2-8E2A
    that is 0.8 GB of memory traffic per layer and step (about 5 ms per step at an H200's 4.3 TB/s,
    by that count). The weights also take half the memory. Buffers (the fixed positional embedding) stay fp32, so the
    residual stream stays fp32, as under autocast.
    """
    _check(precision)
    if precision in ("bf16", "fp8"):
        with torch.no_grad():
            for param in model.parameters():
                param.data = param.data.to(torch.bfloat16)
    if precision == "fp8":
        for module in model.modules():
            if isinstance(module, MoE):
                module.to_fp8()
    return model
