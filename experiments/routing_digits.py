"""Token choice against expert choice at the tiny CPU scale, at equal FLOPs and steps.

    python experiments/routing_digits.py [--steps 1500] [--results-dir results/routing]

Trains DiT-MoE-Ti/2-8E2A with the digits preset twice, same seed: DiT-MoE's token choice (top-2,
balance loss) and expert choice per image (each expert takes top_k * 16 / 8 = 4 of an image's 16
tokens, no balance loss: the same FLOPs). Each final EMA draws 100 samples (DDPM 250 steps,
guidance 4), scored by ``dit.evaluate``'s digits report; expert choice also at 0.5x, 1x and 2x its
training capacity (``MoE.capacity_factor`` 1, 2, 4). Prints a markdown table and writes it to
``<results-dir>/routing_digits.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dit.checkpoint import build_from_checkpoint, latest_checkpoint
from dit.evaluate import digits_metrics
from dit.sampling import generate, to_uint8
from dit.train import main as train_main

MODEL = "DiT-MoE-Ti/2-8E2A"
ROUTINGS = {"token choice (top-2)": [], "expert choice (per image)": ["--set", "routing=expert-choice"]}


def evaluate(checkpoint: Path, capacity_factor: float | None = None) -> dict:
    model = build_from_checkpoint(checkpoint).eval()
    if capacity_factor is not None:
        for moe in model.moe_layers():
            moe.capacity_factor = capacity_factor
    labels = torch.arange(10).repeat_interleave(10)
    return digits_metrics(to_uint8(generate(model, labels, 4.0, 250, seed=0)), labels.numpy())


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--results-dir", type=Path, default=Path("results/routing"))
    args = p.parse_args(argv)
    lines = [
        f"Digits preset, {args.steps} steps, seed 0, {MODEL}; 100 samples (DDPM 250, guidance 4) per row.",
        "",
        "| routing | capacity at sampling | final loss | accuracy | Fréchet distance |",
        "|---|---|---|---|---|",
    ]
    for name, extra in ROUTINGS.items():
        out = args.results_dir / name.split()[0]
        train_main(["--model", MODEL, "--steps", str(args.steps), "--results-dir", str(out), "--seed", "0", *extra])
        run = sorted(out.iterdir())[-1]
        loss = [line for line in (run / "log.txt").read_text().splitlines() if "| loss " in line][-1]
        loss = float(loss.split("| loss ")[1].split()[0])
        checkpoint = latest_checkpoint(run / "checkpoints")
        factors = [None] if extra == [] else [1.0, 2.0, 4.0]
        for factor in factors:
            m = evaluate(checkpoint, factor)
            shown = "top-2" if factor is None else f"{factor / 2:g}x ({factor:g} per token)"
            lines.append(f"| {name} | {shown} | {loss:.4f} | {m['accuracy']:.2f} | {m['frechet_distance']:.2f} |")
    table = "\n".join(lines)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "routing_digits.md").write_text(table + "\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
