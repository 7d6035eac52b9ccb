"""Shared helpers for the kernel tests."""

from __future__ import annotations

import os

import torch

from moe_kernels.backend import IMPLEMENTATIONS

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available() else "cpu"
# The interpreter computes tl.dot on bf16 wrongly, so bf16 is tested on the GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
BACKENDS = list(IMPLEMENTATIONS)
# Routing shapes (T, E, k): T=1, k=1, k=E, E not a power of two, T not a multiple of the block.
ROUTING_SHAPES = [(1, 4, 1), (37, 8, 2), (5, 16, 16), (70, 6, 3), (64, 3, 3)]
# Against an fp64 reference; fp16 keeps about 3 significant digits through two GEMMs.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2),
}


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "") -> None:
    """Compare a result to an fp64 reference with the tolerance of the dtype it was computed in."""
    torch.testing.assert_close(
        actual.double(), expected.double(), **TOLERANCES[dtype], msg=lambda m: f"{name}: {m}" if name else m
    )


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values laid out with a non-unit last stride (a leaf if ``t`` requires grad)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t.detach()
    return wide[..., ::2].detach().requires_grad_(t.requires_grad)


def grads(out: torch.Tensor, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of ``sum(out * grad_out)`` with respect to ``inputs``."""
    return list(torch.autograd.grad((out * grad_out.to(out.dtype)).sum(), inputs))
