"""What ``python -m dit.train`` is asked to do: its flags, their defaults, and the rules for
continuing a run (which run and checkpoint, which flags may change, how the layout adapts)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from . import checkpoint as ckpt
from .cli import add_moe_backend_argument, coefficient, explicit_arguments, fraction, positive_float, positive_int, seed
from .files import check_writable_dir, replace_atomically
from .models import OBJECTIVES, OVERRIDES, DiTConfig, coerce_override
from .precision import add_precision_argument
from .run_lock import RunLock

DESCRIPTION = """Train DiT / DiT-MoE: ``python -m dit.train``.

With no arguments it trains a small DiT-MoE on the handwritten digits that ship inside
scikit-learn, on the CPU, in a few minutes, and writes a grid of EMA samples. Several
processes or GPUs: ``torchrun --nproc_per_node N -m dit.train ...`` (NCCL on CUDA, gloo on CPU).

Layout of a run: ``<results-dir>/<NNN>-<model>/`` with ``log.txt``, ``samples.png`` and
``checkpoints/<step>/`` (see ``dit.checkpoint``).
"""

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
    "skip_memory_check",
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
        prog="python -m dit.train", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
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
        "--skip-memory-check",
        action="store_true",
        help="start even where the estimate of the memory a process needs (dit.memory's) exceeds what it has",
    )
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


def find_run(args: argparse.Namespace, lock: RunLock, warn: Callable[[str], None]) -> tuple[Path, Path | None]:
    """The run directory, held by ``lock``, and, when resuming, the checkpoint to start from,
    verified against its manifest; a killed save's leftovers are cleared first. Run by the main
    process alone (``Distributed.on_main``).

    A job that torchrun may restart (``--max-restarts``) notes the run it starts; its restarts,
    which start the workers again with the same arguments, continue that run from its newest
    intact checkpoint (from the start, if it saved none)."""
    if args.resume is None:
        results = check_writable_dir(args.results_dir, "--results-dir")
        note = _elastic_note(results)
        if note is not None and note.is_file() and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:
            run_dir = results / note.read_text().strip()
            warn(f"restart {os.environ['TORCHELASTIC_RESTART_COUNT']} of this job: continuing {run_dir}")
            return _hold(run_dir, lock, warn, None, "--results-dir", start_over=True)
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
        if note is not None:
            replace_atomically(lambda tmp: tmp.write_text(run_dir.name), note)
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
        return _hold(path.parent.parent, lock, warn, path, f"--resume {args.resume}")
    return _hold(path, lock, warn, None, f"--resume {args.resume}")


def _hold(
    run_dir: Path, lock: RunLock, warn: Callable[[str], None], checkpoint: Path | None, flag: str, start_over=False
) -> tuple[Path, Path | None]:
    """Hold the existing ``run_dir``, clear what a killed save left, and return it with
    ``checkpoint`` verified or, without one, its newest intact checkpoint (``None`` with
    ``start_over`` where it has none; else an error naming ``flag``)."""
    check_writable_dir(run_dir, flag.split()[0])
    lock.acquire(run_dir, LOCK_WAIT, say=warn)
    for action in ckpt.remove_stale(run_dir / "checkpoints"):
        warn(action)
    if checkpoint is not None:
        ckpt.verify(checkpoint)
        ckpt.checkpoint_config(checkpoint, verified=True)
        return run_dir, checkpoint
    checkpoint = ckpt.latest_intact_checkpoint(run_dir / "checkpoints", warn)
    if checkpoint is None and not start_over:
        raise ValueError(f"{flag}: no intact checkpoint in {run_dir / 'checkpoints'}")
    return run_dir, checkpoint


def _elastic_note(results: Path) -> Path | None:
    """Where a job torchrun may restart notes the run it started: a file in ``results`` named for
    the job (the rendezvous id all its agents share, or with torchrun's default rendezvous, its
    one agent's own directory, the same through its restarts); ``None`` for other jobs."""
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) == 0:
        return None
    job = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if job == "none":
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if error_file is None:
            return None
        job = Path(error_file).parents[2].name
    return results / f".elastic-{job}"


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
