from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dit.models import create_model
from dit.precision import autocast, inference_weights
from dit.sampling import guided


class LabelEcho(nn.Module):
    """Predicts, on every pixel, its class label in the first C channels and label + 100 in the
    variance channels: distinct conditional and unconditional outputs."""

    config = SimpleNamespace(class_dropout_prob=0.1, num_classes=10)

    def forward(self, x, t, y):
        label = y.float().reshape(-1, 1, 1, 1).expand_as(x)
        return torch.cat([label, label + 100], dim=1)


@pytest.mark.parametrize("scale", [1.0, 1.5, 4.0])
def test_guidance_extrapolates_from_the_unconditional_output(scale):
    labels = torch.tensor([3, 7])
    x = torch.randn(2, 1, 2, 2)
    out = guided(LabelEcho(), labels, scale)(x, torch.tensor([5, 5]))
    cond, uncond = labels.float().reshape(-1, 1, 1, 1), 10.0  # the null class is num_classes
    expected = uncond + scale * (cond - uncond)
    torch.testing.assert_close(out[:, :1], expected.expand(-1, 1, 2, 2))
    torch.testing.assert_close(out[:, 1:], (cond + 100).expand(-1, 1, 2, 2))  # sigma from the conditional pass


def test_guidance_needs_a_model_trained_with_class_dropout():
    model = LabelEcho()
    model.config = SimpleNamespace(class_dropout_prob=0.0, num_classes=10)
    with pytest.raises(ValueError, match="class dropout"):
        guided(model, torch.tensor([1]), 2.0)


def test_bf16_inference_weights_change_nothing_but_the_rounding_autocast_does_anyway():
    torch.manual_seed(0)
    model = create_model(
        "DiT-MoE-Ti/2-4E2A", input_size=8, in_channels=1, num_classes=10, moe_backend="torch", qk_norm=True
    ).eval()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 4, 10])
    with torch.no_grad(), autocast("bf16", torch.device("cpu")):
        want = model(x, t, y)
        inference_weights(model, "bf16")
        got = model(x, t, y)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(b.dtype != torch.bfloat16 for b in model.buffers())  # the residual stream stays fp32
    moe = model.blocks[0].ffn
    assert moe.w_in.to(torch.bfloat16) is moe.w_in  # no copy of the experts on each forward
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert inference_weights(model, "fp32") is model


def test_guidance_over_the_full_interval_is_plain_guidance_bit_for_bit():
    torch.manual_seed(0)
    model = create_model("DiT-Ti/2", input_size=8, in_channels=1, num_classes=10, moe_backend="torch").eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    labels, x = torch.tensor([1, 8]), torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        for t in (0, 500, 999):
            times = torch.tensor([t, t])
            plain = guided(model, labels, 4.0)(x, times)
            assert torch.equal(guided(model, labels, 4.0, (0.0, 1.0))(x, times), plain)


def test_guidance_interval_guides_only_inside_it():
    labels, x = torch.tensor([3, 7]), torch.randn(2, 1, 2, 2)
    model_fn = guided(LabelEcho(), labels, 4.0, (0.2, 0.6))
    cond = labels.float().reshape(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    for t, scale in ((100, 1.0), (200, 4.0), (450, 4.0), (600, 4.0), (700, 1.0)):
        out = model_fn(x, torch.tensor([t, t]))
        torch.testing.assert_close(out[:, :1], 10.0 + scale * (cond - 10.0), msg=f"t={t}")


@pytest.mark.parametrize("interval", [(0.5, 0.2), (-0.1, 0.5), (0.0, 1.5), (0.1,)])
def test_bad_guidance_intervals(interval):
    with pytest.raises(ValueError, match="cfg_interval"):
        guided(LabelEcho(), torch.tensor([1]), 4.0, interval)


@pytest.mark.parametrize(
    "objective, sampler",
    [("diffusion", "euler"), ("diffusion", "heun"), ("rectified-flow", "ddpm"), ("rectified-flow", "dpm++2m")],
)
def test_a_sampler_of_the_other_objective_is_refused(objective, sampler):
    from dit.sampling import check_steps

    config = SimpleNamespace(objective=objective)
    with pytest.raises(ValueError, match="does not fit a model trained with"):
        check_steps(config, 10, sampler)


@pytest.mark.parametrize("objective, sampler", [("diffusion", "dpm++2m"), ("rectified-flow", "heun")])
def test_the_new_samplers_generate(objective, sampler):
    from dit.sampling import generate

    torch.manual_seed(0)
    model = create_model(
        "DiT-MoE-Ti/2-4E2A", input_size=8, in_channels=1, num_classes=10, objective=objective,
        learn_sigma=objective == "diffusion", moe_backend="torch",
    ).eval()  # fmt: skip
    out = generate(model, torch.tensor([0, 5]), 2.0, 4, sampler, seed=0,
                   cfg_interval=(0.1, 0.9), time_shift=2.0 if objective == "rectified-flow" else 1.0)  # fmt: skip
    assert out.shape == (2, 1, 8, 8) and out.isfinite().all()


def test_the_seed_changes_every_draw():
    """torch's CPU generator keeps only 32 bits of a seed: the seed and the index must both reach
    them, for the samples and for the training steps' draws alike."""
    from dit.parallel import StepDraws
    from dit.sampling import SampleNoise

    def noise(seed, first=0):
        return SampleNoise(seed, first, 3, (1, 2, 2), torch.device("cpu"))()

    assert torch.equal(noise(0), noise(0)) and not torch.equal(noise(0), noise(1))
    assert torch.equal(noise(5)[1:], noise(5, first=1)[:2])  # a sample's noise is its own
    assert len({tuple(row.flatten().tolist()) for row in noise(7)}) == 3
    draws = [StepDraws(seed, 10, 4, slice(0, 4), torch.device("cpu")).uniform() for seed in (0, 0, 1)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_stream_seeds_keep_runs_apart():
    """``stream_seed`` spreads runs by the golden-ratio step: pinned values, and the streams of
    runs seeded s and s + 1 do not coincide (as they would with ``seed + index``)."""
    from dit.parallel import stream_seed

    assert [stream_seed(0, 1), stream_seed(1, 0), stream_seed(7, 3)] == [1, 2654435769, 1401181202]
    assert {stream_seed(5, i) for i in range(100)}.isdisjoint(stream_seed(6, i) for i in range(100))
