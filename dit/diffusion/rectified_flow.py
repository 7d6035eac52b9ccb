"""Rectified flow: straight paths ``z_t = (1 - t) x + t eps`` from data (t=0) to noise (t=1).

The model predicts the velocity ``dz/dt = eps - x``; training draws ``t`` from the logit-normal
``sigmoid(N(0, 1))``; sampling integrates from ``t = 1`` to ``t = 0`` with Euler or Heun steps. The
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
        """Per-sample velocity losses at drawn times (or at ``t``); ``target``, the velocity ``noise - x0``."""
        t = self.sample_times(x0.shape[0], x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        t_ = t.reshape(-1, *([1] * (x0.dim() - 1)))
        zt = (1 - t_) * x0 + t_ * noise
        velocity = model(zt, t * TIME_SCALE, **model_kwargs).float()[:, : x0.shape[1]]
        target = noise - x0
        mse = mean_flat((velocity - target) ** 2)
        return {"loss": mse, "mse": mse, "target": target}

    @torch.no_grad()
    def sample(
        self,
        model_fn: Callable,
        noise: torch.Tensor,
        num_steps: int = 50,
        progress: bool = False,
        method: str = "euler",
        time_shift: float = 1.0,
    ) -> torch.Tensor:
        """Integrate ``dz/dt = v(z, t)`` from ``t = 1`` (noise) to ``t = 0`` in ``num_steps`` steps.

        ``method``: ``"euler"`` (one evaluation a step) or ``"heun"`` (Heun's second-order
        method, as EDM samples: an Euler step, then the mean of the velocities at both ends; two
        evaluations a step). ``time_shift`` ``s`` moves the steps towards the noise,
        ``t -> s t / (1 + (s - 1) t)`` (SD3's shift for high resolutions; 1 keeps them even).
        """
        z = noise
        times = shifted_times(num_steps, time_shift, noise.device)
        steps = range(num_steps)
        for i in tqdm(steps, desc="sampling", leave=False) if progress else steps:
            dt = times[i + 1] - times[i]
            velocity = self.velocity(model_fn, z, times[i])
            if method == "heun":
                velocity = (velocity + self.velocity(model_fn, z + dt * velocity, times[i + 1])) / 2
            z = z + dt * velocity
        return z

    @staticmethod
    def velocity(model_fn: Callable, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model_fn(z, (t * TIME_SCALE).expand(z.shape[0]))[:, : z.shape[1]]


def shifted_times(num_steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """``num_steps + 1`` times from 1 to 0, even when ``shift`` is 1, else ``s t / (1 + (s - 1) t)``."""
    times = torch.linspace(1.0, 0.0, num_steps + 1, device=device)
    return shift * times / (1 + (shift - 1) * times)
