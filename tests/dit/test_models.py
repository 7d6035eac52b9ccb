import copy

import pytest
import torch

from dit.flops import PAPER
from dit.models import create_model, model_names, parse_model_name


def tiny(name="DiT-MoE-Ti/2-4E2A", **overrides):
    args = dict(input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=32, num_heads=2) | overrides
    return create_model(name, **args)


@pytest.mark.parametrize("name", [name for name in PAPER if "MoE" in name])
def test_parameter_counts_match_table_1(name):
    total_paper, active_paper = PAPER[name].params, PAPER[name].active_params
    with torch.device("meta"):
        model = create_model(name)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(moe.w_in.numel() + moe.w_out.numel() for moe in model.moe_layers())
    config = model.config
    active = total - routed + routed * config.top_k / config.num_experts
    assert abs(total / total_paper - 1) < 0.03
    assert abs(active / active_paper - 1) < 0.03


def test_every_block_is_moe_with_the_papers_shapes():
    with torch.device("meta"):
        model = create_model("DiT-MoE-S/2-8E2A")
    moes = model.moe_layers()
    assert len(moes) == 12
    moe = moes[0]
    D = 384
    assert moe.w_in.shape == (8, D, 2 * 4 * D) and moe.w_out.shape == (8, 4 * D, D)
    assert moe.shared.proj_in.weight.shape == (2 * 2 * D, D) and moe.top_k == 2
    assert moe.router.normalize_weights is False and moe.router.balance_loss_alpha == 0.05
    assert model.blocks[0].attn.qkv.weight.shape == (3 * D, D) and model.config.learn_sigma


def test_names():
    assert "DiT-XL/2" in model_names() and "DiT-MoE-G/2-16E2A" in model_names()
    config = parse_model_name("DiT-MoE-XL/4-32E4A")
    assert (config.num_experts, config.top_k, config.patch_size, config.depth) == (32, 4, 4, 28)
    assert parse_model_name("DiT-G/2").num_experts == 0
    for bad in ("DiT-M/2", "DiT-MoE-S/2", "DiT-S/2-8E2A", "DiT-MoE-S/3-8E2A", "DiT-MoE-S/2-2E4A"):
        with pytest.raises(ValueError):
            parse_model_name(bad)
    with pytest.raises(TypeError, match="width"):
        create_model("DiT-S/2", width=3)


@pytest.mark.parametrize("name", ["DiT-MoE-Ti/2-4E2A", "DiT-Ti/2"])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_forward_shapes_and_aux_loss(name, learn_sigma):
    model = tiny(name, learn_sigma=learn_sigma)
    x = torch.randn(3, 1, 8, 8)
    out = model(x, torch.tensor([0, 10, 999]), torch.tensor([1, 2, 3]))
    assert out.shape == (3, 2 if learn_sigma else 1, 8, 8)
    if "MoE" in name:
        assert model.aux_loss is not None and model.aux_loss.requires_grad
        ema = copy.deepcopy(model)  # as the trainer's EMA copy, mid-training
        assert ema.aux_loss is None
        model.eval()
        model(x, torch.tensor([0, 10, 999]), torch.tensor([1, 2, 3]))
        assert model.aux_loss is None
    else:
        assert model.aux_loss is None


def test_adaln_zero_init_makes_the_output_zero():
    model = tiny()
    assert torch.count_nonzero(model(torch.randn(2, 1, 8, 8), torch.tensor([5, 6]), torch.tensor([0, 1]))) == 0


def _randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def test_gradient_checkpointing_gives_the_same_gradients():
    model = _randomize(tiny())
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([4, 5])
    torch.manual_seed(1)
    (model(x, t, y).square().mean() + model.aux_loss).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.grad_checkpointing = True
    torch.manual_seed(1)
    (model(x, t, y).square().mean() + model.aux_loss).backward()
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)


def test_triton_and_torch_backends_agree_in_the_model():
    torch.manual_seed(0)
    model = _randomize(tiny(depth=1)).eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([4, 5])
    outputs = []
    for backend in ("torch", "triton"):
        for moe in model.moe_layers():
            moe.backend = backend
        outputs.append(model(x, t, y))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=1e-4)


def test_per_layer_regularization_supervises_every_block_but_the_last_in_training_only():
    """Race-DiT's per-layer regularization: one head per block but the last, each predicting the
    objective's target [N, C, H, W] from its block's output; coef times the mean of their mean
    squared errors; no head runs at inference, and a model without the option has none."""
    assert tiny(depth=3).layer_heads is None and tiny(depth=3).layer_regularization(torch.zeros(1)) is None
    model = _randomize(tiny(depth=3, learn_sigma=True, layer_regularization_coef=0.5))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([4, 5])
    target = torch.randn(2, 1, 8, 8)
    model(x, t, y)
    assert len(model.layer_heads) == 2 and [p.shape for p in model.layer_predictions] == [(2, 1, 8, 8)] * 2
    expected = 0.5 * torch.stack([((p - target) ** 2).mean() for p in model.layer_predictions]).mean()
    loss = model.layer_regularization(target)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # the shallow block gets its direct signal
    assert model.blocks[2].attn.qkv.weight.grad is None and model.final_layer.linear.weight.grad is None
    model.eval()
    model(x, t, y)
    assert model.layer_predictions == [] and model.layer_regularization(target) is None
    with pytest.raises(ValueError, match="layer_regularization_coef"):
        tiny(layer_regularization_coef=-1.0)


def test_qk_norm_adds_per_head_layernorms():
    model = tiny(qk_norm=True)
    assert model.blocks[0].attn.q_norm.weight.shape == (16,)


def test_expert_choice_dit_routes_each_image_alone():
    """router="expert-choice" groups one image's tokens: an image's output does not depend on its
    batch (guidance batches the conditional and unconditional passes together), and every expert
    takes top_k * tokens / num_experts tokens of each image."""
    torch.manual_seed(0)
    model = create_model(
        "DiT-MoE-Ti/2-8E2A", input_size=8, in_channels=1, num_classes=10, router="expert-choice", moe_backend="torch"
    ).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 900]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        together = model(x, t, y)
        alone = torch.cat([model(x[i : i + 1], t[i : i + 1], y[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)  # batched GEMMs round differently
    assert model.moe_layers()[0].expert_counts.tolist() == [4] * 8  # 16 tokens x 2 / 8 experts, the last image
    with pytest.raises(ValueError, match="router must be one of"):
        create_model("DiT-MoE-Ti/2-8E2A", router="random")


def test_compute_dials_belong_to_their_router():
    def build(router):
        return create_model("DiT-MoE-Ti/2-8E2A", input_size=8, in_channels=1, num_classes=10, router=router)

    model = build("expert-choice")
    model.set_expert_compute(capacity_factor=1.0)
    assert all(moe.router.capacity_factor == 1.0 for moe in model.moe_layers())
    with pytest.raises(ValueError, match="cannot exceed num_experts"):
        model.set_expert_compute(capacity_factor=9.0)
    assert all(moe.router.capacity_factor == 1.0 for moe in model.moe_layers())  # a refused dial changes nothing
    with pytest.raises(ValueError, match="capacity_offset sets the compute of diffmoe and expert-race models"):
        model.set_expert_compute(capacity_offset=0.5)
    with pytest.raises(ValueError, match="capacity_factor sets the compute of expert-choice models"):
        build("token-choice").set_expert_compute(capacity_factor=1.0)
    diffmoe = build("diffmoe")
    with pytest.raises(ValueError, match="finite"):
        diffmoe.set_expert_compute(capacity_offset=float("nan"))
    diffmoe.set_expert_compute(capacity_offset=-0.5)
    assert all(moe.router.capacity_offset == -0.5 and moe.router.group_size is None for moe in diffmoe.moe_layers())
