"""Gaussian diffusion (DDPM) with a learned-range variance and the hybrid loss.

Forward process: ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` with ``abar_t =
prod_{s<=t} (1 - beta_s)``. The model predicts the noise ``eps`` and, when it learns sigma, a
second set of channels ``v`` in [-1, 1] that interpolates the reverse variance in log space
between the posterior variance ``beta~_t`` and ``beta_t`` (Nichol & Dhariwal, 2021). The loss is
``MSE(eps) + L_vlb``, where the VLB term sees the predicted mean with its gradient stopped, so
it trains only the variance.

A diffusion may be respaced: it then runs on a subset of the original timesteps, with betas
recomputed so that ``abar`` is unchanged on the kept steps, and the model is always called with
the original timestep indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .losses import discretized_gaussian_log_likelihood, normal_kl

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NUM_TIMESTEPS = 1000  # DiT's diffusion length


def linear_betas(num_steps: int = 1000, start: float = 1e-4, end: float = 2e-2) -> np.ndarray:
    """DDPM's linear schedule, stretched so that any ``num_steps`` covers the same noise range."""
    scale = 1000 / num_steps
    return np.linspace(scale * start, scale * end, num_steps, dtype=np.float64)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


class GaussianDiffusion:
    """DDPM over ``len(betas)`` steps; ``timesteps[i]`` is the model timestep of step ``i``."""

    def __init__(self, betas: np.ndarray, learn_sigma: bool = True, timesteps: np.ndarray | None = None):
        self.learn_sigma = learn_sigma
        self.num_steps = len(betas)
        self.timesteps = np.arange(self.num_steps) if timesteps is None else np.asarray(timesteps)
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        tables = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
            "posterior_variance": posterior_variance,
            # beta~_0 is 0: borrow beta~_1 so the log stays finite.
            "posterior_log_variance": np.log(np.append(posterior_variance[1], posterior_variance[1:])),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
            "log_betas": np.log(betas),
        }
        self._tables = {name: torch.from_numpy(values) for name, values in tables.items()}

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at steps ``t [N]``, shaped to broadcast against ``like [N, ...]``."""
        values = self._tables[name].to(t.device)[t].float()
        return values.reshape(-1, *([1] * (like.dim() - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.timesteps, device=t.device)[t]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at("sqrt_alphas_cumprod", t, x0) * x0 + self._at("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of ``q(x_{t-1} | x_t, x_0)``."""
        mean = self._at("posterior_mean_coef1", t, xt) * x0 + self._at("posterior_mean_coef2", t, xt) * xt
        return mean, self._at("posterior_log_variance", t, xt)

    def p_mean_variance(self, model_out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip: bool) -> dict:
        """The reverse step ``p(x_{t-1} | x_t)`` from the model's output."""
        channels = xt.shape[1]
        eps = model_out[:, :channels]
        if self.learn_sigma:
            frac = (model_out[:, channels:] + 1) / 2
            logvar = frac * self._at("log_betas", t, xt) + (1 - frac) * self._at("posterior_log_variance", t, xt)
        else:
            logvar = self._at("posterior_log_variance", t, xt).expand_as(xt)
        pred_x0 = (
            self._at("sqrt_recip_alphas_cumprod", t, xt) * xt - self._at("sqrt_recipm1_alphas_cumprod", t, xt) * eps
        )
        if clip:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _ = self.q_posterior(pred_x0, xt, t)
        return {"mean": mean, "logvar": logvar, "pred_x0": pred_x0, "eps": eps}

    def sample_times(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` training timesteps, uniform over the steps."""
        # torch.compile (2.13) cannot trace an explicit generator=None with a symbolic size.
        drawn_by = {} if generator is None else {"generator": generator}
        return torch.randint(0, self.num_steps, (n,), device=device, **drawn_by)

    def training_losses(
        self,
        model: Callable,
        x0: torch.Tensor,
        model_kwargs: dict,
        noise: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
    ) -> dict:
        """Per-sample losses at uniformly drawn steps (or at ``t``): ``loss = mse (+ vb when sigma is
        learned)``; ``target``, the noise the model's first channels regress."""
        t = self.sample_times(x0.shape[0], x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, t, noise)
        out = model(xt, self.model_timesteps(t), **model_kwargs).float()
        channels = x0.shape[1]
        terms = {"mse": mean_flat((noise - out[:, :channels]) ** 2), "target": noise}
        terms["loss"] = terms["mse"]
        if self.learn_sigma:
            frozen = torch.cat([out[:, :channels].detach(), out[:, channels:]], dim=1)
            terms["vb"] = self.vlb_terms(frozen, x0, xt, t)
            terms["loss"] = terms["mse"] + terms["vb"]
        return terms

    def vlb_terms(self, model_out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The VLB term in bits per dimension: a KL for ``t > 0``, the decoder NLL at ``t = 0``."""
        true_mean, true_logvar = self.q_posterior(x0, xt, t)
        p = self.p_mean_variance(model_out, xt, t, clip=False)
        kl = mean_flat(normal_kl(true_mean, true_logvar, p["mean"], p["logvar"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["logvar"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def _loop(self, progress: bool):
        steps = range(self.num_steps - 1, -1, -1)
        return tqdm(steps, desc="sampling", leave=False) if progress else steps

    @torch.no_grad()
    def p_sample_loop(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        clip: bool = False,
        progress: bool = False,
        step_noise: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Ancestral (DDPM) sampling from ``x_T = noise``; each step's noise comes from
        ``step_noise()`` (default: the global generator)."""
        x = noise
        for i in self._loop(progress):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            p = self.p_mean_variance(model_fn(x, self.model_timesteps(t)), x, t, clip)
            if i > 0:
                z = torch.randn_like(x) if step_noise is None else step_noise()
                x = p["mean"] + torch.exp(0.5 * p["logvar"]) * z
            else:
                x = p["mean"]
        return x

    @torch.no_grad()
    def ddim_sample_loop(
        self, model_fn: ModelFn, noise: torch.Tensor, eta: float = 0.0, clip: bool = False, progress: bool = False
    ) -> torch.Tensor:
        """DDIM sampling (deterministic for ``eta = 0``) from ``x_T = noise``."""
        x = noise
        for i in self._loop(progress):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            p = self.p_mean_variance(model_fn(x, self.model_timesteps(t)), x, t, clip)
            # Recompute eps from the (possibly clipped) x0 so the update stays consistent.
            eps = (self._at("sqrt_recip_alphas_cumprod", t, x) * x - p["pred_x0"]) / self._at(
                "sqrt_recipm1_alphas_cumprod", t, x
            )
            abar, abar_prev = self._at("alphas_cumprod", t, x), self._at("alphas_cumprod_prev", t, x)
            sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
            x = torch.sqrt(abar_prev) * p["pred_x0"] + torch.sqrt(1 - abar_prev - sigma**2) * eps
            if i > 0:
                x = x + sigma * torch.randn_like(x)
        return x

    @torch.no_grad()
    def dpm_solver_sample_loop(
        self, model_fn: ModelFn, noise: torch.Tensor, clip: bool = False, progress: bool = False
    ) -> torch.Tensor:
        """DPM-Solver++(2M) (Lu et al., 2022): the probability-flow ODE in data prediction,
        second order from the previous step's ``x0``, one network evaluation per step.

        In half-log-SNR ``lambda = log(alpha / sigma)``, with ``h = lambda_next - lambda``, a step
        is ``x_next = (sigma_next / sigma) x - alpha_next (exp(-h) - 1) D``: ``D = x0`` is DDIM,
        ``D = x0 + (x0 - x0_prev) / (2r)`` with ``r = h_prev / h`` the second-order update. The
        last step, to the clean data (``sigma = 0``, ``h`` infinite), is first order: ``x0``.
        """
        x = noise
        x0_prev = h_prev = None
        for i in self._loop(progress):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            x0 = self.p_mean_variance(model_fn(x, self.model_timesteps(t)), x, t, clip)["pred_x0"]
            abar, abar_next = (float(self._tables[name][i]) for name in ("alphas_cumprod", "alphas_cumprod_prev"))
            if abar_next >= 1.0:
                return x0
            (alpha, sigma), (alpha_next, sigma_next) = ((math.sqrt(a), math.sqrt(1 - a)) for a in (abar, abar_next))
            h = math.log(alpha_next / sigma_next) - math.log(alpha / sigma)
            D = x0 if x0_prev is None else x0 + (x0 - x0_prev) * (h / (2 * h_prev))
            x = (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * D
            x0_prev, h_prev = x0, h
        return x


def space_timesteps(num_steps: int, spacing: str | int) -> np.ndarray:
    """The steps a respaced diffusion keeps: ``"250"`` (or 250) spreads 250 steps evenly over
    ``[0, num_steps)``, first and last included; ``"ddim50"`` takes every i-th step from 0 with
    the stride i that gives exactly 50 (as IDDPM does), or spreads them evenly when no stride
    does; ``"logsnr20"`` spreads 20 evenly in log-SNR, first and last included."""
    text = str(spacing)
    count = int(text.removeprefix("ddim").removeprefix("logsnr"))
    # One kept step would be t = 0 alone: no noise level to start from.
    if not 2 <= count <= num_steps:
        raise ValueError(f"a respaced diffusion takes 2 to {num_steps} steps, got {count}")
    if text.startswith("ddim"):
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == count:
                return np.arange(0, num_steps, stride)
    if text.startswith("logsnr"):
        return _logsnr_steps(num_steps, count)
    return np.unique(np.round(np.linspace(0, num_steps - 1, count)).astype(np.int64))


def _logsnr_steps(num_steps: int, count: int) -> np.ndarray:
    """``count`` steps from the last to the first, even in half-log-SNR ``log(alpha / sigma)``:
    the grid DPM-Solver++ takes for its multistep extrapolation, whose step ratio is then 1. Each
    is the nearest original step, moved up where two would coincide (near t = 0, where the
    log-SNR changes fastest)."""
    abar = np.cumprod(1.0 - linear_betas(num_steps))
    lam = 0.5 * np.log(abar / (1.0 - abar))  # decreasing in t
    targets = np.linspace(lam[0], lam[-1], count)
    steps = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1)
    for i in range(1, count):
        steps[i] = max(steps[i], steps[i - 1] + 1)
    return np.minimum(steps, num_steps - count + np.arange(count))


def create_diffusion(
    timestep_respacing: str | int | None = None, num_steps: int = NUM_TIMESTEPS, learn_sigma: bool = True
) -> GaussianDiffusion:
    """DiT's diffusion: ``num_steps`` linear-beta steps, optionally respaced (e.g. ``"250"``)."""
    betas = linear_betas(num_steps)
    if timestep_respacing in (None, "", num_steps, str(num_steps)):
        return GaussianDiffusion(betas, learn_sigma)
    kept = space_timesteps(num_steps, timestep_respacing)
    alphas_cumprod = np.cumprod(1.0 - betas)[kept]
    new_betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
    return GaussianDiffusion(new_betas, learn_sigma, timesteps=kept)
