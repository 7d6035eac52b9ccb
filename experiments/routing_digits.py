"""Token choice, expert choice and DiffMoE at the tiny CPU scale, at equal FLOPs and steps.

    python experiments/routing_digits.py [--steps 1500] [--routings tc ec diffmoe] [--results-dir results/routing]

Trains DiT-MoE-Ti/2-8E2A with the digits preset, same seed, once per routing: DiT-MoE's token
choice (top-2, balance loss), expert choice per image (each expert takes top_k * 16 / 8 = 4 of an
image's 16 tokens, no balance loss: the same FLOPs) and DiffMoE (expert choice over the whole
batch's tokens, same FLOPs, plus its capacity predictor). Each final EMA draws 100 samples (DDPM
250 steps, guidance 4), scored by ``dit.evaluate``'s digits report; expert choice also at 0.5x,
1x and 2x its training capacity (``capacity_factor`` 1, 2, 4), DiffMoE at capacity offsets -1, 0
and +1. The experts per token column is measured while sampling (all MoE layers, both guidance
passes). Prints a markdown table and writes it to ``<results-dir>/routing_digits.md``.
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
# name: (short name, training flags, sampling dials as (column text, set_expert_compute arguments))
ROUTINGS = {
    "token choice (top-2)": ("tc", [], [("top-2", {})]),
    "expert choice (per image)": (
        "ec",
        ["--set", "router=expert-choice"],
        [(f"{f / 2:g}x (capacity_factor {f:g})", dict(capacity_factor=f)) for f in (1.0, 2.0, 4.0)],
    ),
    "DiffMoE (batch pool, predictor)": (
        "diffmoe",
        ["--set", "router=diffmoe"],
        [(f"offset {o:+g}", dict(capacity_offset=o)) for o in (-1.0, 0.0, 1.0)],
    ),
}


def evaluate(checkpoint: Path, dial: dict) -> tuple[dict, float]:
    """The digits report of 100 samples, and the mean experts per token while drawing them."""
    model = build_from_checkpoint(checkpoint).eval()
    model.set_expert_compute(**dial)
    rows = tokens = 0

    def count(moe, args, output):
        nonlocal rows, tokens
        rows += int(moe.expert_counts.sum())
        tokens += args[0].shape[:-1].numel()

    hooks = [moe.register_forward_hook(count) for moe in model.moe_layers()]
    labels = torch.arange(10).repeat_interleave(10)
    images = generate(model, labels, 4.0, 250, seed=0)
    for hook in hooks:
        hook.remove()
    return digits_metrics(to_uint8(images), labels.numpy()), rows / tokens


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--results-dir", type=Path, default=Path("results/routing"))
    short = [entry[0] for entry in ROUTINGS.values()]
    p.add_argument("--routings", nargs="+", choices=short, default=short, help="the routings to train and score")
    args = p.parse_args(argv)
    lines = [
        f"Digits preset, {args.steps} steps, seed 0, {MODEL}; 100 samples (DDPM 250, guidance 4) per row.",
        "",
        "| routing | compute at sampling | experts per token | final loss | accuracy | Fréchet distance |",
        "|---|---|---|---|---|---|",
    ]
    for name, (key, extra, dials) in ROUTINGS.items():
        if key not in args.routings:
            continue
        out = args.results_dir / key
        train_main(["--model", MODEL, "--steps", str(args.steps), "--results-dir", str(out), "--seed", "0", *extra])
        run = sorted(out.iterdir())[-1]
        loss = [line for line in (run / "log.txt").read_text().splitlines() if "| loss " in line][-1]
        loss = float(loss.split("| loss ")[1].split()[0])
        checkpoint = latest_checkpoint(run / "checkpoints")
        for shown, dial in dials:
            m, per_token = evaluate(checkpoint, dial)
            lines.append(
                f"| {name} | {shown} | {per_token:.2f} | {loss:.4f} | {m['accuracy']:.2f} | {m['frechet_distance']:.2f} |"
            )
    table = "\n".join(lines)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"routing_digits_{'_'.join(args.routings)}.md").write_text(table + "\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
