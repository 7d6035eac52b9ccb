"""Train DiT / DiT-MoE: ``python -m dit.train``.

With no arguments it trains a small DiT-MoE on the handwritten digits that ship inside
scikit-learn, on the CPU, in a few minutes, and writes a grid of EMA samples. Several
processes or GPUs: ``torchrun --nproc_per_node N -m dit.train ...`` (NCCL on CUDA, gloo on CPU).

Layout of a run: ``<results-dir>/<NNN>-<model>/`` with ``log.txt``, ``samples.png`` and
``checkpoints/<step>/`` (see ``dit.checkpoint``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import parallel
from .cli import (
    add_moe_backend_argument,
    check_writable_dir,
    coefficient,
    explicit_arguments,
    fraction,
    positive_float,
    positive_int,
    seed,
)
from .data import batches, decode, encode, load_dataset, load_vae, steps_per_epoch
from .diffusion import RectifiedFlow, create_diffusion
from .models import OBJECTIVES, OVERRIDES, DiT, DiTConfig, coerce_override, create_model
from .parallel import Distributed, JobRefused, StepDraws, rng_state, set_rng_state
from .precision import add_precision_argument, autocast, matmul_precision, training_precision
from .run_lock import RunLock
from .sampling import check_steps, default_steps, generate, save_grid, to_uint8

# Defaults of the flags left unset: DiT's for real data, and a preset that learns the embedded
# digits on a CPU in minutes (a small model, a short run, hence a larger learning rate).
DEFAULTS = {"model": "DiT-MoE-S/2-8E2A", "steps": 400_000, "global_batch_size": 256, "lr": 1e-4}
DIGITS_DEFAULTS = {"model": "DiT-MoE-Ti/2-8E2A", "steps": 1500, "global_batch_size": 128, "lr": 2e-3}
# The flags a resumed run may change. Every other flag must be left out (the checkpoint's value
# is used) or agree with the checkpoint: changing the data, model, batch or seed mid-run would
# silently make a different run.
RESUME_MAY_CHANGE = (
    "steps",
    "epochs",
    "lr",
    "ckpt_every",
    "log_every",
    "precision",
    "grad_checkpointing",
    "compile",
    "moe_backend",
    "cfg_scale",
    "sample_steps",
    "results_dir",
    "resume",
    "ep",
    "fsdp",
)
# Seconds a job waits for the one holding its run directory to end: the workers of a killed
# job stop at their next step (``Distributed.check_agent``).
LOCK_WAIT = 60.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dit.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"config name, e.g. DiT-XL/2 or DiT-MoE-S/2-8E2A (default: {DEFAULTS['model']}; {DIGITS_DEFAULTS['model']} on digits)",
    )
    p.add_argument(
        "--data",
        default="digits",
        help="'digits', an image folder (DIR/<class>/<image>), or a directory of latent shards",
    )
    p.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="image side in pixels (default: 8 for digits, 256 for folders)",
    )
    p.add_argument(
        "--vae", default=None, help="local diffusers AutoencoderKL: train on its latents (x0.18215) of the images"
    )
    p.add_argument(
        "--global-batch-size",
        type=positive_int,
        default=None,
        help=f"images per step over all processes (default {DEFAULTS['global_batch_size']}; {DIGITS_DEFAULTS['global_batch_size']} on digits)",
    )
    p.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help=f"AdamW learning rate (default {DEFAULTS['lr']:g}; {DIGITS_DEFAULTS['lr']:g} on digits)",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"optimizer steps (default {DEFAULTS['steps']}; {DIGITS_DEFAULTS['steps']} on digits)",
    )
    length.add_argument("--epochs", type=positive_int, default=None)
    p.add_argument(
        "--ckpt-every",
        type=positive_int,
        default=50_000,
        help="steps between checkpoints (the last step is always saved)",
    )
    p.add_argument("--log-every", type=positive_int, default=100)
    p.add_argument("--results-dir", default="results")
    p.add_argument(
        "--resume",
        default=None,
        help=(
            "a checkpoint or run directory, or 'latest' (the newest run in --results-dir). A run directory or "
            "'latest' resumes from the newest intact checkpoint, skipping corrupt or incomplete ones with a warning. "
            "Flags left out take the checkpoint's values; these may change: "
            + ", ".join("--" + name.replace("_", "-") for name in RESUME_MAY_CHANGE if name != "resume")
            + "; any other flag must agree with the checkpoint"
        ),
    )
    p.add_argument(
        "--init",
        default=None,
        help=(
            "start a new run from these weights: a .safetensors file (from dit.upcycle, dit.convert or "
            "dit.checkpoint consolidate) or a checkpoint directory (its EMA weights); the model is the one they "
            "describe, and --model, --objective, if given, must agree with it"
        ),
    )
    add_precision_argument(p)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument(
        "--ep",
        type=positive_int,
        default=1,
        help=(
            "expert-parallel degree: groups of this many processes each hold one copy of the experts, every process "
            "E/ep of each layer's (it must divide the number of processes and the experts); checkpoints are then "
            "sharded, and resume with any --ep"
        ),
    )
    p.add_argument(
        "--fsdp",
        action=argparse.BooleanOptionalAction,
        default=False,
        help=(
            "shard parameters, gradients and optimizer state over the processes (FSDP2 fully_shard, per block; the "
            "experts over the data-parallel groups of --ep); with --precision bf16 on GPUs, bf16 weights in the blocks "
            "and fp32 gradient reduction; checkpoints are sharded"
        ),
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the loss (forward and backward) and the optimizer step"
    )
    p.add_argument("--objective", choices=OBJECTIVES, default="diffusion")
    p.add_argument(
        "--balance-alpha",
        type=coefficient,
        default=0.05,
        help="weight of each MoE layer's balance loss (paper 0.05, official code 0.01)",
    )
    p.add_argument("--ema-decay", type=fraction, default=0.9999)
    p.add_argument(
        "--hflip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random horizontal flips (default: on for image folders; off for digits, which mirroring changes, and latents)",
    )
    p.add_argument("--cfg-scale", type=coefficient, default=4.0, help="guidance scale of the final sample grid")
    p.add_argument(
        "--sample-steps",
        type=positive_int,
        default=None,
        help="sampling steps of the final grid (default 250 DDPM or 50 Euler)",
    )
    add_moe_backend_argument(p)
    p.add_argument(
        "--set",
        dest="model_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a model setting, e.g. --set mlp_ratio=15 --set num_shared_experts=0; settings: {', '.join(OVERRIDES)}",
    )
    p.add_argument("--seed", type=seed, default=0)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed flags; ``args.given`` lists those the command line set itself."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.given = sorted(explicit_arguments(build_parser, argv))
    try:
        parse_overrides(args.model_overrides)
    except ValueError as error:
        parser.error(str(error))
    if args.init is not None and {"resume", "init"} <= set(args.given):
        parser.error("--init starts a new run and --resume continues one: give one of them")
    digits = args.data == "digits"
    if not digits:
        args.data = str(Path(args.data).resolve())
    if args.image_size is None:
        args.image_size = 8 if digits else 256
    presets = DIGITS_DEFAULTS if digits else DEFAULTS
    for name, value in presets.items():
        if getattr(args, name) is None and not (name == "steps" and args.epochs is not None):
            setattr(args, name, value)
    return args


def resume_arguments(args: argparse.Namespace, saved: dict) -> None:
    """Take the checkpoint's value for every flag left out; refuse a given flag that contradicts
    it, unless it is one of ``RESUME_MAY_CHANGE``."""
    flags = {action.dest: action.option_strings[0] for action in build_parser()._actions if action.option_strings}
    for dest, value in saved.items():
        if dest not in flags:
            continue
        if dest not in args.given:
            setattr(args, dest, value)
        elif dest not in RESUME_MAY_CHANGE and not _same_setting(dest, getattr(args, dest), value):
            raise ValueError(
                f"{flags[dest]} {_show(getattr(args, dest))} contradicts the checkpoint, which was trained with "
                f"{_show(value)}; leave it out to continue that run, or start a new run to change it"
            )
    if "steps" in args.given:
        args.epochs = None
    elif "epochs" in args.given:
        args.steps = None


def _same_setting(dest: str, new: object, old: object) -> bool:
    if dest == "model_overrides":
        return parse_overrides(new) == parse_overrides(old)
    return new == old


def _show(value: object) -> str:
    if isinstance(value, list):
        return " ".join(value) or "nothing"
    return repr(value) if isinstance(value, str) else str(value)


@torch.no_grad()
def update_ema(ema: DiT, model: DiT, decay: float) -> None:
    ema_params = [parallel.local(p) for p in ema.parameters()]
    torch._foreach_lerp_(ema_params, [parallel.local(p.detach()) for p in model.parameters()], 1.0 - decay)
    # Float buffers that training moves (DiffMoE's capacity thresholds) follow the same average.
    pairs = [(mine, theirs) for mine, theirs in zip(ema.buffers(), model.buffers()) if mine.is_floating_point()]
    if pairs:
        mine, theirs = ([parallel.local(b) for b in side] for side in zip(*pairs))
        torch._foreach_lerp_(mine, theirs, 1.0 - decay)


def ema_decay(step: int, decay: float) -> float:
    """The EMA decay at ``step``, warmed up as ``(1 + step) / (10 + step)`` so that a short run's
    EMA is not mostly its initialisation; it reaches ``decay`` after ~10 / (1 - decay) steps."""
    return min(decay, (1 + step) / (10 + step))


def expert_load(model: DiT) -> list[dict]:
    """Per MoE layer: min, max and coefficient of variation of the tokens routed per expert."""
    stats = []
    for moe in model.moe_layers():
        counts = moe.expert_counts.float()
        stats.append(
            {
                "min": int(counts.min()),
                "max": int(counts.max()),
                "cv": float(counts.std(unbiased=False) / counts.mean()),
            }
        )
    return stats


def find_run(args: argparse.Namespace, lock: RunLock, warn: Callable[[str], None]) -> tuple[Path, Path | None]:
    """The run directory, held by ``lock``, and, when resuming, the checkpoint to start from,
    verified against its manifest; a killed save's leftovers are cleared first. Run by the main
    process alone (``Distributed.on_main``)."""
    if args.resume is None:
        results = check_writable_dir(args.results_dir, "--results-dir")
        name = args.model.replace("/", "-")
        while True:  # the next free index; mkdir claims it even against a job started alongside
            index = max((int(p.name[:3]) for p in results.iterdir() if p.name[:3].isdigit()), default=-1) + 1
            run_dir = results / f"{index:03d}-{name}"
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                continue
        lock.acquire(run_dir, LOCK_WAIT, say=warn)
        return run_dir, None
    path = Path(args.resume)
    if args.resume == "latest":
        results = Path(args.results_dir)
        runs = sorted(results.glob("[0-9][0-9][0-9]-*"), key=lambda p: int(p.name[:3])) if results.is_dir() else []
        runs = [run for run in runs if (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir())]
        if not runs:
            raise ValueError(f"--resume latest: no run with a checkpoint in {results}")
        path = runs[-1]
    elif not path.is_dir():
        raise ValueError(f"--resume {path}: no such directory (give a checkpoint or run directory, or 'latest')")
    if ckpt.is_step_dir(path):
        run_dir, checkpoint = path.parent.parent, path
    else:
        run_dir, checkpoint = path, None
    check_writable_dir(run_dir, "--resume")
    lock.acquire(run_dir, LOCK_WAIT, say=warn)
    for action in ckpt.remove_stale(run_dir / "checkpoints"):
        warn(action)
    if checkpoint is not None:
        ckpt.verify(checkpoint)
        return run_dir, checkpoint
    checkpoint = ckpt.latest_intact_checkpoint(run_dir / "checkpoints", warn)
    if checkpoint is None:
        raise ValueError(f"--resume {args.resume}: no intact checkpoint in {run_dir / 'checkpoints'}")
    return run_dir, checkpoint


def fit_layout(args: argparse.Namespace, world_size: int, num_experts: int) -> str | None:
    """On resume, make the ``--ep`` and ``--fsdp`` taken from the checkpoint (not given again)
    fit the processes at hand; return a line saying what changed, or ``None``."""
    old = (args.ep, args.fsdp)
    if "ep" not in args.given and world_size % args.ep:
        args.ep = max(d for d in range(1, args.ep + 1) if world_size % d == 0 and num_experts % d == 0)
    if "fsdp" not in args.given and world_size == 1:
        args.fsdp = False
    if (args.ep, args.fsdp) == old:
        return None
    return (
        f"resuming with --ep {args.ep} {'--fsdp' if args.fsdp else '--no-fsdp'} on {world_size} process(es): the "
        f"checkpoint's --ep {old[0]}{' --fsdp' if old[1] else ''} does not fit them (a sharded checkpoint loads in any layout)"
    )


def load_init(args: argparse.Namespace) -> tuple[dict, DiTConfig]:
    """The weights and config ``--init`` names. The model flags take their values from it;
    ``--model`` and ``--objective``, if given, must agree, and ``--set`` cannot change it."""
    state_dict, config = ckpt.load_weights(args.init, "ema")
    for flag, given, own in (("--model", args.model, config.name), ("--objective", args.objective, config.objective)):
        if flag[2:] in args.given and given != own:
            raise ValueError(f"{flag} {given} contradicts --init {args.init}, which holds {own}; leave {flag} out")
    if args.model_overrides:
        raise ValueError(f"--set cannot change the model --init {args.init} holds ({config.name})")
    args.model, args.objective = config.name, config.objective
    if "balance_alpha" in args.given:
        config.balance_loss_alpha = args.balance_alpha
    return state_dict, config


def data_shape(args: argparse.Namespace, dataset) -> dict:
    """The model settings the data fixes: ``input_size``, ``in_channels``, ``num_classes``."""
    channels, size, _ = dataset.shape
    if args.vae:
        if size % 8:
            raise ValueError(
                f"--image-size must be a multiple of 8 with --vae (its latents are 8 times smaller), got {size}"
            )
        channels, size = 4, size // 8
    return dict(input_size=size, in_channels=channels, num_classes=dataset.num_classes)


def build_model(args: argparse.Namespace, dataset, checkpoint: Path | None, init: DiTConfig | None = None) -> DiT:
    if checkpoint is not None:
        return DiT(ckpt.checkpoint_config(checkpoint, verified=True), moe_backend=args.moe_backend)
    shape = data_shape(args, dataset)
    if init is not None:
        wrong = [
            f"{key} {getattr(init, key)} (the data's: {value})"
            for key, value in shape.items()
            if getattr(init, key) != value
        ]
        if wrong:
            raise ValueError(f"--init {args.init} does not fit the data: its model has {', '.join(wrong)}")
        return DiT(init, moe_backend=args.moe_backend)
    overrides = dict(
        **shape,
        learn_sigma=args.objective == "diffusion",
        objective=args.objective,
        latent=bool(args.vae) or dataset.is_latent,
        balance_loss_alpha=args.balance_alpha,
    )
    overrides.update(parse_overrides(args.model_overrides))
    try:
        return create_model(args.model, moe_backend=args.moe_backend, **overrides)
    except TypeError as error:
        raise ValueError(str(error)) from error


def parse_overrides(items: list[str]) -> dict:
    """``["mlp_ratio=15", "qk_norm=true"]`` -> ``{"mlp_ratio": 15.0, "qk_norm": True}``, each value
    parsed as its model setting's type; ``ValueError`` names a malformed item."""
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = coerce_override(key.strip(), text.strip())
        except TypeError as error:
            raise ValueError(f"--set {item}: {error}") from None
    return overrides


def train(args: argparse.Namespace) -> Path:
    env = Distributed()
    lock = RunLock()
    try:
        with matmul_precision(args.precision):
            return _train(args, env, lock)
    except JobRefused as error:
        env.refuse(error)
    finally:
        lock.release()
        env.close()


def _train(args: argparse.Namespace, env: Distributed, lock: RunLock) -> Path:
    device = env.device
    warnings = []

    def warn(message: str) -> None:
        warnings.append(message)
        tqdm.write(f"warning: {message}", file=sys.stderr)

    # Find the run, and check everything that can refuse it before the data and the model:
    init_weights, init_config = load_init(args) if args.init is not None and args.resume is None else (None, None)
    run_dir, checkpoint = env.on_main(lambda: find_run(args, lock, warn))
    state = None
    if checkpoint is not None:
        state = ckpt.load_state(checkpoint, verified=True)
        resume_arguments(args, state["args"])
        changed = fit_layout(args, env.world_size, state["config"]["num_experts"])
        if changed and env.main:
            warn(changed)
    global_batch = args.global_batch_size
    if global_batch % env.world_size:
        raise ValueError(
            f"--global-batch-size {global_batch} must be divisible by the number of processes ({env.world_size})"
        )
    if env.world_size % args.ep:
        raise ValueError(f"--ep {args.ep} must divide the number of processes ({env.world_size})")
    if args.fsdp and env.world_size == 1:
        raise ValueError("--fsdp shards over several processes; launch with torchrun --nproc_per_node N")
    sharded = args.ep > 1 or args.fsdp
    if checkpoint is not None and sharded and not ckpt.is_sharded(checkpoint):
        raise ValueError(f"--resume {checkpoint} was written without --ep or --fsdp; resume it without them")

    # Data: this process's rows of each global batch.
    batch = global_batch // env.world_size
    rows = slice(env.rank * batch, (env.rank + 1) * batch)
    dataset = load_dataset(args.data, args.image_size)
    total_steps = args.steps if args.epochs is None else args.epochs * steps_per_epoch(dataset, global_batch)
    if args.hflip is None:
        args.hflip = not (args.data == "digits" or dataset.is_latent)

    # Model and EMA, laid out over the processes:
    torch.manual_seed(args.seed)  # the same initial weights on every process
    model = build_model(args, dataset, checkpoint, init_config)
    if init_weights is not None:
        ckpt.load_into(model, init_weights, args.init)
    model = training_precision(model.to(device), args.precision)
    check_steps(model.config, args.sample_steps)
    if checkpoint is not None and not ckpt.is_sharded(checkpoint):
        ckpt.load_into(model, ckpt.load_weights(checkpoint, "model", verified=True)[0], checkpoint)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    mesh = parallel.lay_out(model, ema, env.world_size, args.ep, args.fsdp, bf16=args.precision in ("bf16", "fp8"))
    # The global RNGs serve what remains random per process (the VAE's posterior draws).
    torch.manual_seed(args.seed * env.world_size + env.rank)
    np.random.seed((args.seed * env.world_size + env.rank) % 2**32)
    random.seed(args.seed * env.world_size + env.rank)
    vae = load_vae(args.vae, device) if args.vae else None
    model.grad_checkpointing = args.grad_checkpointing

    # Optimizer, and where a resumed run left off:
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    start_step = 0
    if checkpoint is not None:
        if ckpt.is_sharded(checkpoint):
            ckpt.load_sharded(checkpoint, model, ema, optimizer)
        else:
            ckpt.load_into(ema, ckpt.load_weights(checkpoint, "ema", verified=True)[0], checkpoint)
            optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # --lr may change on resume; the saved state has the old one
            group["lr"] = args.lr
        start_step = state["step"]
        if len(state["rng"]) == env.world_size:
            set_rng_state(state["rng"][env.rank], device)
    objective = (
        RectifiedFlow()
        if model.config.objective == "rectified-flow"
        else create_diffusion(learn_sigma=model.config.learn_sigma)
    )
    ddp = parallel.data_parallel(model, device) if env.world_size > 1 and not args.fsdp else model
    save_tag = env.broadcast(os.getpid())

    # Log, by the main process:
    log_file = None
    if env.main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        log_file = open(run_dir / "log.txt", "a")
        n_params = sum(p.numel() for p in model.parameters())
        layout = (
            f" (data {env.world_size // args.ep} x expert {args.ep}{', FSDP' if args.fsdp else ''})" if sharded else ""
        )
        log(
            log_file,
            f"run {run_dir} | {model.config.name} | {n_params / 1e6:.2f}M parameters | data {args.data} ({len(dataset)} items) "
            f"| {total_steps} steps of {global_batch} | {env.world_size} process(es){layout} on {device}",
        )
        if checkpoint is not None:
            log(log_file, f"resumed from {checkpoint} (step {start_step})")
        elif init_weights is not None:
            log(log_file, f"initialised from {args.init}")
        log(log_file, "args " + json.dumps(vars(args)))
        for message in warnings:
            log(log_file, f"warning: {message}", echo=False)

    # The losses of one batch, and the optimizer step, compiled if asked:
    def compute_loss(x, y, t, noise, drop) -> tuple[torch.Tensor, torch.Tensor]:
        """The diffusion loss and the summed balance loss of one batch."""
        with autocast(args.precision, device):
            loss = objective.training_losses(ddp, x, {"y": y, "drop_labels": drop}, noise=noise, t=t)["loss"].mean()
        aux = model.aux_loss  # a property that sums the layers' losses: read it once
        return loss, aux if aux is not None else torch.zeros((), device=device)

    optimizer_step = optimizer.step
    if args.compile:
        # One graph for the loss (AOTAutograd compiles its backward with it); DDP splits the graph
        # at its gradient buckets, so fullgraph holds on one process only. The optimizer step is
        # compiled too; PyTorch puts graph breaks around it by design.
        compute_loss = torch.compile(compute_loss, fullgraph=env.world_size == 1)
        optimizer_step = torch.compile(optimizer.step)

    # Train:
    model.train()
    data = batches(dataset, batch, args.seed, start_step, env.rank, env.world_size)
    bar = tqdm(total=total_steps, initial=start_step, disable=not env.main, desc="train", dynamic_ncols=True)
    # Running sums stay on the device: reading them back every step would stall a GPU.
    window_loss = torch.zeros((), device=device)
    window_aux = torch.zeros((), device=device)
    window_steps, window_start = 0, time.perf_counter()
    for step in range(start_step, total_steps):
        env.check_agent()
        # This process's rows of the step's batch and of its random draws:
        x, y = next(data)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        draws = StepDraws(args.seed, step, global_batch, rows, device)
        if args.hflip:
            x = torch.where(draws.uniform()[:, None, None, None] < 0.5, x.flip(-1), x)
        if vae is not None:
            x = encode(vae, x)
        drop = draws.uniform() < model.config.class_dropout_prob
        t = draws.take(objective.sample_times(global_batch, device, draws.generator))
        noise = draws.normal(x.shape[1:])

        # One optimizer step, then the EMA:
        loss, aux = compute_loss(x, y, t, noise, drop)
        optimizer.zero_grad(set_to_none=True)
        (loss + aux).backward()
        if args.ep > 1 and not args.fsdp:
            parallel.reduce_expert_grads(model, mesh)
        optimizer_step()
        update_ema(ema, model, ema_decay(step, args.ema_decay))

        # Log the window's mean losses, speed and expert load; save a checkpoint:
        window_loss += loss.detach()
        window_aux += aux.detach()
        window_steps += 1
        bar.update(1)
        done = step + 1
        if done % args.log_every == 0 or done == total_steps:
            elapsed = time.perf_counter() - window_start
            mean_loss, mean_aux = (
                env.mean(window_loss.item() / window_steps),
                env.mean(window_aux.item() / window_steps),
            )
            images_per_s = window_steps * global_batch / elapsed
            load = expert_load(model)
            if env.main:
                bar.set_postfix(loss=f"{mean_loss:.4f}", balance=f"{mean_aux:.4f}", img_s=f"{images_per_s:.0f}")
                load_text = " ".join(f"L{i}:{s['min']}/{s['max']}/cv{s['cv']:.2f}" for i, s in enumerate(load))
                log(
                    log_file,
                    f"step {done:7d} | loss {mean_loss:.6f} | balance {mean_aux:.6f} | {images_per_s:.1f} img/s"
                    + (f" | expert load min/max/cv {load_text}" if load else ""),
                    echo=False,
                )
            window_loss.zero_()
            window_aux.zero_()
            window_steps, window_start = 0, time.perf_counter()
        if done % args.ckpt_every == 0 or done == total_steps:
            env.check_agent()
            rng = env.gather(rng_state(device))
            state = {"rng": rng, "args": vars(args), "world_size": env.world_size}
            if sharded:
                path = ckpt.save_sharded_checkpoint(
                    run_dir / "checkpoints", done, model, ema, optimizer, state, save_tag
                )
            elif env.main:
                path = ckpt.save_checkpoint(
                    run_dir / "checkpoints", done, model, ema, {**state, "optimizer": optimizer.state_dict()}
                )
            if env.main:
                log(log_file, f"saved checkpoint {path}", echo=False)
    bar.close()

    # Sample a grid from the EMA. With sharded experts every process takes part; the main one writes it.
    if env.main or sharded:
        write_sample_grid(args, ema, vae, run_dir / "samples.png", log_file, write=env.main)
    if env.main:
        log_file.close()
    return run_dir


def write_sample_grid(args, ema: DiT, vae, path: Path, log_file, write: bool = True) -> None:
    """Sample a grid of every class from the EMA; ``write=False`` takes part without writing."""
    config = ema.config
    if config.latent and vae is None:
        if write:
            log(log_file, "no sample grid: the model makes latents and no --vae was given")
        return
    per_class = 8 if config.num_classes <= 16 else 1
    labels = torch.arange(min(config.num_classes, 64)).repeat_interleave(per_class)
    steps = args.sample_steps or default_steps(config)
    images = generate(ema, labels, args.cfg_scale, steps, seed=args.seed)
    if not write:
        return
    if vae is not None:
        images = torch.cat([decode(vae, chunk) for chunk in images.split(16)])
    save_grid(to_uint8(images), path, nrow=per_class if per_class > 1 else 8)
    log(log_file, f"wrote {len(labels)} EMA samples (cfg {args.cfg_scale}, {steps} steps) to {path}")


def log(log_file, message: str, echo: bool = True) -> None:
    line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
    if echo:
        tqdm.write(line)
    if log_file is not None:
        log_file.write(line + "\n")
        log_file.flush()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        train(args)
    except ValueError as error:
        # Every process of a job stops alike; one line from the main process says why.
        raise SystemExit(f"error: {error}" if int(os.environ.get("RANK", 0)) == 0 else 1) from error


if __name__ == "__main__":
    main()
