"""Sample from a checkpoint: ``python -m dit.sample --ckpt PATH --num-samples N --out FILE.npz``.

Uses the EMA weights. The ``.npz`` holds ``arr_0``, uint8 ``[N, H, W, C]`` images (the ADM
evaluator's layout; C is the model's channel count, 1 for the digits), and ``arr_1``, the int64
class labels, spread evenly over the classes unless ``--class`` is given.

Many processes: ``torchrun --nproc_per_node N -m dit.sample ...`` splits the samples over them.
Each sample's noise comes from its own index and the seed, and the samples are written in shards
of ``--shard-size`` (see ``dit.sample_shards``), so the ``.npz`` is the same for any number of
processes, and running an interrupted command again finishes it without drawing a sample twice.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from moe_kernels import ROUTERS

from . import checkpoint as ckpt
from .checkpoint import build_from_checkpoint
from .cli import add_moe_backend_argument, coefficient, fraction, nonnegative_int, offset, positive_int, seed, shift
from .data import decode, load_vae
from .files import check_writable, replace_atomically
from .parallel import Distributed, JobRefused
from .precision import add_precision_argument, inference_weights, use_precision
from .sample_shards import ShardedRun
from .sampling import DEFAULT_STEPS, SAMPLERS, check_steps, generate, save_grid, to_uint8


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
        help="sampling steps (default: " + ", ".join(f"{name} {n}" for name, n in DEFAULT_STEPS.items()) + ")",
    )
    p.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default=None,
        help="diffusion: ddpm (default), ddim, dpm++2m (DPM-Solver++(2M)); rectified flow: euler (default), heun",
    )
    p.add_argument(
        "--cfg-interval",
        type=fraction,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="guide only at times in [LO, HI] (1 = pure noise, 0 = the data), conditional elsewhere",
    )
    p.add_argument(
        "--time-shift",
        type=shift,
        default=1.0,
        help="rectified flow: move the steps towards the noise, t -> s t / (1 + (s - 1) t) (1 = even steps)",
    )
    p.add_argument(
        "--capacity-factor",
        type=shift,
        default=None,
        help="expert-choice models: average experts per token (training's is top_k): the compute dial",
    )
    p.add_argument(
        "--capacity-offset",
        type=offset,
        default=None,
        help="diffmoe and expert-race models: added to every routing threshold (positive: less compute, negative: more)",
    )
    p.add_argument("--out", default="samples.npz", help="output .npz (the suffix is added if missing)")
    p.add_argument("--grid", default=None, help="also write a PNG grid of the samples (.png is added if missing)")
    p.add_argument("--class", dest="class_label", type=nonnegative_int, default=None, help="sample only this class")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument(
        "--shard-size",
        type=positive_int,
        default=1000,
        help="samples per shard: the unit a process takes, writes to OUT.parts/ and skips when resuming",
    )
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


def sample(args: argparse.Namespace) -> int:
    """Draw the samples ``args`` ask for on this process's shards (all of them on one process),
    merge the shards on the main process, and return how many samples the ``.npz`` holds."""
    env = Distributed()
    try:
        return _sample(args, env)
    except JobRefused as error:
        env.refuse(error)
    finally:
        env.close()


def _sample(args: argparse.Namespace, env: Distributed) -> int:
    device = env.device
    if args.cuda_graphs and device.type != "cuda":
        raise ValueError("--cuda-graphs needs a CUDA device; none is available")
    env.on_main(lambda: check_outputs(args))
    model = build_from_checkpoint(args.ckpt, "ema", moe_backend=args.moe_backend).to(device).eval()
    inference_weights(model, args.precision)
    config = model.config
    model.set_expert_compute(args.capacity_factor, args.capacity_offset)
    if args.precision == "fp8" and args.compile:
        raise ValueError("--precision fp8 runs its FP8 kernels eagerly: --compile cannot take it yet")
    if not ROUTERS[config.router].static_shapes and (args.compile or args.cuda_graphs):
        raise ValueError(
            f"a {config.router} model's token counts are data-dependent: --compile and --cuda-graphs cannot take it"
        )
    steps, sampler = check_steps(config, args.steps, args.sampler, args.cfg_interval, args.time_shift)
    if args.class_label is not None and not 0 <= args.class_label < config.num_classes:
        raise ValueError(f"--class must be in [0, {config.num_classes}), got {args.class_label}")
    if config.latent and args.vae is None:
        raise ValueError("this model generates VAE latents: pass --vae with the autoencoder it was trained with")
    if args.num_samples + args.shard_size > 2**32:
        raise ValueError(f"--num-samples must stay below 2**32 - --shard-size, got {args.num_samples}")
    settings = {
        "ckpt": str(Path(args.ckpt).resolve()),
        "weights": ckpt.fingerprint(args.ckpt),
        **{key: getattr(args, key) for key in SETTINGS},
        "steps": steps,
        "sampler": sampler,
    }
    run = ShardedRun(Path(args.out), args.num_samples, args.shard_size, settings)
    env.on_main(run.prepare)
    vae = load_vae(args.vae, device) if args.vae else None
    if args.compile:
        model.compile(fullgraph=True)

    def warn(message: str) -> None:
        tqdm.write(f"warning: {message}", file=sys.stderr)

    todo = [(first, end) for first, end in run.mine(env.rank, env.world_size) if not run.done(first, end, warn)]
    share = "" if env.world_size == 1 else f" (process 0 of {env.world_size}: its shards)"
    bar = tqdm(total=sum(end - first for first, end in todo), desc="samples" + share, disable=not env.main, unit="img")
    with use_precision(args.precision, device):
        for first, end in todo:
            images = []
            for start in range(first, end, args.batch_size):
                labels = sample_labels(range(start, min(start + args.batch_size, end)), config, args.class_label)
                out = generate(
                    model, labels, args.cfg_scale, steps, sampler, seed=args.seed, first_index=start,
                    cuda_graphs=args.cuda_graphs, cfg_interval=args.cfg_interval, time_shift=args.time_shift,
                )  # fmt: skip
                images.append(to_uint8(decode(vae, out) if vae is not None else out))
                bar.update(len(labels))
            run.write(
                first, end, np.concatenate(images), sample_labels(range(first, end), config, args.class_label).numpy()
            )
    bar.close()
    env.barrier()
    if env.main:
        run.merge()
        if args.grid:
            with np.load(args.out) as data:
                shown = data["arr_0"][:GRID_MAX]
            nrow = min(config.num_classes, 16) if args.class_label is None else 10
            replace_atomically(lambda tmp: save_grid(shown, tmp, nrow=nrow), Path(args.grid))
    return args.num_samples


# The flags that decide the samples besides the checkpoint, steps and sampler: an interrupted run
# resumes only with the same ones. --batch-size is among them, as a batch's arithmetic may round
# differently from another's.
SETTINGS = (
    "seed", "cfg_scale", "cfg_interval", "time_shift", "class_label", "batch_size", "precision", "vae",
    "capacity_factor", "capacity_offset",
)  # fmt: skip
GRID_MAX = 1024  # samples shown in --grid


def sample_labels(indices: range, config, class_label: int | None) -> torch.Tensor:
    """The labels of samples ``indices``: ``--class``, or the classes in turn (index mod classes)."""
    if class_label is not None:
        return torch.full((len(indices),), class_label)
    return torch.tensor(indices) % config.num_classes


def check_outputs(args: argparse.Namespace) -> None:
    inputs = {"--ckpt": args.ckpt, "--vae": args.vae}
    check_writable(args.out, "--out", inputs)
    if args.grid:
        check_writable(args.grid, "--grid", inputs)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        count = sample(args)
    except ValueError as error:
        raise SystemExit(f"error: {error}" if int(os.environ.get("RANK", 0)) == 0 else 1) from error
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"wrote {count} samples to {args.out}" + (f" and a grid to {args.grid}" if args.grid else ""))


if __name__ == "__main__":
    main()
