"""Expert Race (``routers.race``): its selection against a plain reference, the layer forward and
backward against a dense reference on both backends, its threshold at inference, its similarity
loss, and its dials."""

import math

import pytest
import torch

import moe_kernels as mk
from moe_kernels import reference
from moe_kernels.routers.race import race, similarity_loss
from tests.moe_kernels.helpers import BACKENDS, DEVICE

# (T, E, k): one token, k=1, k=E (every pair wins), E not a power of two, T off the block.
SHAPES = [(1, 4, 1), (37, 8, 2), (5, 16, 16), (20, 6, 3), (64, 3, 1)]


def _mask(experts: torch.Tensor, rows: torch.Tensor, T: int, E: int) -> torch.Tensor:
    mask = torch.zeros(T, E, dtype=torch.bool)
    mask[rows.cpu(), experts.cpu()] = True
    return mask


@pytest.mark.parametrize("T,E,k", SHAPES)
@pytest.mark.parametrize("ties", [False, True])
def test_selection_matches_the_reference(T, E, k, ties):
    logits = torch.randn(T, E, device=DEVICE)
    if ties:  # few distinct values: ties go to the lower token, then the lower expert
        logits = logits.round()
    experts, rows, cut = race(logits, T * k)
    assert experts.shape == rows.shape == (T * k,)
    assert torch.equal(_mask(experts, rows, T, E), reference.expert_race(logits, T * k).cpu())
    order = experts * T + rows  # expert-major, by token within an expert
    assert bool((order[1:] > order[:-1]).all())
    won = logits[rows, experts]
    lost = logits[~_mask(experts, rows, T, E).to(logits.device)]
    assert bool((won >= cut).all()) and bool((lost <= cut).all())


def test_a_nan_logit_wins_and_an_expert_may_win_nothing():
    logits = torch.randn(10, 4, device=DEVICE)
    logits[:, 2] = -30.0  # nobody's expert
    logits[3, 1] = math.nan
    experts, rows, _ = race(logits, 10)
    mask = _mask(experts, rows, 10, 4)
    assert mask[3, 1] and not mask[:, 2].any()
    assert torch.equal(mask, reference.expert_race(logits, 10).cpu())


def _layer(backend: str, **options) -> mk.MoE:
    return mk.MoE(16, 24, 4, 2, num_shared_experts=0, router="expert-race", backend=backend, **options).to(DEVICE)


def _dense_reference(layer: mk.MoE, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum over the winning (t, e) of sigmoid(logit) * FFN_e(x_t)``, expert by expert, densely."""
    scores = torch.sigmoid(layer.router(tokens).float())
    out = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    for e in range(layer.num_experts):
        ffn = reference.expert_mlp(tokens, e, layer.w_in, layer.w_out, layer.activation)
        out = out + (mask[:, e] * scores[:, e])[:, None] * ffn.float()
    return out.to(tokens.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 24, 37])
def test_layer_forward_backward_match_the_dense_reference(backend, T):
    """Training mode: the race over the forward's pairs; a token gets 0..E experts."""
    layer = _layer(backend)
    x = torch.randn(T, 16, device=DEVICE, requires_grad=True)
    y = layer(x)
    mask = reference.expert_race(layer.router(x), T * 2)
    want = _dense_reference(layer, x, mask)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    assert layer.expert_counts.tolist() == mask.sum(0).tolist() and int(layer.expert_counts.sum()) == T * 2
    params = [x, *layer.parameters()]
    grad_y = torch.randn_like(y)
    got = torch.autograd.grad((y * grad_y).sum() + layer.aux_loss, params, retain_graph=True)
    expected = torch.autograd.grad((want * grad_y).sum() + layer.aux_loss, params)
    for g, w in zip(got, expected):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_routes_each_token_on_its_own_by_the_threshold(backend):
    layer = _layer(backend, momentum=0.5)
    for _ in range(3):
        layer(torch.randn(32, 16, device=DEVICE))
    threshold = float(layer.router.threshold)
    assert threshold != 0.0
    layer.eval()
    x = torch.randn(12, 16, device=DEVICE)
    with torch.no_grad():
        y = layer(x)
        mask = layer.router(x).float() > threshold
        torch.testing.assert_close(y, _dense_reference(layer, x, mask), atol=1e-5, rtol=1e-5)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(12)])  # no token depends on its batch
        torch.testing.assert_close(alone, y, atol=1e-6, rtol=1e-6)
        counts = []
        for offset in (-1.0, 0.0, 1.0):
            layer.router.capacity_offset = offset
            layer(x)
            counts.append(int(layer.expert_counts.sum()))
    assert counts[0] >= counts[1] >= counts[2] and float(layer.router.threshold) == threshold


def test_the_threshold_is_the_running_cut_between_winners_and_losers():
    router = mk.ExpertRace(8, 4, 1, momentum=0.0)
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [2.0, -2.0, 0.5, 0.25]])
    router.route(torch.zeros(2, 8), logits, "torch")
    assert float(router.threshold) == pytest.approx((2.0 + 1.0) / 2)  # 2nd best 2.0, 3rd 1.0
    router.momentum = 0.5
    router.route(torch.zeros(2, 8), logits + 1.0, "torch")
    assert float(router.threshold) == pytest.approx((1.5 + 2.5) / 2)


def test_similarity_loss():
    torch.manual_seed(0)
    column = torch.randn(50, 1)
    assert similarity_loss(column.repeat(1, 4)).item() == pytest.approx(1.0, abs=1e-4)  # every pair alike
    assert similarity_loss(torch.cat([column, -column], 1)).item() == pytest.approx(1.0, abs=1e-4)
    assert similarity_loss(torch.randn(4000, 4)).item() < 1e-3  # independent columns
    assert similarity_loss(torch.randn(1, 4)).item() == 0.0 and similarity_loss(torch.randn(9, 1)).item() == 0.0
    logits = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: similarity_loss(t).double(), (logits,))


def test_the_auxiliary_loss_is_the_weighted_similarity_loss():
    layer = _layer("torch", similarity_coef=0.5, z_loss_coef=0.0)
    x = torch.randn(20, 16, device=DEVICE)
    layer(x)
    torch.testing.assert_close(layer.aux_loss, 0.5 * similarity_loss(layer.router(x)))


def test_no_tokens():
    layer = _layer("torch")
    y = layer(torch.randn(0, 16, device=DEVICE))
    assert y.shape == (0, 16) and int(layer.expert_counts.sum()) == 0


@pytest.mark.parametrize(
    "name, bad, good",
    [
        ("similarity_coef", [math.nan, -0.1, math.inf], [0.0, 0.1]),
        ("momentum", [math.nan, -0.1, 1.5], [0.0, 0.9, 1.0]),
        ("capacity_offset", [math.nan, math.inf, None], [-1.0, 2.5]),
    ],
)
def test_dials_are_checked_when_set(name, bad, good):
    router = mk.ExpertRace(8, 4, 2)
    for value in good:
        setattr(router, name, value)
        assert getattr(router, name) == value
    for value in bad:
        with pytest.raises((ValueError, TypeError), match=name):
            setattr(router, name, value)
    with pytest.raises(ValueError, match="momentum"):
        mk.MoE(8, 8, 4, 2, router="expert-race", momentum=2.0)


def test_eval_on_meta_says_it_needs_values():
    with torch.device("meta"):
        layer = mk.MoE(16, 24, 4, 2, router="expert-race", backend="torch")
        y = layer(torch.randn(6, 16))  # training: shapes alone decide
        assert y.shape == (6, 16)
        layer.eval()
    with pytest.raises(ValueError, match="meta tensors do not hold"):
        layer(torch.randn(6, 16, device="meta"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_experts_run_the_race_too(backend):
    """precision="fp8" (the experts' GEMMs in FP8, emulated on the PyTorch path) behind the race:
    near the full-precision layer with the same weights and the same winners."""
    layer = _layer(backend)
    fp8 = _layer(backend, precision="fp8")
    fp8.load_state_dict(layer.state_dict())
    x = torch.randn(24, 16, device=DEVICE, requires_grad=True)
    want, got = layer(x), fp8(x)
    assert torch.equal(fp8.expert_counts, layer.expert_counts)
    assert float((got - want).detach().norm() / want.detach().norm()) < 0.1
    got.square().mean().backward()
    assert x.grad is not None and bool(x.grad.isfinite().all())
