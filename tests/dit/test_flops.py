import pytest
import torch

from dit.flops import PAPER_PARAMS, count, main
from dit.models import create_model, parse_model_name


@pytest.mark.parametrize("name", ["DiT-MoE-S/2-8E2A", "DiT-S/2", "DiT-MoE-Ti/4-4E1A", "DiT-B/8"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_parameter_count_matches_the_model(name, qk_norm):
    with torch.device("meta"):
        model = create_model(name, qk_norm=qk_norm)
    counts = count(model.config)
    assert counts.params == sum(p.numel() for p in model.parameters())
    routed = sum(m.w_in.numel() + m.w_out.numel() for m in model.moe_layers())
    config = model.config
    expected_active = counts.params - routed + routed * config.top_k // max(config.num_experts, 1)
    assert counts.active_params == expected_active


def test_flops_of_dense_dit_xl_match_the_dit_paper():
    """DiT reports 118.6 Gflops for DiT-XL/2: multiply-accumulates, attention's N x N products
    included. Our thop-style count leaves those out; adding them back gives DiT's figure."""
    config = parse_model_name("DiT-XL/2")
    counts = count(config)
    attention_macs = config.depth * 2 * 256**2 * config.hidden_size
    assert (counts.thop_macs + attention_macs) / 1e9 == pytest.approx(118.6, abs=0.2)


def test_sparse_model_flops_follow_activated_parameters():
    s8, s16 = count(parse_model_name("DiT-MoE-S/2-8E2A")), count(parse_model_name("DiT-MoE-S/2-16E2A"))
    assert s16.params > 1.8 * s8.params and s16.flops == pytest.approx(s8.flops, rel=1e-3)
    for name, (total, active) in PAPER_PARAMS.items():
        counts = count(parse_model_name(name))
        assert counts.params == pytest.approx(total, rel=0.03) and counts.active_params == pytest.approx(active, rel=0.03)


def test_cli_prints_the_table(capsys):
    main([])
    out = capsys.readouterr().out
    assert "DiT-MoE-G/2-16E2A" in out and "thop GMACs" in out
