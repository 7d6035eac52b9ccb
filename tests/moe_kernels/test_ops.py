"""The ops as torch.library custom ops: opcheck on both backends, torch.func, torch.compile."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moe_kernels as mk
from moe_kernels import reference
from moe_kernels.balance import expert_stats_op
from moe_kernels.dispatch import Dispatch, by_token, sort_by_expert
from moe_kernels.expert_choice_gating import (
    choice_dispatch,
    expert_choice_gating_backward_op,
    expert_choice_gating_op,
)
from moe_kernels.experts import experts_backward_op, experts_op
from moe_kernels.grouped_mm import grouped_mm_op, grouped_mm_wgrad_op
from moe_kernels.topk_gating import topk_gating_backward_op, topk_gating_op
from tests.moe_kernels.helpers import BACKENDS, DEVICE

T, D, H, E, k = 11, 16, 8, 4, 2


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_()


def _routed():
    x, weights = _leaf(T, D), torch.rand(T, k, device=DEVICE).requires_grad_()
    experts = torch.rand(T, E, device=DEVICE).argsort(dim=1)[:, :k]
    w_in, w_out = _leaf(E, D, 2 * H) / D**0.5, _leaf(E, H, D) / H**0.5
    return x, weights, experts, w_in.detach().requires_grad_(), w_out.detach().requires_grad_()


def _leaf_weights(d: Dispatch) -> Dispatch:
    return d._replace(weights=d.weights.detach().requires_grad_())


def _experts_args(d: Dispatch, x, w_in, w_out, b_in, b_out, activation, backend, save=True):
    """The arguments of ``moe_kernels::experts`` for the dispatch ``d``."""
    return (x, *d[:5], w_in, w_out, b_in, b_out, None, None, activation, backend, save, save, save, False)


def _op_cases(backend):
    logits = _leaf(T, E)
    bias = torch.randn(E, device=DEVICE) / 10
    yield topk_gating_op, (logits, k, False, backend, "softmax", None, 1, 1, 1.0)
    yield topk_gating_op, (logits, k, True, backend, "sigmoid", bias, 2, 1, 2.5)
    weights, experts, probs, _, _ = topk_gating_op(logits.detach(), k, True, backend, "softmax", None, 1, 1, 1.0)
    grads = (torch.randn_like(weights), torch.randn_like(probs), torch.randn(E, device=DEVICE))
    yield topk_gating_backward_op, (probs, weights, experts, *grads, True, torch.float32, backend, "softmax", 1.0)
    yield (
        topk_gating_backward_op,
        (probs, weights, experts, grads[0], None, None, False, torch.float32, backend, "sigmoid", 2.5),
    )
    yield expert_stats_op, (probs.detach().requires_grad_(), experts, E, backend)
    yield expert_choice_gating_op, (_leaf(12, E), 3, 6, backend)
    ec_weights, ec_tokens, ec_probs = expert_choice_gating_op(torch.randn(12, E, device=DEVICE), 3, 6, backend)
    ec_grads = (torch.randn_like(ec_weights), torch.randn_like(ec_probs))
    yield expert_choice_gating_backward_op, (ec_probs, ec_tokens, *ec_grads, torch.float32, backend)
    yield expert_choice_gating_backward_op, (ec_probs, ec_tokens, ec_grads[0], None, torch.float32, backend)
    x, w_in, w_out = _leaf(12, D), _leaf(E, D, 2 * H), _leaf(E, H, D)
    chosen = _leaf_weights(choice_dispatch(ec_weights, ec_tokens, 12))
    yield experts_op, _experts_args(chosen, x, w_in, w_out, _leaf(E, 2 * H), _leaf(E, D), "swiglu", backend)
    plain = [t.detach() for t in (x, w_in, w_out)]
    yield (
        experts_op,
        _experts_args(chosen._replace(weights=chosen.weights.detach()), *plain, None, None, "swiglu", backend, False),
    )
    offsets = torch.tensor([3, 3, 9, 14], dtype=torch.int32, device=DEVICE)
    x, w = _leaf(14, D), _leaf(E, D, H)
    yield grouped_mm_op, (x, w, offsets, backend)
    yield grouped_mm_wgrad_op, (x.detach(), torch.randn(14, H, device=DEVICE), offsets, backend)
    x, weights, chosen_experts, w_in, w_out = _routed()
    yield sort_by_expert, (chosen_experts, E, backend)
    d = by_token(chosen_experts, weights, E, backend)
    b_in, b_out = _leaf(E, 2 * H), _leaf(E, D)
    yield experts_op, _experts_args(d, x, w_in, w_out, None, None, "swiglu", backend)
    yield experts_op, _experts_args(d, x, w_in, w_out, b_in, b_out, "swiglu", backend)
    frozen = [t.detach() for t in (x, w_in, w_out)]
    yield (
        experts_op,
        _experts_args(d._replace(weights=d.weights.detach()), *frozen, None, None, "swiglu", backend, False),
    )
    yield experts_op, _experts_args(d, x, _leaf(E, D, H), w_out, _leaf(E, H), None, "gelu", backend)
    saved = experts_op(*_experts_args(d._replace(weights=d.weights.detach()), *frozen, None, None, "swiglu", backend))
    grad_y = torch.randn(T, D, device=DEVICE)
    dispatched = (d.weights.detach(), *d[1:5])
    for needs in ((True,) * 6, (True, False, False, False, False, False), (False,) * 4 + (True, True)):
        args = (grad_y, frozen[0], *dispatched, frozen[1], frozen[2], *saved[1:], "swiglu", backend, *needs, False)
        yield experts_backward_op, args


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_op_passes_opcheck(backend):
    for op, args in _op_cases(backend):
        torch.library.opcheck(op.custom_op, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_are_registered_in_the_moe_kernels_namespace(backend):
    names = {
        "topk_gating",
        "topk_gating_backward",
        "expert_stats",
        "expert_choice_gating",
        "expert_choice_gating_backward",
        "sort_by_expert",
        "experts",
        "experts_backward",
        "grouped_mm",
        "grouped_mm_wgrad",
    }
    for name in names:
        assert hasattr(torch.ops.moe_kernels, name)
    x, weights, chosen, w_in, w_out = _routed()
    d = Dispatch(weights.reshape(-1), *torch.ops.moe_kernels.sort_by_expert(chosen, E, backend))
    y = torch.ops.moe_kernels.experts(*_experts_args(d, x, w_in, w_out, None, None, "swiglu", backend))[0]
    y.square().sum().backward()  # differentiable when called through torch.ops too
    ref_x = x.detach().clone().requires_grad_()
    reference.moe_ffn(ref_x, weights, chosen, w_in, w_out).square().sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, atol=1e-4, rtol=1e-4)


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_eager_calls_skip_the_dispatcher_and_agree_with_it(backend, monkeypatch):
    dispatched = []
    ops = (experts_op, experts_backward_op, sort_by_expert, topk_gating_op, topk_gating_backward_op)
    for op in ops:
        monkeypatch.setattr(
            op, "overload", lambda *args, op=op, run=op.overload: dispatched.append(op.name) or run(*args)
        )
    layer = mk.MoE(D, H, E, k, backend=backend).to(DEVICE)
    x = _leaf(T, D)
    with torch.no_grad():
        direct = layer(x)
    layer(x).sum().backward()  # the Functions' forward and backward run without grad mode too
    assert dispatched == []
    with torch.no_grad(), _Passthrough():  # a dispatch mode must see the op, not its insides
        through_op = layer(x)
    assert dispatched == ["moe_kernels::topk_gating", "moe_kernels::sort_by_expert", "moe_kernels::experts"]
    torch.testing.assert_close(direct, through_op, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gradient_whose_inputs_were_not_saved_is_refused(backend):
    x, weights, chosen, w_in, w_out = _routed()
    args = list(_experts_args(by_token(chosen, weights, E, backend), x, w_in, w_out, None, None, "swiglu", backend))
    args[15] = False  # save_h
    y = experts_op(*args)[0]
    with pytest.raises(RuntimeError, match="gradient of w_out needs what save_h=True keeps"):
        y.sum().backward()
    # The weights' gradient without the outputs: from the pre-activation on the Triton path, but
    # not with an output bias, whose part of that gradient only the outputs hold.
    b_out = torch.randn(E, D, device=DEVICE)
    for bias, refused in ((None, backend == "torch"), (b_out, True)):
        args = list(_experts_args(by_token(chosen, weights, E, backend), x, w_in, w_out, None, bias, "swiglu", backend))
        args[16] = False  # save_out
        y = experts_op(*args)[0]
        if refused:
            with pytest.raises(RuntimeError, match="gradient of weights needs what save_out=True keeps"):
                torch.autograd.grad(y.sum(), weights)
        else:
            torch.autograd.grad(y.sum(), weights)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad_over_moe_ffn(backend):
    x, weights, experts, w_in, w_out = _routed()

    def loss(x, weights, w_in, w_out):
        return mk.moe_ffn(x, weights, experts, w_in, w_out, backend=backend).square().sum()

    got = torch.func.grad(loss, argnums=(0, 1, 2, 3))(x.detach(), weights.detach(), w_in.detach(), w_out.detach())
    want = torch.autograd.grad(loss(x, weights, w_in, w_out), [x, weights, w_in, w_out])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    offsets = torch.tensor([3, 3, 9, 11], dtype=torch.int32, device=DEVICE)
    got = torch.func.grad(lambda w: mk.grouped_mm(x.detach(), w, offsets, backend=backend).square().sum())(
        w_in.detach()
    )
    (want,) = torch.autograd.grad(reference.grouped_mm(x.detach(), w_in, offsets).square().sum(), w_in)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    logits = torch.randn(T, E, device=DEVICE)
    got = torch.func.grad(lambda x: mk.topk_gating(x, k, backend=backend)[0].sum())(logits)
    ref_logits = logits.clone().requires_grad_()
    (want,) = torch.autograd.grad(reference.topk_gating(ref_logits, k)[0].sum(), ref_logits)
    torch.testing.assert_close(got, want)


def test_vmap_says_it_is_not_supported():
    x, weights, experts, w_in, w_out = _routed()
    with pytest.raises(RuntimeError, match="vmap"):
        torch.vmap(lambda x: mk.moe_ffn(x, weights.detach(), experts, w_in.detach(), w_out.detach(), backend="torch"))(
            x.detach()[None].expand(2, T, D)
        )


def _train_step(layer):
    def step(x):
        y = layer(x)
        return y.square().mean() + layer.aux_loss

    return step


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_compiles_without_graph_breaks(backend):
    torch._dynamo.reset()
    layer = mk.MoE(D, H, E, k, backend=backend).to(DEVICE)
    x = _leaf(2, 7, D)
    explanation = torch._dynamo.explain(_train_step(layer))(x)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_moe_matches_eager_and_recompiles_once_for_new_token_counts(backend):
    torch._dynamo.reset()
    layer = mk.MoE(D, H, E, k, backend=backend).to(DEVICE)
    compiled = torch.compile(_train_step(layer), fullgraph=True, backend="aot_eager")
    torch._dynamo.utils.counters.clear()
    for tokens in (7, 9, 12, 5):
        x = _leaf(tokens, D)
        loss = compiled(x)
        (grad_x, *grad_params) = torch.autograd.grad(loss, [x, *layer.parameters()])
        ref = _train_step(layer)(x)
        (ref_x, *ref_params) = torch.autograd.grad(ref, [x, *layer.parameters()])
        torch.testing.assert_close(loss, ref)
        for got, want in zip([grad_x, *grad_params], [ref_x, *ref_params]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # One graph for the first size, one with the token count symbolic for all the others.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_inductor_compiles_the_layer(backend):
    torch._dynamo.reset()
    layer = mk.MoE(D, H, E, k, backend=backend).to(DEVICE)
    x = _leaf(9, D)
    loss = torch.compile(_train_step(layer), fullgraph=True)(x)
    torch.testing.assert_close(loss, _train_step(layer)(x))


def test_value_checks_are_skipped_while_compiling():
    x, weights, experts, w_in, w_out = _routed()
    bad = experts.clone()
    bad[0, 0] = E  # caught in eager mode...
    with pytest.raises(ValueError, match="expert ids"):
        mk.moe_ffn(x, weights, bad, w_in, w_out, backend="torch")
    torch._dynamo.reset()
    fn = torch.compile(
        lambda e: mk.moe_ffn(x, weights, e, w_in, w_out, backend="triton"), fullgraph=True, backend="aot_eager"
    )
    fn(experts)  # ...and never read from the device inside a compiled graph
