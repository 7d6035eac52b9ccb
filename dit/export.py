"""Export a checkpoint for sampling without Python: ``python -m dit.export``.

    python -m dit.export --ckpt RUN/checkpoints/0001500 --out model.pt2 --batch 8 --cfg

writes an AOTInductor package of one denoising evaluation at a fixed batch,
``forward(x [B, C, H, W], t [B], y [B], scale [1]) -> [B, C or 2C, H, W]``: with ``--cfg``, the
conditional and unconditional passes in one call, combined with the guidance ``scale`` given at
run time (1 means none); without it, the conditional pass alone (``scale`` unused). The package
metadata holds what a sampler needs besides: the objective and, for diffusion, the cumulative
alphas of the 1000-step schedule, plus the image shape, the classes and the batch. The C++
sampler (``CMakeLists.txt``, ``csrc/``) reads both.

The exported graph keeps the ``moe_kernels`` custom ops (``topk_gating``, ``sort_by_expert``,
``experts``; ``expert_choice_gating`` for expert choice) as calls by name: a program that loads
the package must have them registered, which the Python package does on import and
``csrc/moe_ops.cpp`` does for C++.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moe_kernels import ROUTERS

from .checkpoint import build_from_checkpoint
from .cli import positive_int
from .diffusion import NUM_TIMESTEPS, linear_betas
from .files import check_writable
from .models import DiT
from .sampling import guidance

# The package format the C++ sampler reads. 2: the experts run as moe_kernels::sort_by_expert and
# moe_kernels::experts (1, before routers were plug-ins: moe_kernels::moe_ffn and expert_choice_ffn).
FORMAT = "dit-moe-denoiser/2"


class Denoiser(nn.Module):
    """One network evaluation, guided at a run-time ``scale`` if ``cfg``:
    ``forward(x [B, C, H, W], t [B], y [B], scale [1]) -> [B, C or 2C, H, W]``."""

    def __init__(self, model: DiT, cfg: bool):
        super().__init__()
        if cfg and model.config.class_dropout_prob <= 0:
            raise ValueError("--cfg needs a model trained with class dropout (it has no null class)")
        self.model, self.cfg = model, cfg

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if not self.cfg:
            return self.model(x, t, y)
        null = torch.full_like(y, self.model.config.num_classes)
        cond, uncond = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return guidance(cond, uncond, scale, x.shape[1])


def metadata(model: DiT, batch: int, cfg: bool) -> dict[str, str]:
    """What a sampler needs besides the network, as the strings package metadata holds."""
    config = model.config
    values = {
        "format": FORMAT,
        "objective": config.objective,
        "batch": batch,
        "cfg": int(cfg),
        "in_channels": config.in_channels,
        "input_size": config.input_size,
        "num_classes": config.num_classes,
        "learn_sigma": int(config.learn_sigma),
        "latent": int(config.latent),
        "device": next(model.parameters()).device.type,
    }
    if config.objective == "diffusion":
        values["alphas_cumprod"] = ",".join(repr(float(a)) for a in np.cumprod(1.0 - linear_betas(NUM_TIMESTEPS)))
    return {key: str(value) for key, value in values.items()}


def export(model: DiT, out: Path, batch: int, cfg: bool) -> Path:
    """Export ``model`` (eval mode, on its device) as an AOTInductor package at ``out``."""
    device = next(model.parameters()).device
    config = model.config
    if ROUTERS[config.router].route_inputs:
        raise ValueError(
            f"dit.export cannot package a model routed by {config.router}: its routing reads the class labels, "
            "which the package's ops do not pass to it"
        )
    if not ROUTERS[config.router].static_shapes:
        # Its inference dispatch has a data-dependent row count, which AOTInductor cannot size.
        raise ValueError(
            f"dit.export cannot package a model routed by {config.router}: its experts' token counts are data-dependent"
        )
    example = (
        torch.randn(batch, config.in_channels, config.input_size, config.input_size, device=device),
        torch.full((batch,), 500.0, device=device),
        torch.zeros(batch, dtype=torch.int64, device=device),
        torch.ones(1, device=device),
    )
    with torch.no_grad(), warnings.catch_warnings():
        # MoE keeps its last routing statistics as attributes, which export warns about; the
        # exported network needs none of them.
        warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
        exported = torch.export.export(Denoiser(model.eval(), cfg), example)
    torch._inductor.aoti_compile_and_package(
        exported, package_path=str(out), inductor_configs={"aot_inductor.metadata": metadata(model, batch, cfg)}
    )
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dit.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", required=True, help="a checkpoint directory (its EMA weights) or a .safetensors file")
    p.add_argument("--out", required=True, help="the .pt2 package to write")
    p.add_argument("--batch", type=positive_int, default=1, help="images per network evaluation (fixed in the package)")
    p.add_argument("--cfg", action="store_true", help="classifier-free guidance inside the package, its scale an input")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the package runs")
    return p


def check_device(text: str) -> torch.device:
    """The device ``--device`` names, if a package can be built for it here."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r} is not a device: give cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"--device {text}: packages run on cpu or cuda")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {text}: this machine has no CUDA device (export on the machine that will run it)")
    if (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {text}: there is no such GPU ({torch.cuda.device_count()} visible)")
    return device


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        out = check_writable(args.out, "--out", {"--ckpt": args.ckpt})
        if out.suffix != ".pt2":
            raise ValueError(f"--out must end in .pt2 (an AOTInductor package), got {out}")
        device = check_device(args.device)
        model = build_from_checkpoint(args.ckpt, moe_backend="auto").to(device)
        start = time.perf_counter()
        export(model, out, args.batch, args.cfg)
        print(
            f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.0f} s: "
            f"{model.config.name}, batch {args.batch}, {'guided' if args.cfg else 'unguided'}, {args.device}",
            file=sys.stderr,
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error


if __name__ == "__main__":
    main()
