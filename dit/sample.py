"""Sample from a checkpoint: ``python -m dit.sample --ckpt PATH --num-samples N --out FILE.npz``.

Uses the EMA weights. The ``.npz`` holds ``arr_0``, uint8 ``[N, H, W, C]`` images (the ADM
evaluator's layout; C is the model's channel count, 1 for the digits), and ``arr_1``, the int64
class labels, spread evenly over the classes unless ``--class`` is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from moe_kernels.backend import BACKENDS

from .checkpoint import build_from_checkpoint
from .data import decode, load_vae
from .precision import add_precision_argument, use_precision
from .sampling import SAMPLERS, default_steps, generate, save_grid, to_uint8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dit.sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint directory (its EMA weights are used) or a .safetensors file")
    p.add_argument("--num-samples", type=int, default=100)
    p.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 250 for diffusion, 50 for rectified flow)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: ddpm for diffusion, euler for rectified flow")
    p.add_argument("--out", default="samples.npz")
    p.add_argument("--grid", default=None, help="also write a PNG grid of the samples")
    p.add_argument("--class", dest="class_label", type=int, default=None, help="sample only this class")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL, to decode a latent model's samples")
    p.add_argument("--moe-backend", choices=BACKENDS, default="auto")
    add_precision_argument(p)
    return p.parse_args(argv)


def sample(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    model = build_from_checkpoint(args.ckpt, "ema", moe_backend=args.moe_backend).to(device).eval()
    config = model.config
    if args.class_label is not None and not 0 <= args.class_label < config.num_classes:
        raise ValueError(f"--class must be in [0, {config.num_classes}), got {args.class_label}")
    if config.latent and args.vae is None:
        raise ValueError("this model generates VAE latents: pass --vae with the autoencoder it was trained with")
    vae = load_vae(args.vae, device) if args.vae else None
    if args.class_label is None:
        labels = torch.arange(args.num_samples) % config.num_classes
    else:
        labels = torch.full((args.num_samples,), args.class_label)
    steps = args.steps or default_steps(config)
    generator = torch.Generator().manual_seed(args.seed)
    precision = use_precision(args.precision, device)
    images = []
    for chunk in tqdm(labels.split(args.batch_size), desc="batches", disable=len(labels) <= args.batch_size):
        with precision:
            out = generate(model, chunk, args.cfg_scale, steps, args.sampler, generator=generator, progress=True)
        images.append(to_uint8(decode(vae, out) if vae is not None else out))
    arr = np.concatenate(images)
    labels_np = labels.numpy().astype(np.int64)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out_path, arr_0=arr, arr_1=labels_np)
    if args.grid:
        save_grid(arr, args.grid, nrow=min(config.num_classes, 16) if args.class_label is None else 10)
    return arr, labels_np


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        arr, _ = sample(args)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    print(f"wrote {arr.shape[0]} samples of shape {arr.shape[1:]} to {args.out}" + (f" and a grid to {args.grid}" if args.grid else ""))


if __name__ == "__main__":
    main()
