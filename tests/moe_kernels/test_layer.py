import pytest
import torch

import moe_kernels as mk
from moe_kernels import reference
from tests.moe_kernels.helpers import BACKENDS, DEVICE


def _reference_forward(layer: mk.MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = x.reshape(-1, layer.dim)
    weights, experts, probs = reference.topk_gating(layer.router(tokens), layer.top_k, layer.router.normalize_weights)
    y = reference.moe_ffn(tokens, weights, experts, layer.w_in, layer.w_out, layer.activation, layer.b_in, layer.b_out)
    if layer.shared is not None:
        y = y + layer.shared(tokens)
    aux = reference.balance_loss(probs, experts, layer.num_experts, layer.router.balance_loss_alpha)
    return y.reshape(x.shape), aux


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_experts=4, top_k=2),
        dict(num_experts=3, top_k=1, num_shared_experts=0, activation="gelu"),
        dict(num_experts=4, top_k=4, normalize_weights=True, shared_hidden_dim=24, balance_loss_alpha=0.01),
        dict(num_experts=4, top_k=2, activation="gelu_tanh", expert_biases=True),
        dict(num_experts=3, top_k=2, expert_biases=True),
    ],
)
def test_forward_backward_match_reference(backend, kwargs):
    layer = mk.MoE(16, 24, backend=backend, **kwargs).to(DEVICE)
    x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    ref_y, ref_aux = _reference_forward(layer, x)
    torch.testing.assert_close(y, ref_y, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.aux_loss, ref_aux)

    params = [x, *layer.parameters()]
    got = torch.autograd.grad(y.square().sum() + layer.aux_loss, params)
    want = torch.autograd.grad(ref_y.square().sum() + ref_aux, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_aux_loss_only_in_training():
    layer = mk.MoE(8, 8, 4, 2).to(DEVICE)
    layer(torch.randn(3, 8, device=DEVICE))
    assert layer.aux_loss is not None and layer.aux_loss.requires_grad and layer.aux_loss.dim() == 0
    layer.eval()
    layer(torch.randn(3, 8, device=DEVICE))
    assert layer.aux_loss is None


def test_deepcopy_after_a_training_forward():
    """An EMA copy taken mid-training: the copy has the weights, not the last step's graph."""
    import copy

    layer = mk.MoE(8, 8, 4, 2).to(DEVICE)
    x = torch.randn(3, 8, device=DEVICE)
    layer(x)
    twin = copy.deepcopy(layer)
    assert twin.aux_loss is None and layer.aux_loss is not None
    torch.testing.assert_close(twin(x), layer(x))


def test_default_shared_width_and_parameter_shapes():
    layer = mk.MoE(12, 48, 8, 2)
    assert layer.w_in.shape == (8, 12, 96) and layer.w_out.shape == (8, 48, 12)
    assert layer.router.weight.shape == (8, 12) and layer.router.bias is None
    assert layer.shared.proj_in.weight.shape == (2 * 2 * 12, 12)  # SwiGLU of hidden num_shared_experts * dim
    assert layer.shared.proj_out.weight.shape == (12, 24)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU autocast")
def test_autocast_runs_experts_in_the_autocast_dtype():
    layer = mk.MoE(16, 16, 4, 2, backend="torch")
    x = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), atol=0.1, rtol=0.1)


def test_backend_environment_variable(monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_BACKEND", "triton")
    layer = mk.MoE(8, 8, 2, 1).to(DEVICE)
    x = torch.randn(4, 8, device=DEVICE)
    y_env = layer(x)
    monkeypatch.setenv("MOE_KERNELS_BACKEND", "torch")
    torch.testing.assert_close(y_env, layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(top_k=5), ValueError, "top_k"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(num_experts=0), ValueError, "num_experts"),
        (dict(dim=8.0), TypeError, "dim"),
        (dict(activation="tanh"), ValueError, "activation"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(num_shared_experts=-1), ValueError, "num_shared_experts"),
    ],
)
def test_bad_construction_raises(kwargs, error, match):
    args = dict(dim=8, hidden_dim=8, num_experts=4, top_k=2) | kwargs
    with pytest.raises(error, match=match):
        mk.MoE(**args)


def test_bad_input_raises():
    layer = mk.MoE(8, 8, 4, 2)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match="x"):
        layer(torch.ones(3, 8, dtype=torch.long))


def test_router_z_loss_and_router_logits():
    torch.manual_seed(0)
    plain = mk.MoE(8, 8, 4, 2, backend="torch")
    zloss = mk.MoE(8, 8, 4, 2, backend="torch", z_loss_coef=1e-2)
    zloss.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 8)
    plain(x)
    zloss(x)
    logits = plain.router(x.reshape(-1, 8))
    torch.testing.assert_close(plain.router_logits, logits)
    expected = (torch.logsumexp(logits, dim=-1) ** 2).mean()
    torch.testing.assert_close(zloss.aux_loss - plain.aux_loss, 1e-2 * expected)


def test_balance_loss_conventions():
    probs = torch.softmax(torch.randn(9, 4), -1)
    experts = torch.rand(9, 4).argsort(dim=1)[:, :3]
    ours = mk.balance_loss(probs, experts, 4, alpha=1.0)
    switch = mk.balance_loss(probs, experts, 4, alpha=1.0, convention="switch")
    torch.testing.assert_close(switch, 3 * ours)
    with pytest.raises(ValueError, match="convention"):
        mk.balance_loss(probs, experts, 4, convention="gshard")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shared_gate=True, num_shared_experts=0), "shared_gate needs a shared expert"),
        (dict(balance_loss_convention="mixtral"), "balance_loss_convention"),
        (dict(score="tanh"), "score"),
        (dict(num_groups=3), "num_groups"),
    ],
)
def test_bad_routing_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mk.MoE(8, 8, 4, 2, **kwargs)


def test_a_router_by_name_and_as_an_object_are_the_same_layer():
    torch.manual_seed(0)
    named = mk.MoE(8, 8, 4, 2, router="token-choice", normalize_weights=True, backend="torch")
    torch.manual_seed(0)
    given = mk.MoE(8, 8, 4, router=mk.TokenChoice(8, 4, 2, normalize_weights=True), backend="torch")
    assert type(named.router) is mk.TokenChoice and given.top_k == named.top_k == 2
    assert named.state_dict().keys() == given.state_dict().keys()
    given.load_state_dict(named.state_dict())
    x = torch.randn(5, 8)
    torch.testing.assert_close(named(x), given(x))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(router=mk.TokenChoice(6, 4, 2)), ValueError, "6-wide tokens against 4 experts"),
        (dict(router=mk.TokenChoice(8, 3, 2)), ValueError, "8-wide tokens against 3 experts"),
        (dict(router=mk.TokenChoice(8, 4, 2), top_k=1), ValueError, "differs from the router's"),
        (dict(router=mk.TokenChoice(8, 4, 2), score="sigmoid"), TypeError, "pass them to its constructor"),
        (dict(router=torch.nn.Linear(8, 4)), TypeError, "moe_kernels.Router"),
        (dict(router="token-choice", top_k=2, group_size=4), TypeError, "takes no option group_size"),
        (dict(router="expert-choice", top_k=2, normalize_weights=True), TypeError, "takes no option normalize_weights"),
        (dict(router="token-choice", top_k=None), TypeError, "top_k is required"),
    ],
)
def test_bad_routers(kwargs, error, match):
    args = dict(dim=8, hidden_dim=8, num_experts=4, top_k=None) | kwargs
    with pytest.raises(error, match=match):
        mk.MoE(**args)
