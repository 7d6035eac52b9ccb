"""ProMoE's router (``routers.promoe``): the guidance split and the prototypes against a plain
reference, the layer forward and backward on both backends, its losses, its input and dials."""

import math

import pytest
import torch
import torch.nn.functional as F

import moe_kernels as mk
from moe_kernels import reference
from tests.moe_kernels.helpers import BACKENDS, DEVICE


def _layer(backend: str, E: int = 6, k: int = 2, **options) -> mk.MoE:
    torch.manual_seed(0)
    return mk.MoE(
        16, 24, E, k, num_shared_experts=0, router="promoe", backend=backend, unconditional_experts=2, **options
    ).to(DEVICE)


def _reference(layer: mk.MoE, x: torch.Tensor, unconditional: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rule written out: cosine similarities over the temperature, the other side of the
    guidance split masked, top-k of the softmax (one argmax at a time), the experts' weighted sum."""
    router = layer.router
    E, U = router.num_experts, router.unconditional_experts
    cosine = F.normalize(x, dim=-1) @ F.normalize(router.weight, dim=-1).t() / router.temperature
    allowed = (torch.arange(E, device=x.device) >= E - U)[None, :] == unconditional[:, None]
    sided = cosine.float().masked_fill(~allowed, -math.inf)
    weights, experts, _ = reference.topk_gating(sided, router.top_k)
    y = reference.moe_ffn(x, weights, experts, layer.w_in, layer.w_out, layer.activation)
    return y, experts, sided


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 19, 40])
@pytest.mark.parametrize("split", ["mixed", "all conditional", "all unconditional"])
def test_layer_matches_the_reference_forward_and_backward(backend, T, split):
    layer = _layer(backend)
    x = torch.randn(T, 16, device=DEVICE, requires_grad=True)
    unconditional = {
        "mixed": torch.rand(T, device=DEVICE) < 0.3,
        "all conditional": torch.zeros(T, dtype=torch.bool, device=DEVICE),
        "all unconditional": torch.ones(T, dtype=torch.bool, device=DEVICE),
    }[split]
    y = layer(x, unconditional=unconditional)
    want, experts, _ = _reference(layer, x, unconditional)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    side = experts >= 4  # the last two experts serve the unconditional tokens, and only them
    assert torch.equal(side, unconditional[:, None].expand_as(side))
    assert torch.equal(layer.expert_counts.long().cpu(), torch.bincount(experts.flatten().cpu(), minlength=6))
    params = [x, *layer.parameters()]
    grad_y = torch.randn_like(y)
    got = torch.autograd.grad((y * grad_y).sum(), params)
    expected = torch.autograd.grad((want * grad_y).sum(), params)
    for g, w in zip(got, expected):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_without_the_input_every_token_is_conditional_and_ties_go_to_the_lower_expert():
    layer = _layer("torch", k=1)
    with torch.no_grad():
        layer.router.weight[1] = layer.router.weight[0]  # two identical prototypes
    x = layer.router.weight[:1].detach().repeat(3, 1)
    layer(x)
    assert layer.expert_counts.tolist() == [3, 0, 0, 0, 0, 0]  # the tie went to expert 0
    y_none, y_false = layer(x), layer(x, unconditional=torch.zeros(3, dtype=torch.bool, device=DEVICE))
    torch.testing.assert_close(y_none, y_false)


def test_the_auxiliary_loss_is_the_contrastive_loss_plus_the_balance_loss():
    layer = _layer("torch", contrastive_coef=0.5, balance_loss_alpha=0.0)
    x = torch.randn(30, 16, device=DEVICE)
    unconditional = torch.arange(30, device=DEVICE) % 3 == 0
    layer(x, unconditional=unconditional)
    _, experts, sided = _reference(layer, x, unconditional)
    nce = -torch.log_softmax(sided, dim=-1).gather(1, experts[:, :1]).mean()
    torch.testing.assert_close(layer.aux_loss, 0.5 * nce)
    layer.router.balance_loss_alpha = 0.05
    layer(x, unconditional=unconditional)
    assert layer.aux_loss > 0.5 * nce


def test_the_prototypes_similarities_have_exact_gradients():
    router = mk.ProMoE(6, 4, 1).double()
    tokens = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(router, (tokens,))


def test_bad_inputs_and_options():
    layer = _layer("torch")
    x = torch.randn(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"unconditional must hold one value per token of x: shape \(4,\)"):
        layer(x, unconditional=torch.zeros(5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="unconditional must be a bool tensor"):
        layer(x, unconditional=torch.zeros(4, device=DEVICE))
    with pytest.raises(TypeError, match="takes no input labels .its inputs: unconditional"):
        layer(x, labels=torch.zeros(4, device=DEVICE))
    with pytest.raises(TypeError, match="the TokenChoice router takes no input unconditional .its inputs: none"):
        mk.MoE(16, 24, 4, 2)(x, unconditional=torch.zeros(4, dtype=torch.bool))
    for unconditional_experts in (0, 1, 5):  # each side needs top_k = 2 experts of the 6
        with pytest.raises(ValueError, match="unconditional_experts"):
            mk.ProMoE(16, 6, 2, unconditional_experts=unconditional_experts)
    router = mk.ProMoE(16, 6, 2, unconditional_experts=2)
    for name, bad in (("temperature", 0.0), ("temperature", math.nan), ("contrastive_coef", -1.0)):
        with pytest.raises(ValueError, match=name):
            setattr(router, name, bad)
