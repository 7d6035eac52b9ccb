"""Drawing samples from a trained model: classifier-free guidance, the samplers, image output."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moe_kernels.validation import COEFFICIENT

from .diffusion import NUM_TIMESTEPS, RectifiedFlow, create_diffusion
from .models import DiT

SAMPLERS = ("ddpm", "ddim", "euler")


def default_steps(config) -> int:
    """Sampling steps when none are asked for: DiT's 250 DDPM steps, or 50 Euler steps."""
    return 50 if config.objective == "rectified-flow" else 250


def check_steps(config, steps: int | None, sampler: str | None = None) -> tuple[int, str]:
    """The step count and sampler ``generate`` would use for ``config``, or a ``ValueError``
    saying why not; cheap, so commands call it before their expensive work."""
    steps = default_steps(config) if steps is None else steps
    if sampler is None:
        sampler = "euler" if config.objective == "rectified-flow" else "ddpm"
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if (sampler == "euler") != (config.objective == "rectified-flow"):
        raise ValueError(f"sampler {sampler!r} does not fit a model trained with the {config.objective!r} objective")
    # A respaced diffusion keeps its first and last timestep, so it needs at least two.
    low, high = (1, None) if sampler == "euler" else (2, NUM_TIMESTEPS)
    if steps < low or (high is not None and steps > high):
        raise ValueError(f"{sampler} sampling takes {low}{f' to {high}' if high else ' or more'} steps, got {steps}")
    return steps, sampler


def guided(model: DiT, labels: torch.Tensor, cfg_scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model as a function of ``(x, t)``, conditioned on ``labels``; with ``cfg_scale != 1``,
    classifier-free guidance: ``uncond + s * (cond - uncond)`` on the predicted channels (the
    learned-variance channels come from the conditional pass)."""
    if COEFFICIENT.check("cfg_scale", cfg_scale) == 1.0:
        return lambda x, t: model(x, t, labels)
    if model.config.class_dropout_prob <= 0:
        raise ValueError("classifier-free guidance needs a model trained with class dropout (it has no null class)")
    null = torch.full_like(labels, model.config.num_classes)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
        return guidance(cond, uncond, cfg_scale, x.shape[1])

    return model_fn


def guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor, channels: int) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)`` on the first ``channels`` (the prediction); the
    learned-variance channels after them come from the conditional pass."""
    eps = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([eps, cond[:, channels:]], dim=1)


class GuidedDenoiser(nn.Module):
    """One network evaluation with classifier-free guidance as a module, ``forward(x [N, C, H,
    W], t [N], y [N]) -> [N, C or 2C, H, W]``: what ``torch.export`` and AOTInductor package for
    a sampler that runs without Python."""

    def __init__(self, model: DiT, cfg_scale: float):
        super().__init__()
        self.model, self.cfg_scale = model, cfg_scale

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return guided(self.model, y, self.cfg_scale)(x, t)


def cuda_graphed(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``model_fn`` captured in a CUDA graph on its first call and replayed on every later one,
    so a denoising step costs one graph launch instead of hundreds of kernel launches.

    The first call warms up on a side stream (the Triton autotuner benchmarks there, outside the
    capture), then captures. Later calls must have the first call's shapes; their inputs are
    copied into the graph's static buffers, and the output returned is the graph's static output,
    valid until the next call (the samplers use it before calling again).
    """
    state = {}

    def replay(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not state:
            if x.device.type != "cuda":
                raise ValueError("CUDA graphs need the model on a CUDA device")
            static_x, static_t = x.clone(), t.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    model_fn(static_x, static_t)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = model_fn(static_x, static_t)
            state.update(graph=graph, x=static_x, t=static_t, out=static_out)
        state["x"].copy_(x)
        state["t"].copy_(t)
        state["graph"].replay()
        return state["out"]

    return replay


@torch.no_grad()
def generate(
    model: DiT,
    labels: torch.Tensor,
    cfg_scale: float = 1.0,
    steps: int | None = None,
    sampler: str | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    cuda_graphs: bool = False,
) -> torch.Tensor:
    """Samples ``[N, C, H, W]`` for ``labels [N]``: pixels in about [-1, 1], or latents.

    ``sampler``: ``"ddpm"`` (default for diffusion; ``steps`` respaced steps), ``"ddim"``, or
    ``"euler"`` (rectified flow, the only one it takes). ``steps`` defaults to ``default_steps``.
    Every random draw follows from ``generator`` (a CPU generator; default: the global one): the
    initial noise, then for DDPM the seed of the steps' noise (``dit_sample`` draws alike).
    ``cuda_graphs``: run each guided network evaluation as a replayed CUDA graph (CUDA only).
    """
    config = model.config
    steps, sampler = check_steps(config, steps, sampler)
    device = next(model.parameters()).device
    shape = (labels.shape[0], config.in_channels, config.input_size, config.input_size)
    noise = torch.randn(shape, generator=generator, device="cpu").to(device)
    model_fn = guided(model, labels.to(device), cfg_scale)
    if cuda_graphs:
        model_fn = cuda_graphed(model_fn)
    if sampler == "euler":
        return RectifiedFlow().sample(model_fn, noise, num_steps=steps, progress=progress)
    # Pixels live in [-1, 1], so clipping the predicted x0 helps; latents have no such bound.
    clip = not config.latent
    if sampler == "ddim":
        diffusion = create_diffusion(f"ddim{steps}", learn_sigma=config.learn_sigma)
        return diffusion.ddim_sample_loop(model_fn, noise, clip=clip, progress=progress)
    diffusion = create_diffusion(str(steps), learn_sigma=config.learn_sigma)
    # The steps' noise comes from a generator on the model's device, seeded by one draw from
    # ``generator``: reproducible from the seed, with no copy from the host per step.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    step_noise = torch.Generator(device).manual_seed(seed)
    return diffusion.p_sample_loop(model_fn, noise, clip=clip, progress=progress, generator=step_noise)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, C]``."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, path: str | Path, nrow: int, min_side: int = 64) -> None:
    """Tile uint8 ``[N, H, W, C]`` images into a PNG of ``nrow`` per row; small images are
    enlarged (nearest neighbour) to at least ``min_side`` pixels so they can be seen."""
    from PIL import Image

    n, h, w, c = images.shape
    scale = max(1, -(-min_side // max(h, w)))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    rows = -(-n // nrow)
    pad = 2
    grid = np.full((rows * (h * scale + pad) + pad, nrow * (w * scale + pad) + pad, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h * scale + pad), pad + col * (w * scale + pad)
        grid[top : top + h * scale, left : left + w * scale] = image
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
