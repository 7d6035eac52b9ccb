"""The activations between the two expert GEMMs: ``act``/``act_grad`` for the Triton kernels'
epilogues, and the PyTorch path's (also the shared experts').

Elementwise ones keep the width; gated ones (GLUs: SwiGLU, GEGLU) map a ``[..., 2H]`` projection,
gate half first, to ``act(gate) * up``. SwiGLU takes options, written into its name
(``swiglu_activation``): ``"swiglu(limit=7.0,alpha=1.702,up_offset=1.0)"`` is

    g = min(gate, limit);  u = clamp(up, -limit, limit)
    cap(g, gate_softcap) * sigmoid(alpha * g) * (cap(u, up_softcap) + up_offset)

with ``cap(v, c) = c * tanh(v / c)`` (``v`` itself without a cap): GPT-OSS's activation;
``limit`` alone is the clamped SwiGLU of DeepSeek-V4 and GLM-5, the two caps Inkling-2's. A gated
activation gets its own autograd function:
slicing the projection into halves would make autograd build two zero-filled ``[..., 2H]``
gradients in the backward pass; its backward writes the two halves once, with ``torch.cat``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# The gated activations and the elementwise activation of their gate half.
GATED = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}
ELEMENTWISE = ("gelu", "gelu_tanh", "silu", "relu", "relu2")  # relu2: relu(x) ** 2 (Primer)
ACTIVATIONS = (*GATED, *ELEMENTWISE)


@dataclass(frozen=True)
class Glu:
    """A gated activation: ``elementwise`` on the gate half, with SwiGLU's options (see above)."""

    elementwise: str
    limit: float | None = None
    alpha: float = 1.0
    up_offset: float = 0.0
    gate_softcap: float | None = None
    up_softcap: float | None = None

    @property
    def plain(self) -> bool:
        """Whether the gate is ``act(gate)`` itself: no sigmoid scale, no cap."""
        return self.alpha == 1.0 and self.gate_softcap is None


_OPTIONS = re.compile(r"swiglu\((.*)\)")
_DEFAULTS = Glu("silu")
_POSITIVE = ("limit", "gate_softcap", "up_softcap")


def swiglu_activation(
    limit: float | None = None,
    alpha: float = 1.0,
    up_offset: float = 0.0,
    gate_softcap: float | None = None,
    up_softcap: float | None = None,
) -> str:
    """The activation name of SwiGLU with these options (``"swiglu"`` when all are defaults)."""
    options = {
        "limit": limit, "alpha": alpha, "up_offset": up_offset, "gate_softcap": gate_softcap, "up_softcap": up_softcap
    }  # fmt: skip
    given = [f"{key}={float(value)!r}" for key, value in options.items() if value != getattr(_DEFAULTS, key)]
    return f"swiglu({','.join(given)})" if given else "swiglu"


def parse_activation(activation: object) -> tuple[str, Glu | None]:
    """``(name, Glu)`` for a gated activation, ``(name, None)`` for an elementwise one;
    ``ValueError`` for anything else."""
    if not isinstance(activation, str):
        _refuse(activation)
    return _parse(activation)


@functools.cache  # every launch parses its activation: once per name is enough
def _parse(activation: str) -> tuple[str, Glu | None]:
    if activation in ACTIVATIONS:
        return activation, Glu(GATED[activation]) if activation in GATED else None
    match = _OPTIONS.fullmatch(activation)
    if match is not None:
        options = {}
        for item in filter(None, match.group(1).split(",")):
            key, _, value = item.partition("=")
            try:
                options[key.strip()] = float(value)
            except ValueError:
                break
        else:
            known = set(options) <= {"limit", "alpha", "up_offset", *_POSITIVE}
            if known and all(map(math.isfinite, options.values())):
                if all(options.get(key, 1.0) > 0 for key in _POSITIVE):
                    return "swiglu", Glu("silu", **options)
    _refuse(activation)


def _refuse(activation: object) -> NoReturn:
    raise ValueError(
        f"activation must be one of {ACTIVATIONS} or swiglu with options, as swiglu_activation(limit=7.0, "
        f"alpha=1.702, up_offset=1.0) writes it (limit and caps > 0, finite values), got {activation!r}"
    )


def split_activation(activation: str) -> tuple[str, Glu | None]:
    """``(the elementwise activation, the gate's options or None)``: ``"swiglu"`` is SiLU
    gating a second projection."""
    name, glu = parse_activation(activation)
    return (name, None) if glu is None else (glu.elementwise, glu)


def projection_width(activation: str, hidden: int) -> int:
    """The first projection's width for ``hidden`` features after the activation."""
    return hidden if parse_activation(activation)[1] is None else 2 * hidden


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


@triton.jit
def _softcap(v, CAP: tl.constexpr):
    """``CAP * tanh(v / CAP)`` and its derivative (``v`` and 1 when CAP is 0: no cap)."""
    if CAP != 0.0:
        t = 2.0 * tl.sigmoid(2.0 * v / CAP) - 1.0  # tanh, from the sigmoid every Triton has
        out = CAP * t
        slope = 1.0 - t * t
    else:
        out = v
        slope = 1.0
    return out, slope


@triton.jit
def glu(gate, up, ACTIVATION: tl.constexpr, CLAMP: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr,
        UP_OFFSET: tl.constexpr, GATE_CAP: tl.constexpr, UP_CAP: tl.constexpr):  # fmt: skip
    """A gated activation of the fp32 halves (SwiGLU's options: see the module's docstring)."""
    if CLAMP:
        gate = tl.minimum(gate, LIMIT)
        up = tl.clamp(up, -LIMIT, LIMIT)
    if ALPHA == 1.0 and GATE_CAP == 0.0:
        a = act(gate, ACTIVATION)
    else:
        linear, _ = _softcap(gate, GATE_CAP)
        a = linear * tl.sigmoid(ALPHA * gate)
    up, _ = _softcap(up, UP_CAP)
    if UP_OFFSET != 0.0:
        up = up + UP_OFFSET
    return a * up


@triton.jit
def glu_grad(grad, gate, up, ACTIVATION: tl.constexpr, CLAMP: tl.constexpr, LIMIT: tl.constexpr,
             ALPHA: tl.constexpr, UP_OFFSET: tl.constexpr, GATE_CAP: tl.constexpr, UP_CAP: tl.constexpr):  # fmt: skip
    """``(d gate, d up)`` of ``glu`` from ``grad``, its output's gradient; a clamp passes the
    gradient inside its range only (its ends included, as ``torch.clamp``)."""
    g, u = gate, up
    if CLAMP:
        g = tl.minimum(gate, LIMIT)
        u = tl.clamp(up, -LIMIT, LIMIT)
    if ALPHA == 1.0 and GATE_CAP == 0.0:
        a = act(g, ACTIVATION)
        da = act_grad(g, ACTIVATION)
    else:
        linear, slope = _softcap(g, GATE_CAP)
        s = tl.sigmoid(ALPHA * g)
        a = linear * s
        da = slope * s + ALPHA * a * (1.0 - s)
    u, du = _softcap(u, UP_CAP)
    if UP_OFFSET != 0.0:
        u = u + UP_OFFSET
    d_gate = grad * u * da
    d_up = grad * a * du
    if CLAMP:
        d_gate = tl.where(gate <= LIMIT, d_gate, 0.0)
        d_up = tl.where(tl.abs(up) <= LIMIT, d_up, 0.0)
    return d_gate, d_up


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
    """``a [..., 2H] -> glu(a[..., :H], a[..., H:])`` for a ``Glu``."""

    @staticmethod
    def forward(a: torch.Tensor, options: Glu) -> torch.Tensor:
        return _gated(a, options)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.options = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return gated_backward(ctx.options, *ctx.saved_tensors, grad), None


def _clamped(gate: torch.Tensor, up: torch.Tensor, options: Glu) -> tuple[torch.Tensor, torch.Tensor]:
    if options.limit is None:
        return gate, up
    return gate.clamp(max=options.limit), up.clamp(-options.limit, options.limit)


def _capped(v: torch.Tensor, cap: float | None) -> torch.Tensor:
    return v if cap is None else torch.tanh(v / cap) * cap


def _gated(a: torch.Tensor, options: Glu) -> torch.Tensor:
    gate, up = _clamped(*a.chunk(2, dim=-1), options)
    if options.plain:
        act = _elementwise(options.elementwise)(gate)
    else:
        act = _capped(gate, options.gate_softcap) * torch.sigmoid(options.alpha * gate)
    up = _capped(up, options.up_softcap)
    return act * (up + options.up_offset if options.up_offset else up)


def gated_backward(options: Glu, a: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``d loss / d a`` of the gated activation ``options`` for ``a = [gate, up]``."""
    raw_gate, raw_up = a.chunk(2, dim=-1)
    gate, up_clamped = _clamped(raw_gate, raw_up, options)
    up = _capped(up_clamped, options.up_softcap)
    up_slope = 1.0 if options.up_softcap is None else 1 - (up / options.up_softcap).square()
    if options.up_offset:
        up = up + options.up_offset
    if options.elementwise == "silu":  # (c(g) * s)' = c'(g) * s + alpha * c(g) * s * (1 - s), s = sigmoid(alpha g)
        linear = _capped(gate, options.gate_softcap)
        slope = 1.0 if options.gate_softcap is None else 1 - (linear / options.gate_softcap).square()
        sig = torch.sigmoid(options.alpha * gate)
        act = linear * sig
        d_gate, d_up = grad * up * (slope * sig + options.alpha * act * (1 - sig)), grad * act * up_slope
    else:
        d_gate = _elementwise_backward(options.elementwise, gate, grad * up)
        d_up = grad * _elementwise(options.elementwise)(gate)
    if options.limit is not None:
        d_gate = torch.where(raw_gate <= options.limit, d_gate, 0.0)
        d_up = torch.where(raw_up.abs() <= options.limit, d_up, 0.0)
    return torch.cat([d_gate, d_up], dim=-1)


def gated(a: torch.Tensor, options: Glu) -> torch.Tensor:
    """``a [..., 2H] -> glu(a[..., :H], a[..., H:])``, differentiable."""
    # A function, not ``GatedFunction.apply`` itself: stored on a module, the bound ``apply``
    # is traced into by torch.compile 2.11, which then fails on ``setup_context``. Without a
    # graph to record, ``apply`` would only add host time (binding its signature: 50 us on a 2-core CPU).
    if torch.is_grad_enabled() and a.requires_grad:
        return GatedFunction.apply(a, options)
    return _gated(a, options)


def activation_fn(activation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map from the first projection to the second's input (a gated one halves the width)."""
    name, options = parse_activation(activation)
    if options is not None:
        return functools.partial(gated, options=options)
    return _elementwise(name)


def activation_grad(activation: str, preact: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``d loss / d preact`` from ``grad = d loss / d activation(preact)``."""
    name, options = parse_activation(activation)
    if options is not None:
        return gated_backward(options, preact, grad)
    return _elementwise_backward(name, preact, grad)
