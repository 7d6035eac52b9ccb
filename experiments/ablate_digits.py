"""Ablation at the tiny CPU scale: dense DiT vs DiT-MoE with and without shared experts.

    python experiments/ablate_digits.py [--steps 1500] [--results-dir results/ablation]

Three models with the same activated parameters per token (30 D^2 in each feed-forward, D=96),
trained with the digits preset for the same steps and seed:

* dense DiT-Ti/2, GELU MLP of ratio 15 (2 x 15 D^2);
* DiT-MoE-Ti/2-8E2A with the shared expert: top-2 SwiGLU experts of 4D (24 D^2) + shared 2D (6 D^2);
* DiT-MoE-Ti/2-8E2A without it, experts widened to 5D (top-2: 30 D^2).

Each model's EMA draws 50 samples per class (DDPM 250 steps, no guidance, so the models
themselves are compared), scored by ``dit.evaluate``'s digits report; routing statistics come
from ``dit.analyze``'s recorder. Prints a markdown table and writes it to ``table.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dit.analyze import RoutingRecorder, entropy_bits
from dit.checkpoint import build_from_checkpoint, latest_checkpoint
from dit.evaluate import digits_metrics
from dit.flops import count
from dit.sampling import generate, to_uint8
from dit.train import main as train_main

MODELS = {
    "dense DiT (MLP x15)": ["--model", "DiT-Ti/2", "--set", "mlp_ratio=15"],
    "DiT-MoE, shared expert": ["--model", "DiT-MoE-Ti/2-8E2A"],
    "DiT-MoE, no shared expert": [
        "--model",
        "DiT-MoE-Ti/2-8E2A",
        "--set",
        "num_shared_experts=0",
        "--set",
        "mlp_ratio=5",
    ],
}


def evaluate(checkpoint: Path, per_class: int, sample_steps: int, seed: int) -> dict:
    model = build_from_checkpoint(checkpoint).eval()
    labels = torch.arange(10).repeat_interleave(per_class)
    recorder = RoutingRecorder(model, sample_steps).attach() if model.moe_layers() else None
    if recorder:
        recorder.start(labels)
    images = generate(model, labels, 1.0, sample_steps, seed=seed)
    if recorder:
        recorder.detach()
    result = digits_metrics(to_uint8(images), labels.numpy())
    c = count(model.config)
    result.update(params=c.params, active_params=c.active_params, gflops=c.flops / 1e9)
    if recorder:
        load = recorder.by_position.sum(dim=1).double()  # [L, E] choices per expert
        result["load_cv"] = float((load.std(dim=1, unbiased=False) / load.mean(dim=1)).mean())
        result["entropy_by_position"] = float(entropy_bits(recorder.by_position).mean())
        result["entropy_by_step"] = float(entropy_bits(recorder.by_step).mean())
    return result


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--results-dir", default="results/ablation")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--sample-steps", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = {}
    for name, flags in MODELS.items():
        run_dir = Path(args.results_dir) / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        train_main(
            [
                *flags,
                "--steps",
                str(args.steps),
                "--seed",
                str(args.seed),
                "--results-dir",
                str(run_dir),
                "--sample-steps",
                "2",
            ]
        )
        checkpoint = latest_checkpoint(sorted(run_dir.glob("[0-9][0-9][0-9]-*"))[-1] / "checkpoints")
        rows[name] = evaluate(checkpoint, args.per_class, args.sample_steps, args.seed)
        print(name, json.dumps(rows[name]))
    lines = [
        "| model | params | active | GFLOPs/img | accuracy | worst class | Fréchet (classifier features) | expert load CV | entropy by position / step (bits) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        worst = min(r["accuracy_per_class"].values())
        routing = (
            f"{r['load_cv']:.2f} | {r['entropy_by_position']:.2f} / {r['entropy_by_step']:.2f}"
            if "load_cv" in r
            else "- | -"
        )
        lines.append(
            f"| {name} | {r['params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.2f}M | {r['gflops']:.3f} | "
            f"{r['accuracy']:.1%} | {worst:.0%} | {r['frechet_distance']:.2f} | {routing} |"
        )
    table = "\n".join(lines)
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.results_dir) / "table.md").write_text(table + "\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
