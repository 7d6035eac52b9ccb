"""Rectified flow: straight paths ``z_t = (1 - t) x + t eps`` from data (t=0) to noise (t=1).

The model predicts the velocity ``dz/dt = eps - x``; training draws ``t`` from the logit-normal
``sigmoid(N(0, 1))``; sampling integrates from ``t = 1`` to ``t = 0`` with Euler steps. The
model sees ``1000 t`` as its timestep, the scale of the diffusion timesteps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .gaussian import mean_flat

TIME_SCALE = 1000.0


class RectifiedFlow:
    def sample_times(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` training times in (0, 1), logit-normal."""
        drawn_by = {} if generator is None else {"generator": generator}  # as GaussianDiffusion.sample_times
        return torch.sigmoid(torch.randn(n, device=device, **drawn_by))

    def training_losses(
        self,
        model: Callable,
        x0: torch.Tensor,
        model_kwargs: dict,
        noise: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
    ) -> dict:
        """Per-sample velocity losses at drawn times (or at ``t``)."""
        t = self.sample_times(x0.shape[0], x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        t_ = t.reshape(-1, *([1] * (x0.dim() - 1)))
        zt = (1 - t_) * x0 + t_ * noise
        velocity = model(zt, t * TIME_SCALE, **model_kwargs).float()[:, : x0.shape[1]]
        mse = mean_flat((velocity - (noise - x0)) ** 2)
        return {"loss": mse, "mse": mse}

    @torch.no_grad()
    def sample(
        self, model_fn: Callable, noise: torch.Tensor, num_steps: int = 50, progress: bool = False
    ) -> torch.Tensor:
        """Euler integration of ``dz/dt = v(z, t)`` from ``t = 1`` (noise) to ``t = 0``."""
        z = noise
        times = torch.linspace(1.0, 0.0, num_steps + 1, device=noise.device)
        steps = range(num_steps)
        for i in tqdm(steps, desc="sampling", leave=False) if progress else steps:
            t = times[i].expand(z.shape[0])
            velocity = model_fn(z, t * TIME_SCALE)[:, : z.shape[1]]
            z = z + (times[i + 1] - times[i]) * velocity
        return z
