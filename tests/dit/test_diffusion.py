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
    assert space_timesteps(1000, "ddim50").tolist() == list(range(0, 1000, 20))
    # No stride gives 700 steps: they are spread over the whole range, never cut short.
    kept = space_timesteps(1000, "ddim700")
    assert len(kept) == 700 and kept[0] == 0 and kept[-1] == 999
    for bad in (0, 1, 1001, "ddim1"):
        with pytest.raises(ValueError, match="2 to 1000"):
            space_timesteps(1000, bad)


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
    out = flow.sample(
        lambda z, t: (z - target) / (t / 1000).reshape(-1, 1, 1, 1), torch.randn(2, 1, 4, 4), num_steps=10
    )
    torch.testing.assert_close(out, target.expand_as(out), atol=1e-5, rtol=0)
    terms = flow.training_losses(lambda x, t, y: torch.zeros_like(x), torch.rand(3, 1, 4, 4), {"y": None})
    assert terms["loss"].shape == (3,)


# Data x0 ~ N(MU, S^2) per pixel: every quantity of the forward process has a closed form.
MU, S = 0.3, 0.5


def _abar(t: torch.Tensor) -> torch.Tensor:
    """abar at the original (unrespaced) timesteps ``t``, straight from the linear schedule."""
    return torch.from_numpy(np.cumprod(1 - linear_betas(1000)))[t].float().reshape(-1, 1, 1, 1)


def _gaussian_eps(x, t):
    """E[eps | x_t] for Gaussian data: the exact noise predictor."""
    a = _abar(t)
    return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S**2 + 1 - a)


def _assert_gaussian(samples: torch.Tensor, tol: float) -> None:
    assert abs(samples.mean().item() - MU) < tol, samples.mean().item()
    assert abs(samples.std().item() - S) < tol, samples.std().item()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_draw_gaussian_data_with_the_exact_score(sampler):
    """Mean and spread of the samples: a wrong noise scale or DDIM coefficient shifts them."""
    torch.manual_seed(0)
    noise = torch.randn(20000, 1, 1, 1)
    # Enough steps that the discretisation error stays well inside the tolerance.
    if sampler == "ddpm":
        out = create_diffusion(learn_sigma=False).p_sample_loop(_gaussian_eps, noise)
    else:
        out = create_diffusion("ddim250", learn_sigma=False).ddim_sample_loop(_gaussian_eps, noise)
    _assert_gaussian(out, tol=0.015)


def test_learned_sigma_at_minus_one_is_the_posterior_variance():
    d = create_diffusion()
    t = torch.tensor([1, 500, 999])
    x = torch.randn(3, 1, 2, 2)
    out = torch.cat([torch.randn(3, 1, 2, 2), -torch.ones(3, 1, 2, 2)], dim=1)
    betas = linear_betas(1000)
    abar = np.cumprod(1 - betas)
    posterior = betas * (1 - np.append(1.0, abar[:-1])) / (1 - abar)
    logvar = d.p_mean_variance(out, x, t, clip=False)["logvar"]
    np.testing.assert_allclose(logvar[:, 0, 0, 0].numpy(), np.log(posterior[t.numpy()]), rtol=1e-5)
    out[:, 1:] = 1.0  # and at +1 it is beta_t
    logvar = d.p_mean_variance(out, x, t, clip=False)["logvar"]
    np.testing.assert_allclose(logvar[:, 0, 0, 0].numpy(), np.log(betas[t.numpy()]), rtol=1e-5)


def test_rectified_flow_draws_gaussian_data_with_the_exact_velocity():
    def velocity(z, t1000):
        # z = (1-t) x + t eps: E[eps - x | z] from the joint Gaussian of (x, eps, z).
        t = (t1000 / 1000).reshape(-1, 1, 1, 1)
        var = (1 - t) ** 2 * S**2 + t**2
        centred = z - (1 - t) * MU
        return t / var * centred - (MU + (1 - t) * S**2 / var * centred)

    torch.manual_seed(0)
    out = RectifiedFlow().sample(velocity, torch.randn(20000, 1, 1, 1), num_steps=50)
    _assert_gaussian(out, tol=0.015)


def test_the_loss_regresses_the_noise():
    """A model that predicts the drawn noise exactly has zero MSE (regressing x0 would not)."""
    d = create_diffusion(learn_sigma=False)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    terms = d.training_losses(lambda x, t, y: noise.clone(), x0, {"y": None}, noise=noise)
    assert torch.count_nonzero(terms["mse"]) == 0
    flow = RectifiedFlow()
    terms = flow.training_losses(lambda z, t, y: noise - x0, x0, {"y": None}, noise=noise)
    assert torch.count_nonzero(terms["mse"]) == 0


def _vlb_by_hand(x0, xt, eps, v, t):
    """The VLB term in bits, written out from the formulas with numpy and scipy."""
    from scipy.stats import norm

    betas = linear_betas(1000)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    b, a, ap = betas[t], abar[t], abar_prev[t]
    tilde = b * (1 - ap) / (1 - a)
    mean_q = b * np.sqrt(ap) / (1 - a) * x0 + (1 - ap) * np.sqrt(1 - b) / (1 - a) * xt
    log_tilde = np.log(tilde if t > 0 else betas[1] * (1 - abar[0]) / (1 - abar[1]))  # beta~_0 = 0: beta~_1 stands in
    frac = (v + 1) / 2
    var_p = np.exp(frac * np.log(b) + (1 - frac) * log_tilde)
    x0_hat = (xt - np.sqrt(1 - a) * eps) / np.sqrt(a)
    mean_p = b * np.sqrt(ap) / (1 - a) * x0_hat + (1 - ap) * np.sqrt(1 - b) / (1 - a) * xt
    if t == 0:
        sd = np.sqrt(var_p)
        upper = np.where(x0 > 0.999, 1.0, norm.cdf((x0 + 1 / 255 - mean_p) / sd))
        lower = np.where(x0 < -0.999, 0.0, norm.cdf((x0 - 1 / 255 - mean_p) / sd))
        return -np.mean(np.log(upper - lower)) / np.log(2)
    kl = 0.5 * (np.log(var_p / tilde) + tilde / var_p + (mean_q - mean_p) ** 2 / var_p - 1)
    return np.mean(kl) / np.log(2)


@pytest.mark.parametrize("t", [0, 1, 300, 999])
def test_vlb_is_the_decoder_nll_at_step_0_and_the_kl_after(t):
    d = create_diffusion()
    rng = np.random.default_rng(t)
    x0 = rng.integers(0, 256, (1, 1, 4, 4)) / 127.5 - 1
    x0[0, 0, 0, :2] = [-1.0, 1.0]  # the end bins, which take the tails
    noise = rng.normal(size=(1, 1, 4, 4))
    abar = np.cumprod(1 - linear_betas(1000))[t]
    xt = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    eps = noise + 0.3 * rng.normal(size=(1, 1, 4, 4))  # a good but imperfect prediction
    v = rng.uniform(-1, 1, size=(1, 1, 4, 4))
    out = torch.from_numpy(np.concatenate([eps, v], axis=1)).float()
    got = d.vlb_terms(out, torch.from_numpy(x0).float(), torch.from_numpy(xt).float(), torch.tensor([t]))
    assert got.item() == pytest.approx(_vlb_by_hand(x0, xt, eps, v, t), rel=1e-3)


def _velocity(z, t1000):
    """E[eps - x | z_t] for Gaussian data: the exact rectified-flow velocity."""
    t = (t1000 / 1000).reshape(-1, 1, 1, 1)
    var = (1 - t) ** 2 * S**2 + t**2
    centred = z - (1 - t) * MU
    return t / var * centred - (MU + (1 - t) * S**2 / var * centred)


def _ode_error(sample) -> float:
    """How far a deterministic sampler's output law is from N(MU, S^2). With the exact score of
    Gaussian data, its map from noise is affine, ``a z + b``: two points give it, and the law
    ``N(b, a^2)`` exactly, with no Monte Carlo error."""
    out = sample(torch.tensor([0.0, 1.0]).reshape(2, 1, 1, 1)).flatten()
    b, a = out[0].item(), (out[1] - out[0]).item()
    return abs(b - MU) + abs(a - S)


def test_dpm_solver_at_20_steps_beats_ddim_at_20():
    ddim = create_diffusion("ddim20", learn_sigma=False)
    dpm = create_diffusion("logsnr20", learn_sigma=False)
    ddim_error = _ode_error(lambda z: ddim.ddim_sample_loop(_gaussian_eps, z))
    dpm_error = _ode_error(lambda z: dpm.dpm_solver_sample_loop(_gaussian_eps, z))
    assert dpm_error < ddim_error / 4, (dpm_error, ddim_error)
    # And it converges: at 100 steps it is within the fp32 noise of the exact law.
    fine = create_diffusion("logsnr100", learn_sigma=False)
    assert _ode_error(lambda z: fine.dpm_solver_sample_loop(_gaussian_eps, z)) < 2e-3


def test_dpm_solver_first_order_is_ddim():
    """With one step it has no previous prediction: its update is DDIM's (x0 straight out)."""
    d = create_diffusion("ddim2", learn_sigma=False)
    z = torch.randn(4, 1, 2, 2)
    torch.testing.assert_close(d.dpm_solver_sample_loop(_gaussian_eps, z), d.ddim_sample_loop(_gaussian_eps, z))


def test_heun_at_10_steps_beats_euler_at_10():
    flow = RectifiedFlow()
    euler = _ode_error(lambda z: flow.sample(_velocity, z, num_steps=10))
    heun = _ode_error(lambda z: flow.sample(_velocity, z, num_steps=10, method="heun"))
    assert heun < euler / 10, (heun, euler)


def test_time_shift_moves_the_steps_towards_the_noise():
    from dit.diffusion.rectified_flow import shifted_times

    assert torch.equal(shifted_times(8, 1.0), torch.linspace(1.0, 0.0, 9))
    shifted = shifted_times(8, 3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and (shifted[1:-1] > torch.linspace(1.0, 0.0, 9)[1:-1]).all()
    # Shifted steps still integrate the same ODE: Heun stays accurate.
    flow = RectifiedFlow()
    assert _ode_error(lambda z: flow.sample(_velocity, z, num_steps=10, method="heun", time_shift=3.0)) < 0.01


def test_logsnr_steps_are_even_in_log_snr():
    steps = space_timesteps(1000, "logsnr20")
    assert len(steps) == 20 and steps[0] == 0 and steps[-1] == 999 and (np.diff(steps) > 0).all()
    abar = np.cumprod(1 - linear_betas(1000))[steps]
    gaps = np.diff(0.5 * np.log(abar / (1 - abar)))
    # Even, but for the first few, where one step of the 1000 already moves the log-SNR a lot.
    np.testing.assert_allclose(gaps[3:], gaps.mean(), rtol=0.05)
    for count in (2, 50, 500, 1000):  # distinct steps, first and last kept, for any count
        steps = space_timesteps(1000, f"logsnr{count}")
        assert len(steps) == count and steps[0] == 0 and steps[-1] == 999 and (np.diff(steps) > 0).all()
