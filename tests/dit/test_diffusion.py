import numpy as np
import pytest
import torch

from dit.diffusion import RectifiedFlow, create_diffusion, linear_betas, space_timesteps
from dit.diffusion.losses import discretized_gaussian_log_likelihood


def test_linear_schedule():
    betas = linear_betas(1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(2e-2)
    assert np.all(np.diff(betas) > 0)


def test_posterior_is_the_bayes_posterior():
    """q(x_{t-1} | x_t, x_0) from the forward marginals, checked on a scalar by completing the square."""
    d = create_diffusion()
    t = torch.tensor([500])
    x0, xt = torch.tensor([[0.3]]), torch.tensor([[-0.2]])
    mean, logvar = d.q_posterior(x0, xt, t)
    beta = float(d._tables["betas"][500])
    abar_prev = float(d._tables["alphas_cumprod"][499])
    # p(x_{t-1} | x0) = N(sqrt(abar_prev) x0, 1 - abar_prev); p(x_t | x_{t-1}) = N(sqrt(1-beta) x_{t-1}, beta)
    precision = 1 / (1 - abar_prev) + (1 - beta) / beta
    expected_mean = (np.sqrt(abar_prev) * 0.3 / (1 - abar_prev) + np.sqrt(1 - beta) * -0.2 / beta) / precision
    assert float(mean) == pytest.approx(expected_mean, rel=1e-5)
    assert float(logvar.exp()) == pytest.approx(1 / precision, rel=1e-5)


def test_respacing_keeps_the_noise_levels_of_the_kept_steps():
    full, spaced = create_diffusion(), create_diffusion("250")
    assert spaced.num_steps == 250 and spaced.timesteps[0] == 0 and spaced.timesteps[-1] == 999
    np.testing.assert_allclose(
        spaced._tables["alphas_cumprod"].numpy(), full._tables["alphas_cumprod"].numpy()[spaced.timesteps], rtol=1e-10
    )
    assert len(space_timesteps(1000, "ddim50")) == 50
    with pytest.raises(ValueError):
        space_timesteps(1000, 0)


def test_training_losses():
    d = create_diffusion()
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1

    def model(x, t, y):
        return torch.randn(x.shape[0], 2, 8, 8, requires_grad=True)

    terms = d.training_losses(model, x0, {"y": None})
    assert terms["loss"].shape == terms["mse"].shape == terms["vb"].shape == (4,)
    assert torch.isfinite(terms["loss"]).all()
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])


def test_discretized_likelihood_is_a_distribution_over_256_levels():
    levels = torch.linspace(-1, 1, 256)
    logp = discretized_gaussian_log_likelihood(levels, torch.tensor(0.1), torch.tensor(-1.0))
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def _oracle(diffusion, target):
    """The exact noise predictor for data that is always ``target``."""
    abar = diffusion._tables["alphas_cumprod"]

    def model_fn(x, t):
        step = torch.as_tensor(np.searchsorted(diffusion.timesteps, t.numpy()))
        a = abar[step].float().reshape(-1, 1, 1, 1)
        eps = (x - a.sqrt() * target) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    return model_fn


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_recover_a_point_mass(sampler):
    d = create_diffusion("50")
    target = torch.full((1, 1, 4, 4), 0.37)
    noise = torch.randn(3, 1, 4, 4)
    loop = d.p_sample_loop if sampler == "ddpm" else d.ddim_sample_loop
    out = loop(_oracle(d, target), noise)
    torch.testing.assert_close(out, target.expand_as(out), atol=2e-3, rtol=0)


def test_rectified_flow_recovers_a_point_mass_and_trains():
    flow = RectifiedFlow()
    target = torch.full((1, 1, 4, 4), -0.6)
    # The exact velocity for data that is always ``target``: (z - x) / t.
    out = flow.sample(lambda z, t: (z - target) / (t / 1000).reshape(-1, 1, 1, 1), torch.randn(2, 1, 4, 4), num_steps=10)
    torch.testing.assert_close(out, target.expand_as(out), atol=1e-5, rtol=0)
    terms = flow.training_losses(lambda x, t, y: torch.zeros_like(x), torch.rand(3, 1, 4, 4), {"y": None})
    assert terms["loss"].shape == (3,)
