import pytest
import torch

import moe_kernels as mk
from moe_kernels import reference
from tests.moe_kernels.helpers import BACKENDS, DEVICE, DTYPES, ROUTING_SHAPES, non_contiguous


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k", ROUTING_SHAPES)
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
    ],
)
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()
