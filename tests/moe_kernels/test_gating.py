import pytest
import torch

import moe_kernels as mk
from moe_kernels import reference
from moe_kernels.gating import gating_with_stats, loss_from_stats
from tests.moe_kernels.helpers import BACKENDS, DEVICE, DTYPES, non_contiguous

# (T, E, k): T=1, k=1, k=E, E not a power of two, T not a multiple of the block.
SHAPES = [(1, 4, 1), (37, 8, 2), (5, 16, 16), (70, 6, 3), (64, 3, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k", SHAPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_topk_gating_matches_reference(backend, dtype, T, E, k, normalize):
    logits = (3 * torch.randn(T, E, device=DEVICE)).to(dtype).requires_grad_()
    tolerance = dict(atol=1e-3 if dtype == torch.float16 else 1e-5, rtol=1e-3)
    weights, experts, probs = _check_against_reference(logits, k, backend, tolerance, normalize=normalize)
    assert weights.dtype == probs.dtype == torch.float32 and experts.dtype == torch.int64
    assert weights.shape == experts.shape == (T, k) and probs.shape == (T, E)


def _check_against_reference(logits, k, backend, grad_tolerance, **options):
    """``topk_gating`` equals the reference, forward and backward (in the dtype of ``logits``)."""
    weights, experts, probs = mk.topk_gating(logits, k, backend=backend, **options)
    ref_weights, ref_experts, ref_probs = reference.topk_gating(logits, k, **options)
    assert torch.equal(experts, ref_experts)
    torch.testing.assert_close(weights, ref_weights)
    torch.testing.assert_close(probs, ref_probs)
    grad_w, grad_p = torch.randn_like(weights), torch.randn_like(probs)
    (grad,) = torch.autograd.grad((weights * grad_w).sum() + (probs * grad_p).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref_weights * grad_w).sum() + (ref_probs * grad_p).sum(), logits)
    assert grad.dtype == logits.dtype
    torch.testing.assert_close(grad, ref_grad, **grad_tolerance)
    return weights, experts, probs


# Routing variants: (E, k, options); groups of 1 and of 4 experts, a bias large enough to change
# the choice, sigmoid with and without renormalisation, the routed scale with and without it.
VARIANTS = [
    (8, 2, dict(score="sigmoid")),
    (8, 3, dict(score="sigmoid", normalize=True, scale=2.5)),
    (8, 3, dict(score="sigmoid", scale=2.5)),
    (6, 2, dict(scale=0.25)),
    (6, 2, dict(bias=True)),
    (16, 4, dict(score="sigmoid", bias=True, num_groups=4, topk_groups=2, normalize=True, scale=2.5)),
    (8, 2, dict(num_groups=8, topk_groups=3)),
    (12, 3, dict(bias=True, num_groups=3, topk_groups=1)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("E,k,options", VARIANTS)
@pytest.mark.parametrize("T", [1, 45])
def test_routing_variants_match_reference(backend, E, k, options, T):
    options = dict(options)
    if options.pop("bias", False):
        options["bias"] = torch.randn(E, device=DEVICE) / 4
    logits = (2 * torch.randn(T, E, device=DEVICE)).requires_grad_()
    _check_against_reference(logits, k, backend, dict(atol=1e-5, rtol=1e-4), **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_limit_and_bias_change_the_choice_not_the_weights(backend):
    # Expert 0 scores best but sits in a weaker group than experts 2 and 3; a bias on expert 3
    # lifts it over expert 2, and over expert 0 without groups.
    logits = torch.tensor([[3.0, -4.0, 1.0, 0.9, -4.0, -4.0]], device=DEVICE)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.0, 0.0], device=DEVICE)
    groups = dict(score="sigmoid", num_groups=3, topk_groups=1)
    assert mk.topk_gating(logits, 1, backend=backend, **groups)[1].tolist() == [[2]]
    weights, experts, _ = mk.topk_gating(logits, 1, backend=backend, bias=bias, **groups)
    assert experts.tolist() == [[3]]
    torch.testing.assert_close(weights, torch.sigmoid(logits[:, [3]]))
    weights, experts, probs = mk.topk_gating(logits, 2, backend=backend, score="sigmoid", bias=bias)
    assert experts.tolist() == [[3, 0]]
    torch.testing.assert_close(weights, torch.sigmoid(logits[:, [3, 0]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_renormalised_is_topk_then_softmax(backend):
    """GPT-OSS's router (top-k of the logits, then a softmax over those k) is normalize=True."""
    logits = torch.randn(21, 8, device=DEVICE)
    weights, experts, _ = mk.topk_gating(logits, 3, normalize=True, backend=backend)
    top, index = logits.topk(3, dim=-1)
    assert torch.equal(experts, index)
    torch.testing.assert_close(weights, torch.softmax(top, dim=-1))


def test_update_selection_bias():
    bias = torch.zeros(4)
    mk.update_selection_bias(bias, torch.tensor([10, 2, 4, 4]), rate=0.1)
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_pick_the_lower_index_first(backend):
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]], device=DEVICE)
    _, experts, _ = mk.topk_gating(logits, 3, backend=backend)
    assert experts.tolist() == [[1, 2, 3], [0, 1, 2]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_do_not_overflow(backend):
    """exp(100) overflows fp32: the softmax must subtract each row's maximum first."""
    logits = torch.tensor(
        [[100.0, 90.0, 0.0, 1.0], [-200.0, -210.0, -300.0, -205.0]], device=DEVICE, requires_grad=True
    )
    weights, experts, probs = mk.topk_gating(logits, 2, backend=backend)
    expected = torch.softmax(logits.detach().double(), dim=-1)
    torch.testing.assert_close(probs.double(), expected)
    assert experts.tolist() == [[0, 1], [0, 3]]
    (grad,) = torch.autograd.grad(weights.sum(), logits)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_through_weights_only(backend):
    logits = torch.randn(9, 5, device=DEVICE, requires_grad=True)
    weights, _, _ = mk.topk_gating(logits, 2, backend=backend)
    weights.sum().backward()  # an expanded incoming gradient
    ref_logits = logits.detach().clone().requires_grad_()
    reference.topk_gating(ref_logits, 2)[0].sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_logits(backend):
    logits = non_contiguous(torch.randn(13, 6, device=DEVICE))
    for got, want in zip(mk.topk_gating(logits, 2, backend=backend), reference.topk_gating(logits, 2)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    weights, experts, probs = mk.topk_gating(torch.randn(0, 4, device=DEVICE), 2, backend=backend)
    assert weights.shape == experts.shape == (0, 2) and probs.shape == (0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,E,k", SHAPES)
def test_fused_statistics_give_the_balance_loss(backend, T, E, k):
    logits = torch.randn(T, E, device=DEVICE, requires_grad=True)
    weights, experts, probs, counts, prob_sums = gating_with_stats(logits, k, False, backend)
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
@pytest.mark.parametrize("T,E,k", SHAPES)
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
        (lambda: mk.topk_gating([[1.0, 2.0]], 1), TypeError, "logits"),
        (lambda: mk.topk_gating(torch.randn(4, 3, 2), 1), ValueError, "logits"),
        (lambda: mk.topk_gating(torch.randint(0, 3, (4, 3)), 1), TypeError, "logits"),
        (lambda: mk.topk_gating(torch.randn(4, 3), 4), ValueError, "k"),
        (lambda: mk.topk_gating(torch.randn(4, 3), 0), ValueError, "k"),
        (lambda: mk.topk_gating(torch.randn(4, 3), 1.5), TypeError, "k"),
        (lambda: mk.topk_gating(torch.randn(4, 3), 1, backend="cuda"), ValueError, "backend"),
        (lambda: mk.topk_gating(torch.randn(4, 3), 1, score="relu"), ValueError, "score"),
        (lambda: mk.topk_gating(torch.randn(4, 6), 1, num_groups=4), ValueError, "num_groups"),
        (lambda: mk.topk_gating(torch.randn(4, 6), 1, num_groups=3, topk_groups=4), ValueError, "topk_groups"),
        (lambda: mk.topk_gating(torch.randn(4, 6), 3, num_groups=3, topk_groups=1), ValueError, "kept groups"),
        (lambda: mk.topk_gating(torch.randn(4, 6), 1, scale=0.0), ValueError, "scale"),
        (lambda: mk.topk_gating(torch.randn(4, 6), 1, bias=torch.randn(5)), ValueError, "bias"),
        (lambda: mk.topk_gating(torch.randn(4, 6), 1, bias=torch.full((6,), float("nan"))), ValueError, "bias"),
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
