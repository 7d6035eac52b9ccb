"""The DiffMoE router and its capacity predictor in the ``MoE`` layer: trained on the
expert-choice selection, then routing each token on its own at inference, with a threshold
offset as the compute dial."""

import copy

import pytest
import torch

import moe_kernels as mk
from moe_kernels import reference
from moe_kernels.routers import CapacityPredictor
from tests.moe_kernels.helpers import BACKENDS, DEVICE


def _layer(backend, **options):
    torch.manual_seed(0)
    return mk.MoE(16, 12, 4, 2, router="diffmoe", backend=backend, **options).to(DEVICE)


def _predicted(layer, x, offset):
    """The reference of eval mode: expert e takes the tokens whose predicted logit passes its
    threshold plus offset, weighted by the softmax score."""
    predictor = layer.router.capacity_predictor
    mask = predictor(x) > predictor.thresholds + offset
    probs = torch.softmax(layer.router(x), dim=-1)
    y = sum(
        torch.where(mask[:, e : e + 1], probs[:, e : e + 1], 0.0)
        * reference.expert_mlp(x, e, layer.w_in, layer.w_out, layer.activation)
        for e in range(layer.num_experts)
    )
    return y + (layer.shared(x) if layer.shared is not None else 0), mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_is_expert_choice_and_trains_the_predictor_alone(backend):
    layer = _layer(backend)
    plain = copy.deepcopy(layer)
    plain.router = mk.ExpertChoice(16, 4, 2).to(DEVICE)
    plain.router.weight.data.copy_(layer.router.weight)
    x = torch.randn(24, 16, device=DEVICE, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, plain(x))
    loss = layer.aux_loss
    assert loss.item() > 0
    grads = torch.autograd.grad(loss, [x, *layer.parameters()], allow_unused=True)
    moved = {name for (name, _), g in zip(layer.named_parameters(), grads[1:]) if g is not None and g.abs().sum() > 0}
    assert grads[0] is None and moved == {name for name, _ in layer.named_parameters() if "capacity_predictor" in name}
    assert (layer.router.capacity_predictor.thresholds != 0).all()  # moved towards this batch's cut


def test_thresholds_reproduce_the_training_capacity():
    """With no averaging (momentum 0), eval mode on the training batch takes each expert's
    training count of tokens: G * C rows per expert, k experts per token on average."""
    predictor = CapacityPredictor(16, 4, momentum=0.0)
    x = torch.randn(40, 16)
    chosen = torch.rand(40, 4) < 0.5
    predictor.train_step(x, chosen, per_expert=10)
    assert predictor.select(x).sum(0).tolist() == [10] * 4
    assert predictor.select(x, offset=100.0).sum() == 0 and predictor.select(x, offset=-100.0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_routes_each_token_by_threshold(backend):
    layer = _layer(backend)
    x = torch.randn(30, 16, device=DEVICE)
    for _ in range(3):
        layer(x)  # training steps move the thresholds
    layer.eval()
    for offset in (0.0, 0.3, -0.3, 100.0, -100.0):
        layer.router.capacity_offset = offset
        with torch.no_grad():
            y = layer(x)
            want, mask = _predicted(layer, x, offset)
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
        assert layer.expert_counts.tolist() == mask.sum(0).tolist()
    with torch.no_grad():  # each token on its own: no batch dependence
        layer.router.capacity_offset = 0.0
        torch.testing.assert_close(layer(x), torch.cat([layer(x[i : i + 1]) for i in range(30)]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_is_differentiable(backend):
    layer = _layer(backend, num_shared_experts=0)
    layer(torch.randn(20, 16, device=DEVICE))
    layer.eval()
    x = torch.randn(20, 16, device=DEVICE, requires_grad=True)
    y = layer(x)
    want, _ = _predicted(layer, x, 0.0)
    grad = torch.randn_like(y)
    params = [x, layer.w_in, layer.w_out, layer.router.weight]
    for got, expected in zip(
        torch.autograd.grad((y * grad).sum(), params), torch.autograd.grad((want * grad).sum(), params)
    ):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_options_are_checked():
    with pytest.raises(TypeError, match="token-choice router takes no option capacity_predictor"):
        mk.MoE(16, 12, 4, 2, capacity_predictor=True)
    layer = _layer("torch").eval()
    with pytest.raises(ValueError, match="capacity_offset"):
        layer.router.capacity_offset = float("nan")  # refused when set, not at the next forward


def test_every_token_chosen_puts_the_cut_one_below_the_lowest_logit():
    """``per_expert == T``: no token is left out, so the cut sits a unit under the lowest logit
    (every token passes), not midway to a token that does not exist."""
    predictor = CapacityPredictor(16, 4, momentum=0.0)
    x = torch.randn(10, 16)
    predictor.train_step(x, torch.ones(10, 4, dtype=torch.bool), per_expert=10)
    with torch.no_grad():
        lowest = predictor(x).float().min(dim=0).values
    torch.testing.assert_close(predictor.thresholds, lowest - 1)
    assert predictor.select(x).all()
