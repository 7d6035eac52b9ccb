"""The activations of the PyTorch path and of the shared experts.

SwiGLU gets its own autograd function: slicing one ``[..., 2H]`` projection into gate and up
halves would make autograd build two zero-filled ``[..., 2H]`` gradients in the backward pass.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

ACTIVATIONS = ("swiglu", "gelu", "gelu_tanh", "silu", "relu")


class SwiGLUFunction(torch.autograd.Function):
    """``a [..., 2H] -> silu(a[..., :H]) * a[..., H:]``."""

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:
        gate, up = a.chunk(2, dim=-1)
        ctx.save_for_backward(a)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (a,) = ctx.saved_tensors
        gate, up = a.chunk(2, dim=-1)
        grad_a = torch.empty_like(a)
        grad_gate, grad_up = grad_a.chunk(2, dim=-1)
        # silu'(g) = s + silu(g) * (1 - s) with s = sigmoid(g); in place, as few passes as possible.
        sig = torch.sigmoid(gate)
        silu = gate * sig
        torch.mul(grad, silu, out=grad_up)
        silu.mul_(1 - sig).add_(sig)
        torch.mul(grad, up, out=grad_gate).mul_(silu)
        return grad_a


def activation_fn(activation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map from the first projection to the second's input (``"swiglu"`` halves the width)."""
    functions = {
        "swiglu": SwiGLUFunction.apply,
        "gelu": F.gelu,
        "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"),
        "silu": F.silu,
        "relu": F.relu,
    }
    if activation not in functions:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return functions[activation]
