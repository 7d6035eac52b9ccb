"""Train DiT / DiT-MoE: ``python -m dit.train`` (its flags and resume rules: ``train_args``).

As DiT's ``train.py``: the helpers first, then the training function that reads top to bottom:
find the run, build the data, the model with its EMA and optimizer, then the loop of steps, logs
and checkpoints, and a sample grid.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import parallel
from .data import batches, decode, encode, load_dataset, load_vae, resident_bytes, steps_per_epoch
from .diffusion import RectifiedFlow, create_diffusion
from .memory import Layout, check_fits
from .models import DiT, DiTConfig, model_config
from .parallel import Distributed, JobRefused, StepDraws, rng_state, set_rng_state
from .precision import autocast, matmul_precision, training_precision
from .run_lock import RunLock
from .sampling import check_steps, default_steps, generate, save_grid, to_uint8
from .train_args import build_parser, find_run, fit_layout, load_init, parse_args, parse_overrides, resume_arguments

# The command's parser lives with its resume rules; every dit command exposes it.
__all__ = ["build_parser", "main", "train"]


#################################################################################
#                                    Helpers                                    #
#################################################################################


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


def data_shape(args: argparse.Namespace, channels: int, size: int, num_classes: int) -> dict:
    """The model settings the data fixes: ``input_size``, ``in_channels``, ``num_classes``, from
    the images' channels, side and classes (``--vae`` trains on latents 8 times smaller)."""
    if args.vae:
        if size % 8:
            raise ValueError(
                f"--image-size must be a multiple of 8 with --vae (its latents are 8 times smaller), got {size}"
            )
        channels, size = 4, size // 8
    return dict(input_size=size, in_channels=channels, num_classes=num_classes)


def run_config(args: argparse.Namespace, shape: dict, latent: bool, checkpoint: Path | None, init) -> DiTConfig:
    """The config of the model this run trains: a checkpoint's, ``--init``'s (which must fit the
    data's ``shape``), or ``--model`` with the data's shape and the ``--set`` settings."""
    if checkpoint is not None:
        return ckpt.checkpoint_config(checkpoint, verified=True)
    if init is not None:
        wrong = [
            f"{key} {getattr(init, key)} (the data's: {value})"
            for key, value in shape.items()
            if getattr(init, key) != value
        ]
        if wrong:
            raise ValueError(f"--init {args.init} does not fit the data: its model has {', '.join(wrong)}")
        return init
    overrides = dict(
        **shape,
        learn_sigma=args.objective == "diffusion",
        objective=args.objective,
        latent=latent,
        balance_loss_alpha=args.balance_alpha,
    )
    overrides.update(parse_overrides(args.model_overrides))
    try:
        return model_config(args.model, **overrides)
    except TypeError as error:
        raise ValueError(str(error)) from error


def check_memory(args: argparse.Namespace, env: Distributed, checkpoint: Path | None, init) -> None:
    """Refuse, before the data and the model are allocated, a run that cannot fit in this
    process's memory (``dit.memory.check_fits``), from the shape the data will have."""
    if args.data != "digits" and not Path(args.data).is_dir():
        return  # no data to size: loading it says why
    latents = args.data != "digits" and any(Path(args.data).glob("*.safetensors"))
    channels, size = (
        (1, args.image_size)
        if args.data == "digits"
        else (4, args.image_size // 8)
        if latents
        else (3, args.image_size)
    )
    shape = data_shape(args, channels, size, 10 if args.data == "digits" else 1000)
    config = run_config(args, shape, bool(args.vae) or latents, checkpoint, init)
    layout = Layout(env.world_size, args.ep, args.fsdp, args.grad_checkpointing)
    compute_bytes = 2 if args.precision in ("bf16", "fp8") else 4
    check_fits(config, layout, args.global_batch_size // env.world_size, compute_bytes, env.device,
               data=resident_bytes(args.data, args.image_size))  # fmt: skip


def build_model(args: argparse.Namespace, dataset, checkpoint: Path | None, init: DiTConfig | None = None) -> DiT:
    channels, size, _ = dataset.shape
    shape = data_shape(args, channels, size, dataset.num_classes)
    config = run_config(args, shape, bool(args.vae) or dataset.is_latent, checkpoint, init)
    return DiT(config, moe_backend=args.moe_backend)


def check_layout(args: argparse.Namespace, world_size: int, checkpoint: Path | None) -> bool:
    """Check the batch, ``--ep`` and ``--fsdp`` against the processes (and the checkpoint to
    resume); return whether the run is sharded (its checkpoints written by every process)."""
    if args.global_batch_size % world_size:
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} must be divisible by the number of processes ({world_size})"
        )
    if world_size % args.ep:
        raise ValueError(f"--ep {args.ep} must divide the number of processes ({world_size})")
    if args.fsdp and world_size == 1:
        raise ValueError("--fsdp shards over several processes; launch with torchrun --nproc_per_node N")
    sharded = args.ep > 1 or args.fsdp
    if checkpoint is not None and sharded and not ckpt.is_sharded(checkpoint):
        raise ValueError(f"--resume {checkpoint} was written without --ep or --fsdp; resume it without them")
    return sharded


def build_models(
    args: argparse.Namespace, env: Distributed, dataset, checkpoint: Path | None, init: DiTConfig | None, init_weights
) -> tuple[DiT, DiT, object]:
    """The model (the same initial weights on every process, or a checkpoint's, or ``--init``'s),
    its EMA, laid out over the processes, and the expert-parallel mesh (``None`` without)."""
    device = env.device
    torch.manual_seed(args.seed)  # the same initial weights on every process
    model = build_model(args, dataset, checkpoint, init)
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
    model.grad_checkpointing = args.grad_checkpointing
    return model, ema, mesh


def restore(args, env: Distributed, checkpoint: Path, state: dict, model: DiT, ema: DiT, optimizer) -> int:
    """Load a checkpoint's EMA and optimizer state (and a sharded one's model), take back this
    process's RNGs; return the step it left off at."""
    if ckpt.is_sharded(checkpoint):
        ckpt.load_sharded(checkpoint, model, ema, optimizer)
    else:
        ckpt.load_into(ema, ckpt.load_weights(checkpoint, "ema", verified=True)[0], checkpoint)
        optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:  # --lr may change on resume; the saved state has the old one
        group["lr"] = args.lr
    if len(state["rng"]) == env.world_size:
        set_rng_state(state["rng"][env.rank], env.device)
    return state["step"]


def open_log(args, env: Distributed, run_dir: Path, model: DiT, dataset, total_steps: int, resumed, warnings):
    """The run's ``log.txt`` (``None`` but on the main process), opened for appending and headed
    with what this run is: where it starts (``resumed``: the checkpoint, or ``None``, and its
    step), its arguments and the warnings so far."""
    if not env.main:
        return None
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    log_file = open(run_dir / "log.txt", "a")
    n_params = sum(p.numel() for p in model.parameters())
    sharded = args.ep > 1 or args.fsdp
    layout = f" (data {env.world_size // args.ep} x expert {args.ep}{', FSDP' if args.fsdp else ''})" if sharded else ""
    log(
        log_file,
        f"run {run_dir} | {model.config.name} | {n_params / 1e6:.2f}M parameters | data {args.data} ({len(dataset)} items) "
        f"| {total_steps} steps of {args.global_batch_size} | {env.world_size} process(es){layout} on {env.device}",
    )
    checkpoint, start_step = resumed
    if checkpoint is not None:
        log(log_file, f"resumed from {checkpoint} (step {start_step})")
    elif args.init is not None:
        log(log_file, f"initialised from {args.init}")
    log(log_file, "args " + json.dumps(vars(args)))
    for message in warnings:
        log(log_file, f"warning: {message}", echo=False)
    return log_file


class LossWindow:
    """The losses of the steps since the last log line, summed on the device: reading them back
    every step would stall a GPU."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.aux = torch.zeros((), device=device)
        self.steps, self.start = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, aux: torch.Tensor) -> None:
        self.loss += loss.detach()
        self.aux += aux.detach()
        self.steps += 1

    def report(self, env: Distributed, model: DiT, global_batch: int, done: int, bar, log_file) -> None:
        """Log the window's mean losses over every process, its speed and the expert load; start anew."""
        elapsed = time.perf_counter() - self.start
        mean_loss, mean_aux = env.mean(self.loss.item() / self.steps), env.mean(self.aux.item() / self.steps)
        images_per_s = self.steps * global_batch / elapsed
        load = expert_load(model)
        if env.main:
            bar.set_postfix(loss=f"{mean_loss:.4f}", aux=f"{mean_aux:.4f}", img_s=f"{images_per_s:.0f}")
            load_text = " ".join(f"L{i}:{s['min']}/{s['max']}/cv{s['cv']:.2f}" for i, s in enumerate(load))
            log(
                log_file,
                f"step {done:7d} | loss {mean_loss:.6f} | aux {mean_aux:.6f} | {images_per_s:.1f} img/s"
                + (f" | expert load min/max/cv {load_text}" if load else ""),
                echo=False,
            )
        self.loss.zero_()
        self.aux.zero_()
        self.steps, self.start = 0, time.perf_counter()


def save(args, env: Distributed, run_dir: Path, done: int, trained: tuple, sharded: bool, tag: int, log_file) -> None:
    """The checkpoint of step ``done``: ``trained`` is the model, its EMA and the optimizer; with
    ``sharded`` every process writes its shards, else the main process writes it all."""
    model, ema, optimizer = trained
    env.check_agent()
    state = {"rng": env.gather(rng_state(env.device)), "args": vars(args), "world_size": env.world_size}
    if sharded:
        path = ckpt.save_sharded_checkpoint(run_dir / "checkpoints", done, model, ema, optimizer, state, tag)
    elif env.main:
        state["optimizer"] = optimizer.state_dict()
        path = ckpt.save_checkpoint(run_dir / "checkpoints", done, model, ema, state)
    if env.main:
        log(log_file, f"saved checkpoint {path}", echo=False)


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


#################################################################################
#                                   Training                                    #
#################################################################################


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
        changed = fit_layout(args, env.world_size, ckpt.checkpoint_config(checkpoint, verified=True).num_experts)
        if changed and env.main:
            warn(changed)
    global_batch, sharded = args.global_batch_size, check_layout(args, env.world_size, checkpoint)
    if not args.skip_memory_check:
        check_memory(args, env, checkpoint, init_config)

    # Data: this process's rows of each global batch.
    batch = global_batch // env.world_size
    rows = slice(env.rank * batch, (env.rank + 1) * batch)
    dataset = load_dataset(args.data, args.image_size)
    total_steps = args.steps if args.epochs is None else args.epochs * steps_per_epoch(dataset, global_batch)
    if state is not None and total_steps < state["step"]:
        length = f"--steps {args.steps}" if args.epochs is None else f"--epochs {args.epochs} ({total_steps} steps)"
        raise ValueError(f"{length} ends before step {state['step']}, which the run already reached: nothing to train")
    if args.hflip is None:
        args.hflip = not (args.data == "digits" or dataset.is_latent)

    # Model, EMA and optimizer, laid out over the processes, and where a resumed run left off:
    model, ema, mesh = build_models(args, env, dataset, checkpoint, init_config, init_weights)
    vae = load_vae(args.vae, device) if args.vae else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    start_step = 0 if checkpoint is None else restore(args, env, checkpoint, state, model, ema, optimizer)
    config = model.config
    objective = (
        RectifiedFlow() if config.objective == "rectified-flow" else create_diffusion(learn_sigma=config.learn_sigma)
    )
    ddp = parallel.data_parallel(model, device) if env.world_size > 1 and not args.fsdp else model
    save_tag = env.broadcast(os.getpid())
    log_file = open_log(args, env, run_dir, model, dataset, total_steps, (checkpoint, start_step), warnings)

    # The losses of one batch, and the optimizer step, compiled if asked:
    def compute_loss(x, y, t, noise, drop) -> tuple[torch.Tensor, torch.Tensor]:
        """The diffusion loss of one batch, and its auxiliary losses summed: the MoE layers' (balance,
        router similarity, contrastive) and the per-layer regularization."""
        with autocast(args.precision, device):
            terms = objective.training_losses(ddp, x, {"y": y, "drop_labels": drop}, noise=noise, t=t)
        aux = [loss for loss in (model.aux_loss, model.layer_regularization(terms["target"])) if loss is not None]
        return terms["loss"].mean(), sum(aux) if aux else torch.zeros((), device=device)

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
    window = LossWindow(device)
    for step in range(start_step, total_steps):
        env.check_agent()
        # This process's rows of the step's batch and of its random draws:
        x, y = (t.to(device, non_blocking=True) for t in next(data))
        draws = StepDraws(args.seed, step, global_batch, rows, device)
        if args.hflip:
            x = torch.where(draws.uniform()[:, None, None, None] < 0.5, x.flip(-1), x)
        if vae is not None:
            x = encode(vae, x)
        drop = draws.uniform() < config.class_dropout_prob
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
        window.add(loss, aux)
        bar.update(1)
        done = step + 1
        if done % args.log_every == 0 or done == total_steps:
            window.report(env, model, global_batch, done, bar, log_file)
        if done % args.ckpt_every == 0 or done == total_steps:
            save(args, env, run_dir, done, (model, ema, optimizer), sharded, save_tag, log_file)
    bar.close()

    # Sample a grid from the EMA. With sharded experts every process takes part; the main one writes it.
    if env.main or sharded:
        write_sample_grid(args, ema, vae, run_dir / "samples.png", log_file, write=env.main)
    if env.main:
        log_file.close()
    return run_dir


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        train(args)
    except ValueError as error:
        # Every process of a job stops alike; one line from the main process says why.
        raise SystemExit(f"error: {error}" if int(os.environ.get("RANK", 0)) == 0 else 1) from error


if __name__ == "__main__":
    main()
