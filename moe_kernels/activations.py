"""The activations between the two expert GEMMs: ``act``/``act_grad`` for the Triton kernels'
epilogues, and the PyTorch path's (also the shared experts').

Elementwise ones keep the width; gated ones (GLUs: SwiGLU, GEGLU) map a ``[..., 2H]`` projection,
gate half first, to ``act(gate) * up``. A gated activation gets its own autograd function:
slicing the projection into halves would make autograd build two zero-filled ``[..., 2H]``
gradients in the backward pass; its backward writes the two halves once, with ``torch.cat``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# The gated activations and the elementwise activation of their gate half.
GATED = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}
ELEMENTWISE = ("gelu", "gelu_tanh", "silu", "relu", "relu2")  # relu2: relu(x) ** 2 (Primer)
ACTIVATIONS = (*GATED, *ELEMENTWISE)


def split_activation(activation: str) -> tuple[str, bool]:
    """``(elementwise activation, gated)``: ``"swiglu"`` is SiLU gating a second projection."""
    return (GATED[activation], True) if activation in GATED else (activation, False)


def projection_width(activation: str, hidden: int) -> int:
    """The first projection's width for ``hidden`` features after the activation."""
    return 2 * hidden if activation in GATED else hidden


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
    """``ACTIVATION`` (one of ``ELEMENTWISE``) of ``x``, elementwise."""
    if ACTIVATION == "silu":
        return x * tl.sigmoid(x)
    elif ACTIVATION == "gelu":
        cdf, _ = _normal_cdf_pdf(x)
        return x * cdf
    elif ACTIVATION == "gelu_tanh":
        arg, _ = _gelu_tanh_arg(x)
        return x * tl.sigmoid(arg)
    elif ACTIVATION == "relu2":
        r = tl.maximum(x, 0.0)
        return r * r
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
    elif ACTIVATION == "relu2":
        return 2.0 * tl.maximum(x, 0.0)
    else:
        return (x > 0.0).to(tl.float32)


def _elementwise(activation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return {
        "gelu": F.gelu,
        "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"),
        "silu": F.silu,
        "relu": F.relu,
        "relu2": lambda a: F.relu(a).square(),
    }[activation]


def _elementwise_backward(activation: str, preact: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad * act'(preact)``, with the backward ops autograd itself runs (plain ops:
    ``torch.func.vjp`` would fail on a gradient that arrives as a tensor subclass, as the
    expert-parallel exchange's does)."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, preact, 0)
    if activation == "relu2":
        return grad * 2 * F.relu(preact)
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, preact)
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return torch.ops.aten.gelu_backward(grad, preact, approximate=approximate)


class GatedFunction(torch.autograd.Function):
    """``a [..., 2H] -> act(a[..., :H]) * a[..., H:]`` for the elementwise ``act`` named."""

    @staticmethod
    def forward(a: torch.Tensor, elementwise: str) -> torch.Tensor:
        return _gated(a, elementwise)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.elementwise = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return gated_backward(ctx.elementwise, *ctx.saved_tensors, grad), None


def _gated(a: torch.Tensor, elementwise: str) -> torch.Tensor:
    gate, up = a.chunk(2, dim=-1)
    return _elementwise(elementwise)(gate) * up


def gated_backward(elementwise: str, a: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``d loss / d a`` of ``act(gate) * up`` for ``a = [gate, up]``."""
    gate, up = a.chunk(2, dim=-1)
    if elementwise == "silu":  # silu'(g) = s + silu(g) * (1 - s), sharing s = sigmoid(g)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        return torch.cat([grad * up * (sig + silu * (1 - sig)), grad * silu], dim=-1)
    return torch.cat([_elementwise_backward(elementwise, gate, grad * up), grad * _elementwise(elementwise)(gate)], -1)


def gated(a: torch.Tensor, elementwise: str) -> torch.Tensor:
    """``a [..., 2H] -> act(a[..., :H]) * a[..., H:]``, differentiable."""
    # A function, not ``GatedFunction.apply`` itself: stored on a module, the bound ``apply``
    # is traced into by torch.compile 2.11, which then fails on ``setup_context``. Without a
    # graph to record, ``apply`` would only add host time (binding its signature: 50 us on a 2-core CPU).
    if torch.is_grad_enabled() and a.requires_grad:
        return GatedFunction.apply(a, elementwise)
    return _gated(a, elementwise)


def activation_fn(activation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map from the first projection to the second's input (a gated one halves the width)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation in GATED:
        return functools.partial(gated, elementwise=GATED[activation])
    return _elementwise(activation)


def activation_grad(activation: str, preact: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``d loss / d preact`` from ``grad = d loss / d activation(preact)``."""
    if activation in GATED:
        return gated_backward(GATED[activation], preact, grad)
    return _elementwise_backward(activation, preact, grad)
