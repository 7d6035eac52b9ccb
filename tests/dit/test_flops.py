import dataclasses

import pytest
import torch

from dit.flops import PAPER, count, main
from dit.models import create_model, parse_model_name

UPCYCLED = dict(expert_activation="gelu_tanh", expert_biases=True)


@pytest.mark.parametrize("name", ["DiT-MoE-S/2-8E2A", "DiT-S/2", "DiT-MoE-Ti/4-4E1A", "DiT-B/8"])
@pytest.mark.parametrize("options", [{}, dict(qk_norm=True), UPCYCLED])
def test_parameter_count_matches_the_model(name, options):
    with torch.device("meta"):
        model = create_model(name, **options)
    counts = count(model.config)
    assert counts.params == sum(p.numel() for p in model.parameters())
    routed = sum(
        sum(p.numel() for p in (m.w_in, m.w_out, m.b_in, m.b_out) if p is not None) for m in model.moe_layers()
    )
    assert counts.expert_params == routed
    config = model.config
    expected_active = counts.params - routed + routed * config.top_k // max(config.num_experts, 1)
    assert counts.active_params == expected_active


@pytest.mark.parametrize("name", PAPER)
def test_counts_reproduce_the_published_figures(name):
    """DiT-MoE's Table 1 counts linear layers only and matches to its printed 0.01 Gflops; DiT's
    Table 4 also counts attention's N x N products and matches to 0.02%."""
    paper = PAPER[name]
    counts = count(parse_model_name(name))
    gmacs = counts.published_convention(paper.source) / 1e9
    within_rounding = pytest.approx(paper.gmacs, abs=0.005)
    assert gmacs == (within_rounding if "MoE" in name else pytest.approx(paper.gmacs, abs=0.005, rel=2e-4))
    assert counts.params == pytest.approx(paper.params, rel=0.03)
    assert counts.active_params == pytest.approx(paper.active_params, rel=0.03)


def test_attention_products_are_the_only_difference_between_the_conventions():
    config = parse_model_name("DiT-MoE-XL/2-8E2A")
    counts = count(config)
    tokens = (config.input_size // config.patch_size) ** 2
    assert counts.macs - counts.linear_macs == config.depth * 2 * tokens**2 * config.hidden_size
    assert counts.flops == 2 * counts.macs


def test_sparse_model_compute_follows_activated_parameters():
    s8, s16 = count(parse_model_name("DiT-MoE-S/2-8E2A")), count(parse_model_name("DiT-MoE-S/2-16E2A"))
    assert s16.params > 1.8 * s8.params and s16.flops == pytest.approx(s8.flops, rel=1e-3)


def test_cli_prints_the_table(capsys):
    main([])
    out = capsys.readouterr().out
    assert "DiT-MoE-G/2-16E2A" in out and "690.94" in out and "+attn" in out
    main(["--image-size", "512"])
    assert "690.94" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--image-size", "100"])


@pytest.mark.parametrize("router", ["expert-choice", "expert-race", "promoe"])
def test_routers_of_k_experts_per_token_on_average_count_as_token_choice(router):
    """Expert choice and Expert Race give a token k experts on average, ProMoE exactly k: the same
    parameters, activated parameters and compute as token choice (their routers hold nothing
    beyond the Linear(D, E); DiffMoE's predictor is counted apart)."""
    config = create_model("DiT-MoE-S/2-8E2A").config
    assert count(dataclasses.replace(config, router=router)) == count(config)
