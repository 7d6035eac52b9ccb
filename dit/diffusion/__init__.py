"""Gaussian diffusion (DDPM/DDIM, learned sigma, hybrid loss, respacing) and rectified flow."""

from .gaussian import NUM_TIMESTEPS, GaussianDiffusion, create_diffusion, linear_betas, space_timesteps
from .rectified_flow import RectifiedFlow

__all__ = ["NUM_TIMESTEPS", "GaussianDiffusion", "RectifiedFlow", "create_diffusion", "linear_betas", "space_timesteps"]
