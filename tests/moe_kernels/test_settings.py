"""A layer's settings are checked when they are set, not at the next forward: each router's dials
by the constructor's rules, a dial another router owns refused where it would be ignored, and
the remaining functions' arguments like the rest of the API."""

import math

import pytest
import torch

import moe_kernels as mk

NON_FINITE = [math.nan, math.inf, -math.inf]


def _router(name: str) -> mk.Router:
    return mk.MoE(8, 8, 4, 2, router=name, backend="torch").router


@pytest.mark.parametrize(
    "router, name, bad, good",
    [
        ("diffmoe", "capacity_offset", [*NON_FINITE, "0.5", None], [-0.5, 0, 2.0]),
        ("token-choice", "z_loss_coef", [*NON_FINITE, -1e-3], [0.0, 1e-3]),
        ("token-choice", "balance_loss_alpha", [*NON_FINITE, -0.05], [0.0, 0.01]),
        ("expert-choice", "capacity_factor", [*NON_FINITE, 0.0, -1.0, 4.5], [1, 0.5, 4.0]),
        ("expert-choice", "group_size", [0, -4, 2.5, "8"], [None, 8, 1000]),
    ],
)
def test_each_dial_is_checked_when_set(router, name, bad, good):
    r = _router(router)
    for value in good:
        setattr(r, name, value)
        assert getattr(r, name) == value
    kept = getattr(r, name)
    for value in bad:
        with pytest.raises((ValueError, TypeError), match=name):
            setattr(r, name, value)
        assert getattr(r, name) == kept


def test_a_capacity_factor_that_leaves_a_group_no_token_is_refused_when_set():
    r = mk.ExpertChoice(8, 8, 2, group_size=4)
    with pytest.raises(ValueError, match="rounds to 0 tokens per expert"):
        r.capacity_factor = 0.5  # 4 x 0.5 / 8 = 0.25
    r.group_size = 2  # 2 x 2 / 8 = 0.5 rounds half up: one token per expert
    with pytest.raises(ValueError, match="rounds to 0 tokens per expert"):
        r.group_size = 1
    assert (r.group_size, r.capacity_factor) == (2, 2.0)


@pytest.mark.parametrize(
    "router, name",
    [("token-choice", "capacity_factor"), ("token-choice", "capacity_offset"), ("expert-choice", "capacity_offset")],
)
def test_a_dial_of_another_router_is_refused(router, name):
    with pytest.raises(AttributeError, match=f"has no setting {name}"):
        setattr(_router(router), name, 1.0)


@pytest.mark.parametrize(
    "name", ["capacity_factor", "capacity_offset", "z_loss_coef", "normalize_weights", "group_size"]
)
def test_a_router_setting_on_the_layer_points_to_the_router(name):
    with pytest.raises(AttributeError, match=f"set moe.router.{name}"):
        setattr(mk.MoE(8, 8, 4, 2), name, 1.0)


def test_copies_keep_the_checked_settings():
    import copy
    import pickle

    r = _router("diffmoe")
    r.capacity_offset = 0.25
    for clone in (copy.deepcopy(r), pickle.loads(pickle.dumps(r))):
        assert clone.capacity_offset == 0.25
        with pytest.raises(ValueError, match="capacity_offset"):
            clone.capacity_offset = math.nan


def test_hugging_face_backend_is_checked_at_registration():
    pytest.importorskip("transformers")
    import moe_kernels.integrations.huggingface as mk_hf

    with pytest.raises(ValueError, match="backend must be one of"):
        mk_hf.register(backend="bogus")


@pytest.mark.parametrize("value", [math.nan, 0.0, -1.0, math.inf])
def test_dequantize_refuses_scales_no_quantization_gives(value):
    w_fp8, scale = mk.quantize_fp8(torch.randn(2, 16, 16), block=16)
    scale[0, 0, 0] = value
    with pytest.raises(ValueError, match="finite, positive block scales"):
        mk.dequantize_fp8(w_fp8, scale, block=16)


def test_update_selection_bias_refuses_negative_counts():
    with pytest.raises(ValueError, match="non-negative"):
        mk.update_selection_bias(torch.zeros(4), torch.tensor([3, -1, 2, 2]))


def test_moe_ffn_in_fp8_names_weights_that_are_not_tensors():
    x, weights, experts = torch.randn(5, 8), torch.rand(5, 2), torch.randint(0, 3, (5, 2))
    with pytest.raises(TypeError, match="w_in must be a torch.Tensor, got list"):
        mk.moe_ffn(x, weights, experts, [[1.0]], torch.randn(3, 4, 8), precision="fp8")
    with pytest.raises(TypeError, match="w_out must be a torch.Tensor, got list"):
        mk.moe_ffn(x, weights, experts, torch.randn(3, 8, 8), [[1.0]], precision="fp8")


def test_the_layers_backend_is_checked_when_set():
    layer = mk.MoE(8, 8, 4, 2)
    layer.backend = "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        layer.backend = "cuda"
    assert layer.backend == "torch"
