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

from .checkpoint import build_from_checkpoint
from .cli import (
    add_moe_backend_argument,
    check_writable,
    coefficient,
    nonnegative_int,
    positive_int,
    replace_atomically,
    seed,
)
from .data import decode, load_vae
from .precision import add_precision_argument, inference_weights, use_precision
from .sampling import SAMPLERS, check_steps, generate, save_grid, to_uint8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dit.sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--ckpt", required=True, help="a checkpoint directory (its EMA weights are used) or a .safetensors file"
    )
    p.add_argument("--num-samples", type=positive_int, default=100)
    p.add_argument("--cfg-scale", type=coefficient, default=4.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="sampling steps (default 250 for diffusion, 50 for rectified flow)",
    )
    p.add_argument(
        "--sampler", choices=SAMPLERS, default=None, help="default: ddpm for diffusion, euler for rectified flow"
    )
    p.add_argument("--out", default="samples.npz", help="output .npz (the suffix is added if missing)")
    p.add_argument("--grid", default=None, help="also write a PNG grid of the samples (.png is added if missing)")
    p.add_argument("--class", dest="class_label", type=nonnegative_int, default=None, help="sample only this class")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL, to decode a latent model's samples")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (one graph; the first batch pays the compile time)",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="capture one guided denoising step in a CUDA graph and replay it (CUDA only)",
    )
    add_moe_backend_argument(p)
    add_precision_argument(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    # np.savez adds ".npz" to any other name: say so up front, and report the file really written.
    if Path(args.out).suffix != ".npz":
        args.out = args.out + ".npz"
    if args.grid and Path(args.grid).suffix.lower() != ".png":
        args.grid = args.grid + ".png"
    return args


def sample(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.cuda_graphs and device.type != "cuda":
        raise ValueError("--cuda-graphs needs a CUDA device; none is available")
    out_path = check_writable(args.out, "--out")
    grid_path = check_writable(args.grid, "--grid") if args.grid else None
    model = build_from_checkpoint(args.ckpt, "ema", moe_backend=args.moe_backend).to(device).eval()
    inference_weights(model, args.precision)
    config = model.config
    steps, sampler = check_steps(config, args.steps, args.sampler)
    if args.class_label is not None and not 0 <= args.class_label < config.num_classes:
        raise ValueError(f"--class must be in [0, {config.num_classes}), got {args.class_label}")
    if config.latent and args.vae is None:
        raise ValueError("this model generates VAE latents: pass --vae with the autoencoder it was trained with")
    vae = load_vae(args.vae, device) if args.vae else None
    if args.compile:
        model.compile(fullgraph=True)
    if args.class_label is None:
        labels = torch.arange(args.num_samples) % config.num_classes
    else:
        labels = torch.full((args.num_samples,), args.class_label)
    generator = torch.Generator().manual_seed(args.seed)
    images = []
    with use_precision(args.precision, device):
        for chunk in tqdm(labels.split(args.batch_size), desc="batches", disable=len(labels) <= args.batch_size):
            out = generate(
                model,
                chunk,
                args.cfg_scale,
                steps,
                sampler,
                generator=generator,
                progress=True,
                cuda_graphs=args.cuda_graphs,
            )
            images.append(to_uint8(decode(vae, out) if vae is not None else out))
    arr = np.concatenate(images)
    labels_np = labels.numpy().astype(np.int64)
    replace_atomically(lambda tmp: np.savez(tmp, arr_0=arr, arr_1=labels_np), out_path)
    if grid_path is not None:
        nrow = min(config.num_classes, 16) if args.class_label is None else 10
        replace_atomically(lambda tmp: save_grid(arr, tmp, nrow=nrow), grid_path)
    return arr, labels_np


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        arr, _ = sample(args)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    print(
        f"wrote {arr.shape[0]} samples of shape {arr.shape[1:]} to {args.out}"
        + (f" and a grid to {args.grid}" if args.grid else "")
    )


if __name__ == "__main__":
    main()
