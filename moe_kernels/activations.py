"""The activations between the two expert GEMMs: ``act``/``act_grad`` for the Triton kernels'
epilogues, and the PyTorch path's (also the shared experts').

SwiGLU gets its own autograd function: slicing one ``[..., 2H]`` projection into gate and up
halves would make autograd build two zero-filled ``[..., 2H]`` gradients in the backward pass;
its backward writes the two halves once, with ``torch.cat``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

ACTIVATIONS = ("swiglu", "gelu", "gelu_tanh", "silu", "relu")


@triton.jit
def _normal_cdf_pdf(x):
    """The standard normal's distribution and density at ``x``: GELU is ``x * cdf``, its
    derivative ``cdf + x * pdf``."""
    return 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)), 0.3989422804014327 * tl.exp(-0.5 * x * x)


@triton.jit
def _gelu_tanh_arg(x):
    """``2 sqrt(2 / pi) (x + 0.044715 x^3)`` and its derivative: GELU-tanh is ``x * sigmoid`` of
    it (``0.5 (1 + tanh(z)) == sigmoid(2 z)``)."""
    scale = 1.5957691216057308  # 2 sqrt(2 / pi)
    cubic = 0.044715
    return scale * (x + cubic * x * x * x), scale * (1.0 + 3.0 * cubic * x * x)


@triton.jit
def act(x, ACTIVATION: tl.constexpr):
    """``ACTIVATION`` (``"silu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"relu"``) of ``x``, elementwise."""
    if ACTIVATION == "silu":
        return x * tl.sigmoid(x)
    elif ACTIVATION == "gelu":
        cdf, _ = _normal_cdf_pdf(x)
        return x * cdf
    elif ACTIVATION == "gelu_tanh":
        arg, _ = _gelu_tanh_arg(x)
        return x * tl.sigmoid(arg)
    else:
        return tl.maximum(x, 0.0)


@triton.jit
def act_grad(x, ACTIVATION: tl.constexpr):
    """The derivative of ``act(x, ACTIVATION)``, elementwise."""
    if ACTIVATION == "silu":
        s = tl.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    elif ACTIVATION == "gelu":
        cdf, pdf = _normal_cdf_pdf(x)
        return cdf + x * pdf
    elif ACTIVATION == "gelu_tanh":
        arg, darg = _gelu_tanh_arg(x)
        s = tl.sigmoid(arg)
        return s + x * s * (1.0 - s) * darg
    else:
        return (x > 0.0).to(tl.float32)


class SwiGLUFunction(torch.autograd.Function):
    """``a [..., 2H] -> silu(a[..., :H]) * a[..., H:]``."""

    @staticmethod
    def forward(a: torch.Tensor) -> torch.Tensor:
        return _swiglu(a)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return swiglu_backward(*ctx.saved_tensors, grad)


def _swiglu(a: torch.Tensor) -> torch.Tensor:
    gate, up = a.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_backward(a: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``d loss / d a`` of ``silu(gate) * up`` for ``a = [gate, up]``."""
    gate, up = a.chunk(2, dim=-1)
    # silu'(g) = s + silu(g) * (1 - s) with s = sigmoid(g).
    sig = torch.sigmoid(gate)
    silu = gate * sig
    return torch.cat([grad * up * (sig + silu * (1 - sig)), grad * silu], dim=-1)


def swiglu(a: torch.Tensor) -> torch.Tensor:
    """``a [..., 2H] -> silu(a[..., :H]) * a[..., H:]``, differentiable."""
    # A function, not ``SwiGLUFunction.apply`` itself: stored on a module, the bound ``apply``
    # is traced into by torch.compile 2.11, which then fails on ``setup_context``. Without a
    # graph to record, ``apply`` would only add host time (binding its signature: 50 us on a 2-core CPU).
    if torch.is_grad_enabled() and a.requires_grad:
        return SwiGLUFunction.apply(a)
    return _swiglu(a)


def activation_fn(activation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map from the first projection to the second's input (``"swiglu"`` halves the width)."""
    functions = {
        "swiglu": swiglu,
        "gelu": F.gelu,
        "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"),
        "silu": F.silu,
        "relu": F.relu,
    }
    if activation not in functions:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return functions[activation]


def activation_grad(activation: str, preact: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``d loss / d preact`` from ``grad = d loss / d activation(preact)``, with each derivative
    written once: SwiGLU's own, and for the others the backward ops autograd itself runs (plain
    ops: ``torch.func.vjp`` would fail on a gradient that arrives as a tensor subclass, as the
    expert-parallel exchange's does)."""
    if activation == "swiglu":
        return swiglu_backward(preact, grad)
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, preact, 0)
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, preact)
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return torch.ops.aten.gelu_backward(grad, preact, approximate=approximate)
