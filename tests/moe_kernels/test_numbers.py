"""Every public number of the ops and the layer, drawn at random (hypothesis): a value is
accepted exactly when the documented rule admits it, a refused one gets a ``ValueError`` or
``TypeError`` naming its argument, and an accepted one a finite result equal to the reference.

One argument varies at a time, the others keep valid values, so a refusal must name the one
that varies. The values mix valid ones (small enough to check against ``moe_kernels.reference``)
with anything: negative, zero, huge, NaN, infinite, bools, strings, NumPy scalars, tensors.
Layers too large to hold are built and run on the meta device, where only shapes are checked.
The PyTorch path runs here: the Triton kernels take the same checked numbers, and their
equality with it is tested elsewhere. The rules below are written out independently of
``moe_kernels.validation``, as the documentation states them.
"""

from __future__ import annotations

import math
import numbers
import operator
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_kernels as mk
from moe_kernels import reference
from moe_kernels.balance import router_z_loss

ANYTHING = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
    st.sampled_from([np.int64(3), np.float32(0.5), torch.tensor(2), torch.tensor(0.5), 1j, [2]]),
)
EXAMPLES = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
T, E = 5, 6


def integer(value: object, low: int = 1, high: float = math.inf) -> bool:
    """An integer (anything with ``__index__`` but a bool) in ``[low, high]``."""
    if isinstance(value, bool):
        return False
    try:
        return low <= operator.index(value) <= high
    except TypeError:
        return False


def real(value: object, low: float = 0, high: float = 1e6, open_low: bool = False) -> bool:
    """A finite real number (not a bool) in ``[low, high]`` (``(low, high]`` if ``open_low``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return False
    return (low < value if open_low else low <= value) and value <= high


# name -> (valid values, the documented rule); the other arguments keep their base values.
Spec = dict[str, tuple[st.SearchStrategy, Callable[[object], bool]]]
GATING: Spec = {
    "k": (st.integers(1, E), lambda v: integer(v, 1, E)),
    "scale": (st.floats(0.01, 100), lambda v: real(v, open_low=True)),
    "num_groups": (st.sampled_from([1, 2, 3, 6]), lambda v: integer(v) and E % operator.index(v) == 0),
    "topk_groups": (st.integers(1, 3), lambda v: v is None or integer(v, 1, 3)),
}
GATING_BASE = dict(k=2, num_groups=3, topk_groups=None, scale=1.0)
BALANCE: Spec = {
    "num_experts": (st.just(E), lambda v: integer(v, E, E)),  # the width of probs
    "alpha": (st.floats(0, 10), real),
}


def check(name: str, spec: Spec, value: object, call: Callable[[], object]) -> object | None:
    """``call()``'s result if the rule admits ``value``; ``None`` after checking the refusal."""
    try:
        result = call()
    except Exception as error:  # noqa: BLE001 - any error but a ValueError/TypeError fails below
        assert isinstance(error, (TypeError, ValueError)), repr(error)
        assert re.search(rf"\b{name}\b", str(error)), f"{name!r} not named in: {error}"
        assert not spec[name][1](value), f"{name}={value!r} follows the rule but was refused: {error}"
        return None
    assert spec[name][1](value), f"{name}={value!r} breaks the rule but was accepted"
    return result


def assert_finite_and_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want):
        if g.is_floating_point():
            assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w)


def draw(data, spec: Spec, name: str) -> object:
    return data.draw(st.one_of(spec[name][0], ANYTHING), label=name)


@pytest.mark.parametrize("name", sorted(GATING))
@EXAMPLES
@given(data=st.data())
def test_topk_gating(name, data):
    value = draw(data, GATING, name)
    kwargs = {**GATING_BASE, name: value}
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(0))
    got = check(name, GATING, value, lambda: mk.topk_gating(logits, backend="torch", **kwargs))
    if got is not None:
        assert_finite_and_close(got, reference.topk_gating(logits, **kwargs))


@pytest.mark.parametrize("name", sorted(BALANCE))
@EXAMPLES
@given(data=st.data())
def test_balance_loss(name, data):
    value = draw(data, BALANCE, name)
    kwargs = {"num_experts": E, "alpha": 0.05, name: value}
    probs = torch.softmax(torch.randn(T, E, generator=torch.Generator().manual_seed(1)), dim=-1)
    experts = torch.tensor([[0, 1], [2, 3], [4, 5], [0, 2], [1, 1]])
    got = check(name, BALANCE, value, lambda: mk.balance_loss(probs, experts, backend="torch", **kwargs))
    if got is not None:
        assert_finite_and_close([got], [reference.balance_loss(probs, experts, **kwargs)])


RATE: Spec = {"rate": (st.floats(0, 1), real)}


@EXAMPLES
@given(data=st.data())
def test_update_selection_bias(data):
    rate = draw(data, RATE, "rate")
    bias, counts = torch.randn(E, generator=torch.Generator().manual_seed(2)), torch.tensor([9, 1, 4, 4, 0, 2])
    before = bias.clone()
    if check("rate", RATE, rate, lambda: mk.update_selection_bias(bias, counts, rate=rate)) is None:
        assert torch.equal(bias, before)
        return
    load = counts.float()
    assert_finite_and_close([bias], [before + float(rate) * torch.sign(load.mean() - load)])


# The layer around LAYER_BASE (dim 8, hidden 6, 4 experts in 2 groups, top-2, two shared
# experts of width 8 each). Sizes are drawn large too: a layer that would not fit in memory is
# built on the meta device; weights must stay under 2**63 bytes (fp32).
SIZE = st.integers(1, 2**40)
FITS = 2**63 // 4


def shared_fits(dim: int, width: int) -> bool:
    return dim * 2 * width < FITS  # the shared expert's proj_in, [2 * width, dim]


LAYER: Spec = {
    "dim": (SIZE, lambda v: integer(v) and shared_fits(operator.index(v), 2 * operator.index(v))),
    "hidden_dim": (SIZE, lambda v: integer(v) and 4 * 8 * 2 * operator.index(v) < FITS),
    "num_experts": (st.integers(1, 8), lambda v: integer(v, 2) and operator.index(v) % 2 == 0 and v * 8 * 12 < FITS),
    "top_k": (st.integers(1, 4), lambda v: integer(v, 1, 4)),
    "num_shared_experts": (st.integers(0, 3), lambda v: integer(v, 0) and shared_fits(8, 8 * operator.index(v))),
    "shared_hidden_dim": (SIZE, lambda v: v is None or (integer(v) and shared_fits(8, operator.index(v)))),
    "balance_loss_alpha": (st.floats(0, 10), real),
    "num_groups": (st.sampled_from([1, 2, 4]), lambda v: integer(v) and 4 % operator.index(v) == 0),
    "topk_groups": (st.integers(1, 2), lambda v: v is None or integer(v, 1, 2)),
    "routed_scale": (st.floats(0.01, 100), lambda v: real(v, open_low=True)),
    "z_loss_coef": (st.floats(0, 10), real),
}
LAYER_BASE = dict(dim=8, hidden_dim=6, num_experts=4, top_k=2, num_groups=2)
SMALL = 64


def reference_layer(moe: mk.MoE, x: torch.Tensor) -> list[torch.Tensor]:
    """The layer's output and auxiliary loss from the reference ops and its own weights."""
    logits = moe.router(x)
    weights, experts, probs = reference.topk_gating(
        logits,
        moe.top_k,
        moe.router.normalize_weights,
        num_groups=moe.router.num_groups,
        topk_groups=moe.router.topk_groups,
        scale=moe.router.routed_scale,
    )
    y = reference.moe_ffn(x, weights, experts, moe.w_in, moe.w_out)
    if moe.shared is not None:
        y = y + moe.shared(x)
    aux = reference.balance_loss(probs, experts, moe.num_experts, moe.router.balance_loss_alpha)
    return [y, aux + moe.router.z_loss_coef * router_z_loss(logits)]


def build(kwargs: dict, device: str) -> mk.MoE:
    torch.manual_seed(0)
    with torch.device(device):
        return mk.MoE(**kwargs, backend="torch")


@pytest.mark.parametrize("name", sorted(LAYER))
@EXAMPLES
@given(data=st.data())
def test_moe_layer(name, data):
    value = draw(data, LAYER, name)
    kwargs = {**LAYER_BASE, name: value}
    large = integer(value) and operator.index(value) > SMALL
    moe = check(name, LAYER, value, lambda: build(kwargs, "meta" if large else "cpu"))
    if moe is None:
        return
    x = torch.randn(3, moe.dim, device=moe.w_in.device)
    y = moe(x)
    assert y.shape == x.shape and moe.aux_loss.shape == ()
    if not large:
        assert_finite_and_close([y, moe.aux_loss], reference_layer(moe, x))
