"""Gaussian diffusion (DDPM/DDIM, learned sigma, hybrid loss, respacing) and rectified flow."""

from .gaussian import GaussianDiffusion, create_diffusion, linear_betas, space_timesteps
from .rectified_flow import RectifiedFlow

__all__ = ["GaussianDiffusion", "RectifiedFlow", "create_diffusion", "linear_betas", "space_timesteps"]
