"""NaN and infinite router logits: every expert id stays in [0, E), the NaN reaches the output
and the loss, and nothing reads or writes out of bounds (forward and backward, both backends)."""

import pytest
import torch

import moe_kernels as mk
from moe_kernels import reference
from tests.moe_kernels.helpers import BACKENDS, DEVICE

T, E, k, D, H = 9, 6, 2, 16, 12
BAD_ROW = 4
INF = float("inf")


def _bad_logits(kind: str) -> torch.Tensor:
    """Random logits whose row ``BAD_ROW`` holds one NaN, +Inf or -Inf, or is all -Inf."""
    logits = 2 * torch.randn(T, E, device=DEVICE)
    if kind == "all -inf":
        logits[BAD_ROW] = -INF
    else:
        logits[BAD_ROW, 3] = {"nan": float("nan"), "+inf": INF, "-inf": -INF}[kind]
    return logits


# One -Inf logit is a legitimate input (that expert's probability is 0); the others poison the row.
KINDS = ["nan", "+inf", "-inf", "all -inf"]
POISONS_ROW = {"nan": True, "+inf": True, "-inf": False, "all -inf": True}


def _good(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t[:BAD_ROW], t[BAD_ROW + 1 :]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_topk_gating_keeps_ids_in_range(backend, kind):
    logits = _bad_logits(kind).requires_grad_()
    weights, experts, probs = mk.topk_gating(logits, k, backend=backend)
    assert int(experts.min()) >= 0 and int(experts.max()) < E
    ref_weights, ref_experts, ref_probs = reference.topk_gating(logits, k)
    assert torch.equal(experts, ref_experts)
    torch.testing.assert_close(weights, ref_weights, equal_nan=True)
    torch.testing.assert_close(probs, ref_probs, equal_nan=True)
    assert bool(weights[BAD_ROW].isnan().all()) == POISONS_ROW[kind]
    assert torch.isfinite(_good(weights)).all()

    grad_w, grad_p = torch.randn_like(weights), torch.randn_like(probs)
    (grad,) = torch.autograd.grad((weights * grad_w).sum() + (probs * grad_p).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref_weights * grad_w).sum() + (ref_probs * grad_p).sum(), logits)
    torch.testing.assert_close(grad, ref_grad, equal_nan=True)
    assert torch.isfinite(_good(grad)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_moe_ffn_after_bad_gating(backend, kind):
    logits = _bad_logits(kind)
    weights, experts, _ = mk.topk_gating(logits, k, backend=backend)
    weights.requires_grad_()
    x = torch.randn(T, D, device=DEVICE, requires_grad=True)
    w_in = (torch.randn(E, D, 2 * H, device=DEVICE) / D**0.5).requires_grad_()
    w_out = (torch.randn(E, H, D, device=DEVICE) / H**0.5).requires_grad_()
    y = mk.moe_ffn(x, weights, experts, w_in, w_out, backend=backend)
    ref = reference.moe_ffn(x, weights, experts, w_in, w_out)
    torch.testing.assert_close(y, ref, equal_nan=True)
    assert bool(y[BAD_ROW].isnan().all()) == POISONS_ROW[kind]
    assert torch.isfinite(_good(y)).all()

    grad_y = torch.randn_like(y)
    inputs = [x, weights, w_in, w_out]
    got = torch.autograd.grad((y * grad_y).sum(), inputs)
    want = torch.autograd.grad((ref * grad_y).sum(), inputs)
    for name, g, w in zip(("dx", "dweights", "dw_in", "dw_out"), got, want):
        torch.testing.assert_close(g, w, equal_nan=True, msg=lambda m: f"{name}: {m}")
    # A token's own input gradient depends only on its own routing.
    assert torch.isfinite(_good(got[0])).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_ffn_with_a_nan_token(backend):
    x = torch.randn(T, D, device=DEVICE)
    x[BAD_ROW, 5] = float("nan")
    weights = torch.rand(T, k, device=DEVICE)
    experts = torch.rand(T, E, device=DEVICE).argsort(dim=1)[:, :k]
    w_in = torch.randn(E, D, 2 * H, device=DEVICE) / D**0.5
    w_out = torch.randn(E, H, D, device=DEVICE) / H**0.5
    y = mk.moe_ffn(x, weights, experts, w_in, w_out, backend=backend)
    assert y[BAD_ROW].isnan().all() and torch.isfinite(_good(y)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_moe_layer_with_bad_router_logits(backend, kind):
    moe = mk.MoE(D, H, E, k, backend=backend).to(DEVICE)
    x = torch.randn(T, D, device=DEVICE, requires_grad=True)
    clean = moe(x)
    clean_loss = moe.aux_loss
    bad = _bad_logits(kind)
    # The router's own logits, with the bad row's non-finite entries planted.
    moe.router.register_forward_hook(lambda module, args, out: torch.where(bad.isfinite(), out, bad))
    y = moe(x)
    assert int(moe.expert_counts.sum()) == T * k
    assert bool(y[BAD_ROW].isnan().all()) == POISONS_ROW[kind]
    torch.testing.assert_close(_good(y), _good(clean))
    assert bool(moe.aux_loss.isnan()) == POISONS_ROW[kind]
    if not POISONS_ROW[kind]:
        assert torch.isfinite(moe.aux_loss) and not torch.equal(moe.aux_loss, clean_loss)
    (y.sum() + moe.aux_loss).backward()
    assert torch.isfinite(_good(x.grad)).all()
    assert bool(moe.w_in.grad.isnan().any()) == POISONS_ROW[kind]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), INF, -INF])
def test_a_non_finite_selection_bias_shows_in_the_output(backend, value):
    """A bias gone bad must not skew routing silently (NaN and +Inf would take every token to
    that expert, -Inf none): every weight, hence every output and the training loss, is NaN."""
    moe = mk.MoE(D, H, E, k, backend=backend, selection_bias=True).to(DEVICE)
    x = torch.randn(T, D, device=DEVICE)
    moe.router.expert_bias[2] = value
    y = moe(x)
    assert y.isnan().all()
    ref_weights, _, _ = reference.topk_gating(moe.router(x), k, bias=moe.router.expert_bias)
    assert ref_weights.isnan().all()
    weights, _, _ = mk.topk_gating(moe.router(x), k, backend=backend, bias=torch.randn(E, device=DEVICE))
    assert torch.isfinite(weights).all()


@pytest.mark.parametrize("rate", [float("nan"), INF, -1e-3])
def test_update_selection_bias_refuses_a_rate_that_would_invert_or_poison_it(rate):
    bias = torch.zeros(E)
    with pytest.raises(ValueError, match=r"rate must be a finite number in \[0, 1e\+06\]"):
        mk.update_selection_bias(bias, torch.arange(E), rate=rate)
    assert torch.equal(bias, torch.zeros(E))
