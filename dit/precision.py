"""The ``--precision`` of the trainer and the sampler: how the model's arithmetic runs.

- ``"tf32"`` (default): fp32 values, matrix products on tensor cores in TF32, as DiT's and
  DiT-MoE's own scripts run (``allow_tf32 = True``). The Triton GEMMs follow the same switch.
- ``"fp32"``: IEEE fp32 matrix products: exact, and much slower on a GPU.
- ``"bf16"``: the model under bf16 autocast; the weights stay fp32 in training. For sampling,
  ``inference_weights`` stores them in bf16 (see there).
- ``"fp8"``: ``"bf16"`` with the routed experts' GEMMs on FP8 tensor cores (e4m3, 128x128 block
  scales for the weights, per-token groups of 128 for the activations). Training keeps the weights
  in fp32 and quantizes them on each step (``MoE.precision = "fp8"``: the forward and
  input-gradient GEMMs in FP8, the weights' gradients in bf16); sampling stores them in FP8
  (``MoE.to_fp8``). The router, attention and the shared experts stay in bf16.

On a CPU ``"tf32"`` and ``"fp32"`` are the same.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from moe_kernels import MoE

PRECISIONS = ("tf32", "fp32", "bf16", "fp8")


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--precision`` flag, the same for every command that runs the model."""
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="tf32",
        help="tf32: fp32 with TF32 matmuls on GPU, as DiT runs; fp32: IEEE matmuls; bf16: autocast; "
        "fp8: bf16 with the routed experts' GEMMs in FP8",
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


def training_precision(model: nn.Module, precision: str) -> nn.Module:
    """For training under ``"fp8"``: every MoE layer's routed experts compute in FP8 from their
    fp32 weights (``MoE.precision``); other precisions leave the model as it is. Returns ``model``."""
    _check(precision)
    if precision == "fp8":
        for module in model.modules():
            if isinstance(module, MoE):
                module.precision = "fp8"
    return model


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
