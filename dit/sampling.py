"""Drawing samples from a trained model: classifier-free guidance, the samplers, image output."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moe_kernels.rules import COEFFICIENT, PROBABILITY, SCALE

from .cli import SEED
from .diffusion import NUM_TIMESTEPS, RectifiedFlow, create_diffusion
from .models import DiT
from .parallel import stream_seed

# The samplers of each objective, the first the default, with their default step counts: DiT's
# 250 DDPM steps, DDIM's 250 (as DiT's script), DPM-Solver++(2M)'s 20, Euler's 50 and Heun's 25
# (50 evaluations, as Euler's 50).
OBJECTIVE_SAMPLERS = {"diffusion": ("ddpm", "ddim", "dpm++2m"), "rectified-flow": ("euler", "heun")}
SAMPLERS = tuple(name for names in OBJECTIVE_SAMPLERS.values() for name in names)
DEFAULT_STEPS = {"ddpm": 250, "ddim": 250, "dpm++2m": 20, "euler": 50, "heun": 25}
# Guidance intervals are fractions of the noise schedule (1 is pure noise, 0 the data); a time
# shift is a positive factor.
TIME, TIME_SHIFT = PROBABILITY, SCALE


def default_sampler(config) -> str:
    return OBJECTIVE_SAMPLERS[config.objective][0]


def default_steps(config, sampler: str | None = None) -> int:
    """Sampling steps when none are asked for (``DEFAULT_STEPS`` of the sampler)."""
    return DEFAULT_STEPS[sampler or default_sampler(config)]


def check_steps(
    config,
    steps: int | None,
    sampler: str | None = None,
    cfg_interval: tuple[float, float] | None = None,
    time_shift: float = 1.0,
) -> tuple[int, str]:
    """The step count and sampler ``generate`` would use for ``config``, or a ``ValueError``
    saying why not (a sampler of the other objective, a bad guidance interval, a time shift for
    a diffusion model among them); cheap, so commands call it before their expensive work."""
    check_interval(cfg_interval)
    TIME_SHIFT.check("time_shift", time_shift)
    if time_shift != 1.0 and config.objective != "rectified-flow":
        raise ValueError("a time shift applies to rectified-flow models; this one was trained with diffusion")
    sampler = default_sampler(config) if sampler is None else sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    fitting = OBJECTIVE_SAMPLERS[config.objective]
    if sampler not in fitting:
        raise ValueError(
            f"sampler {sampler!r} does not fit a model trained with the {config.objective!r} objective; "
            f"it takes {', '.join(fitting)}"
        )
    steps = default_steps(config, sampler) if steps is None else steps
    # A respaced diffusion keeps its first and last timestep, so it needs at least two.
    low, high = (1, None) if config.objective == "rectified-flow" else (2, NUM_TIMESTEPS)
    if steps < low or (high is not None and steps > high):
        raise ValueError(f"{sampler} sampling takes {low}{f' to {high}' if high else ' or more'} steps, got {steps}")
    return steps, sampler


def check_interval(interval: tuple[float, float] | None) -> tuple[float, float] | None:
    """A guidance interval ``(lo, hi)`` with ``0 <= lo <= hi <= 1``, or ``ValueError``."""
    if interval is None:
        return None
    if len(interval) != 2:
        raise ValueError(f"cfg_interval must be (lo, hi), got {interval!r}")
    lo, hi = (TIME.check(name, value) for name, value in zip(("cfg_interval lo", "cfg_interval hi"), interval))
    if lo > hi:
        raise ValueError(f"cfg_interval must have lo <= hi, got ({lo}, {hi})")
    return lo, hi


def guided(
    model: DiT, labels: torch.Tensor, cfg_scale: float, interval: tuple[float, float] | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model as a function of ``(x, t)``, conditioned on ``labels``; with ``cfg_scale != 1``,
    classifier-free guidance: ``uncond + s * (cond - uncond)`` on the predicted channels (the
    learned-variance channels come from the conditional pass).

    ``interval = (lo, hi)`` guides only where the time, ``t / 1000`` (1 = pure noise), lies in
    ``[lo, hi]``, and takes the conditional prediction elsewhere (Kynkäänniemi et al., 2024). The
    choice is made on the device, per sample, so a captured CUDA graph holds for every step.
    """
    interval = check_interval(interval)
    if COEFFICIENT.check("cfg_scale", cfg_scale) == 1.0:
        return lambda x, t: model(x, t, labels)
    if model.config.class_dropout_prob <= 0:
        raise ValueError("classifier-free guidance needs a model trained with class dropout (it has no null class)")
    null = torch.full_like(labels, model.config.num_classes)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
        scale = cfg_scale
        if interval is not None:
            time = (t.float() / NUM_TIMESTEPS).reshape(-1, *[1] * (x.dim() - 1))
            inside = (time >= interval[0]) & (time <= interval[1])
            scale = torch.where(inside, float(cfg_scale), 1.0)  # no host tensor per step
        return guidance(cond, uncond, scale, x.shape[1])

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


class SampleNoise:
    """Gaussian draws ``[N, C, H, W]`` whose row ``j`` comes from sample ``first + j``'s own CPU
    generator (seeded ``stream_seed(seed, first + j)``), moved to ``device``: the starting
    noise, then, for DDPM, each step's. ``dit_sample`` (C++) draws the same."""

    def __init__(self, seed: int, first: int, count: int, shape: tuple[int, ...], device: torch.device):
        self.generators = [torch.Generator().manual_seed(stream_seed(seed, first + j)) for j in range(count)]
        self.shape, self.device = shape, device

    def __call__(self) -> torch.Tensor:
        rows = [torch.randn(self.shape, generator=generator) for generator in self.generators]
        return torch.stack(rows).to(self.device)


@torch.no_grad()
def generate(
    model: DiT,
    labels: torch.Tensor,
    cfg_scale: float = 1.0,
    steps: int | None = None,
    sampler: str | None = None,
    seed: int = 0,
    first_index: int = 0,
    progress: bool = False,
    cuda_graphs: bool = False,
    cfg_interval: tuple[float, float] | None = None,
    time_shift: float = 1.0,
) -> torch.Tensor:
    """Samples ``[N, C, H, W]`` for ``labels [N]``: pixels in about [-1, 1], or latents.

    ``sampler``: for diffusion ``"ddpm"`` (the default; ``steps`` respaced steps), ``"ddim"`` or
    ``"dpm++2m"`` (DPM-Solver++(2M), on steps even in log-SNR); for rectified flow ``"euler"`` (the
    default) or ``"heun"``. A sampler of the other objective is a ``ValueError``. ``steps``
    defaults to ``DEFAULT_STEPS`` of the sampler. Sample ``j`` is the run's sample ``first_index +
    j``: every random draw of it (its starting noise, then DDPM's steps') comes from its own
    generator, seeded by ``seed`` and that index (``SampleNoise``), so a run's samples are the
    same however they are split into batches or processes. ``cfg_interval``: guide only inside this interval
    of times (see ``guided``). ``time_shift``: rectified flow's shift of the steps towards the
    noise (see ``RectifiedFlow.sample``). ``cuda_graphs``: run each guided network evaluation as a
    replayed CUDA graph (CUDA only).
    """
    config = model.config
    steps, sampler = check_steps(config, steps, sampler, cfg_interval, time_shift)
    SEED.check("seed", seed)
    if not 0 <= first_index <= SEED.high + 1 - labels.shape[0]:
        raise ValueError(f"first_index must keep the sample indices in [0, 2**32), got {first_index}")
    device = next(model.parameters()).device
    draws = SampleNoise(
        seed, first_index, labels.shape[0], (config.in_channels, config.input_size, config.input_size), device
    )
    noise = draws()
    model_fn = guided(model, labels.to(device), cfg_scale, cfg_interval)
    if cuda_graphs:
        model_fn = cuda_graphed(model_fn)
    if config.objective == "rectified-flow":
        return RectifiedFlow().sample(
            model_fn, noise, num_steps=steps, progress=progress, method=sampler, time_shift=time_shift
        )
    # Pixels live in [-1, 1], so clipping the predicted x0 helps; latents have no such bound.
    clip = not config.latent
    if sampler == "ddim":
        diffusion = create_diffusion(f"ddim{steps}", learn_sigma=config.learn_sigma)
        return diffusion.ddim_sample_loop(model_fn, noise, clip=clip, progress=progress)
    if sampler == "dpm++2m":
        # Steps even in log-SNR, where the multistep extrapolation's step ratio is 1.
        diffusion = create_diffusion(f"logsnr{steps}", learn_sigma=config.learn_sigma)
        return diffusion.dpm_solver_sample_loop(model_fn, noise, clip=clip, progress=progress)
    diffusion = create_diffusion(str(steps), learn_sigma=config.learn_sigma)
    return diffusion.p_sample_loop(model_fn, noise, clip=clip, progress=progress, step_noise=draws)


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
