"""DiT-MoE (Fei et al., 2024, "Scaling Diffusion Transformers to 16 Billion Parameters") on
``moe_kernels``: the model, Gaussian diffusion and rectified flow, trainer, sampler, converter."""

from .models import DiT, create_model, model_names

__all__ = ["DiT", "create_model", "model_names"]
