"""``mk.MoE`` with the options of the family table (docs/kernels.md) reproduces the sparse MoE blocks of five
transformers families, weights copied over: the table is tested, not just written."""

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", minversion="5", reason="the hf extra (transformers >= 5) is not installed"
)

import moe_kernels as mk  # noqa: E402
from tests.integrations.test_huggingface import CONFIGS  # noqa: E402


def _block(family: str):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    classes = {
        "mixtral": MixtralSparseMoeBlock,
        "olmoe": OlmoeSparseMoeBlock,
        "qwen2_moe": Qwen2MoeSparseMoeBlock,
        "qwen3_moe": Qwen3MoeSparseMoeBlock,
        "deepseek_v3": DeepseekV3MoE,
    }
    config = CONFIGS[family]()
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    block = classes[family](config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        for name, buffer in block.named_buffers():
            if "bias" in name:
                buffer.normal_(0, 0.1)
    return config, block


def _options(family: str, config) -> dict:
    """The table's row for ``family``: the MoE arguments that reproduce it."""
    if family == "deepseek_v3":
        return dict(
            num_experts=config.n_routed_experts,
            top_k=config.num_experts_per_tok,
            hidden_dim=config.moe_intermediate_size,
            num_shared_experts=1,
            shared_hidden_dim=config.moe_intermediate_size * config.n_shared_experts,
            score="sigmoid",
            selection_bias=True,
            num_groups=config.n_group,
            topk_groups=config.topk_group,
            normalize_weights=config.norm_topk_prob,
            routed_scale=config.routed_scaling_factor,
        )
    num_experts = config.num_local_experts if family == "mixtral" else config.num_experts
    options = dict(
        num_experts=num_experts,
        top_k=config.num_experts_per_tok,
        num_shared_experts=0,
        normalize_weights=True if family == "mixtral" else config.norm_topk_prob,
        balance_loss_convention="switch",
    )
    options["hidden_dim"] = config.intermediate_size if family in ("mixtral", "olmoe") else config.moe_intermediate_size
    if family == "qwen2_moe":
        options.update(num_shared_experts=1, shared_hidden_dim=config.shared_expert_intermediate_size, shared_gate=True)
    return options


def _copy(block, moe: mk.MoE) -> None:
    """HF stacks gate_up_proj [E, 2I, D] and down_proj [E, D, I]: w_in and w_out transposed.
    A gated MLP's gate_proj and up_proj, stacked, are proj_in."""
    with torch.no_grad():
        moe.router.weight.copy_(block.gate.weight)
        if moe.router.expert_bias is not None:
            moe.router.expert_bias.copy_(block.gate.e_score_correction_bias)
        moe.w_in.copy_(block.experts.gate_up_proj.transpose(1, 2))
        moe.w_out.copy_(block.experts.down_proj.transpose(1, 2))
        shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
        if shared is not None:
            moe.shared.proj_in.weight.copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
            moe.shared.proj_out.weight.copy_(shared.down_proj.weight)
        if moe.shared_gate is not None:
            moe.shared_gate.weight.copy_(block.shared_expert_gate.weight)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_moe_options_reproduce_the_family(family, backend):
    config, block = _block(family)
    moe = mk.MoE(config.hidden_size, backend=backend, **_options(family, config)).eval()
    _copy(block, moe)
    x = torch.randn(2, 7, config.hidden_size)
    x_ref = x.clone().requires_grad_()
    x_ours = x.clone().requires_grad_()
    want, got = block(x_ref), moe(x_ours)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-5, rtol=1e-4)


def test_switch_convention_is_transformers_load_balancing_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    config, block = _block("mixtral")
    moe = mk.MoE(config.hidden_size, **_options("mixtral", config), balance_loss_alpha=1.0)
    _copy(block, moe)
    moe(torch.randn(3, 5, config.hidden_size))
    want = load_balancing_loss_func((moe.router_logits,), moe.num_experts, moe.top_k)
    torch.testing.assert_close(moe.aux_loss, want)
    dit_moe = mk.balance_loss(
        torch.softmax(moe.router_logits, -1), moe.router_logits.topk(2).indices, moe.num_experts, alpha=1.0
    )
    torch.testing.assert_close(dit_moe * moe.top_k, want)
