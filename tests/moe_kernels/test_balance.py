"""The balance statistics and losses: ``balance_loss`` against the reference on both backends,
the gating kernel's fused statistics, ``update_selection_bias``, bad input."""

import pytest
import torch

import moe_kernels as mk
from moe_kernels import reference
from moe_kernels.balance import loss_from_stats
from moe_kernels.topk_gating import GatingInputs, gating_with_stats
from tests.moe_kernels.helpers import BACKENDS, DEVICE, ROUTING_SHAPES


def test_update_selection_bias():
    bias = torch.zeros(4)
    mk.update_selection_bias(bias, torch.tensor([10, 2, 4, 4]), rate=0.1)
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,E,k", ROUTING_SHAPES)
def test_fused_statistics_give_the_balance_loss(backend, T, E, k):
    logits = torch.randn(T, E, device=DEVICE, requires_grad=True)
    weights, experts, probs, counts, prob_sums = gating_with_stats(GatingInputs(logits, k, False, backend))
    assert torch.equal(counts.long(), torch.bincount(experts.flatten(), minlength=E))
    loss = loss_from_stats(counts, prob_sums, T, k, 0.05)
    ref_logits = logits.detach().clone().requires_grad_()
    _, ref_experts, ref_probs = reference.topk_gating(ref_logits, k)
    ref_loss = reference.balance_loss(ref_probs, ref_experts, E, 0.05)
    torch.testing.assert_close(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,E,k", ROUTING_SHAPES)
def test_balance_loss_matches_reference(backend, T, E, k):
    probs = torch.softmax(torch.randn(T, E, device=DEVICE), -1).requires_grad_()
    experts = torch.rand(T, E, device=DEVICE).argsort(dim=1)[:, :k]
    loss = mk.balance_loss(probs, experts, E, alpha=0.01, backend=backend)
    ref = reference.balance_loss(probs, experts, E, alpha=0.01)
    torch.testing.assert_close(loss, ref)
    (grad,) = torch.autograd.grad(loss, probs)
    (ref_grad,) = torch.autograd.grad(ref, probs)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_balance_loss_is_alpha_when_perfectly_balanced(backend):
    E = 4
    probs = torch.full((8, E), 1 / E, device=DEVICE)
    experts = torch.tensor([[0, 1], [2, 3]] * 4, device=DEVICE)
    torch.testing.assert_close(
        mk.balance_loss(probs, experts, E, alpha=0.05, backend=backend), torch.tensor(0.05, device=DEVICE)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_balance_loss_all_tokens_on_one_expert(backend):
    E = 4
    probs = torch.softmax(torch.randn(10, E, device=DEVICE), -1)
    experts = torch.zeros(10, 1, dtype=torch.int32, device=DEVICE)
    loss = mk.balance_loss(probs, experts, E, alpha=1.0, backend=backend)
    torch.testing.assert_close(loss, E * probs[:, 0].mean())


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: mk.balance_loss(torch.rand(4, 3), torch.zeros(4, 1, dtype=torch.long), 5), ValueError, "probs"),
        (lambda: mk.balance_loss(torch.rand(4, 3), torch.zeros(4, 1), 3), TypeError, "experts"),
        (lambda: mk.balance_loss(torch.rand(4, 3), torch.zeros(5, 1, dtype=torch.long), 3), ValueError, "experts"),
        (lambda: mk.balance_loss(torch.rand(4, 3), torch.full((4, 1), 3), 3), ValueError, "experts"),
        (lambda: mk.balance_loss(torch.rand(4, 3), torch.zeros(4, 4, dtype=torch.long), 3), ValueError, "experts"),
    ],
)
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()
