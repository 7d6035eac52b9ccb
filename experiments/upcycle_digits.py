"""Sparse upcycling at the tiny CPU scale: does a DiT-MoE upcycled from a trained dense DiT reach
the dense model's loss sooner than the same DiT-MoE trained from scratch?

    python experiments/upcycle_digits.py [--steps 1500] [--results-dir results/upcycle]

1. trains the dense DiT-Ti/2 with the digits preset (``--steps`` steps);
2. upcycles its EMA into DiT-MoE-Ti/2-8E2A (``dit.upcycle`` defaults: GELU-tanh experts with
   biases copied from the MLP, top-2 renormalised, router normal(0, 0.02), 2 shared experts
   starting at zero) and fine-tunes it with the same preset (``dit.train --init``);
3. trains that same DiT-MoE architecture from scratch, same preset and seed.

The losses are ``dit.train``'s logged means over windows of ``--log-every`` steps, smoothed over
``--smooth`` windows. The dense model's final loss is its last smoothed value; each MoE run
"reaches" it at the first step whose smoothed loss is at or below it. Prints a markdown table and
the curves, and writes them to ``<results-dir>/upcycle_digits.md``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from dit.checkpoint import latest_checkpoint
from dit.train import main as train_main
from dit.upcycle import main as upcycle_main

DENSE, MOE = "DiT-Ti/2", "DiT-MoE-Ti/2-8E2A"
# The architecture dit.upcycle makes, built from scratch by dit.train.
SAME_MOE = ["--set", "expert_activation=gelu_tanh", "--set", "expert_biases=true", "--set", "normalize_weights=true"]
_STEP = re.compile(r"step\s+(\d+) \| loss ([0-9.]+)")


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """``(step, mean loss of the window ending there)`` from a run's ``log.txt``."""
    return [(int(m[1]), float(m[2])) for m in _STEP.finditer((run_dir / "log.txt").read_text())]


def smoothed(curve: list[tuple[int, float]], windows: int) -> list[tuple[int, float]]:
    return [
        (step, sum(loss for _, loss in curve[i + 1 - windows : i + 1]) / windows)
        for i, (step, _) in enumerate(curve)
        if i + 1 >= windows
    ]


def first_reaching(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, loss in curve if loss <= target), None)


def train(results: Path, name: str, *args: str) -> Path:
    train_main(["--results-dir", str(results / name), *args])
    return sorted((results / name).iterdir())[-1]


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--smooth", type=int, default=2, help="windows averaged into each point")
    p.add_argument("--results-dir", type=Path, default=Path("results/upcycle"))
    args = p.parse_args(argv)
    common = ["--steps", str(args.steps), "--log-every", str(args.log_every), "--seed", "0"]

    dense_run = train(args.results_dir, "dense", "--model", DENSE, *common)
    upcycled = args.results_dir / "upcycled.safetensors"
    upcycle_main(["--dense", str(latest_checkpoint(dense_run / "checkpoints")), "--model", MOE, "--out", str(upcycled)])
    runs = {
        "dense DiT-Ti/2": dense_run,
        "DiT-MoE upcycled from it": train(args.results_dir, "upcycled", "--init", str(upcycled), *common),
        "DiT-MoE from scratch": train(args.results_dir, "scratch", "--model", MOE, *SAME_MOE, *common),
    }
    curves = {name: smoothed(losses(run), args.smooth) for name, run in runs.items()}
    target = curves["dense DiT-Ti/2"][-1][1]
    lines = [
        f"Digits preset, {args.steps} steps each, seed 0; loss = mean over {args.log_every * args.smooth} steps. "
        f"Target: the dense model's final loss, {target:.4f}.",
        "",
        "| run | first loss | final loss | steps to reach the dense final loss |",
        "|---|---|---|---|",
    ]
    for name, curve in curves.items():
        reached = first_reaching(curve, target)
        lines.append(
            f"| {name} | {curve[0][1]:.4f} | {curve[-1][1]:.4f} | "
            f"{'(the target)' if name.startswith('dense') else reached if reached else 'not within the run'} |"
        )
    lines += ["", "| step | " + " | ".join(curves) + " |", "|---" * (len(curves) + 1) + "|"]
    for i, (step, _) in enumerate(curves["dense DiT-Ti/2"]):
        lines.append(f"| {step} | " + " | ".join(f"{curve[i][1]:.4f}" for curve in curves.values()) + " |")
    table = "\n".join(lines)
    (args.results_dir / "upcycle_digits.md").write_text(table + "\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
