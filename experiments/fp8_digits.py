"""FP8 experts on the digits: a model trained at one precision, sampled at several.

    python experiments/fp8_digits.py [--train-precision tf32] [--sample-precisions tf32 bf16 fp8]
                                     [--steps 1500] [--results-dir results/fp8]

Trains DiT-MoE-Ti/2-8E2A with the digits preset (seed 0) at ``dit.train --precision
<train-precision>`` (``fp8``: the routed experts' GEMMs in FP8 from fp32 weights; on a CPU the
exact emulation of the FP8 kernels), then draws 100 samples from its EMA (DDPM 250 steps,
guidance 4, seed 0) at each sampling precision of ``dit.sample``: ``tf32`` (fp32 on a CPU),
``bf16`` and ``fp8`` (bf16 with the routed experts stored in FP8). Scores them with
``dit.evaluate``'s digits report and writes a markdown table to
``<results-dir>/fp8_digits.md`` (``fp8_digits_train-<precision>.md`` for a training precision
other than tf32).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dit.checkpoint import build_from_checkpoint, latest_checkpoint
from dit.evaluate import digits_metrics
from dit.precision import PRECISIONS, inference_weights, use_precision
from dit.sampling import generate, to_uint8
from dit.train import main as train_main

MODEL = "DiT-MoE-Ti/2-8E2A"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-precision", choices=PRECISIONS, default="tf32")
    p.add_argument("--sample-precisions", nargs="+", choices=PRECISIONS, default=["tf32", "bf16", "fp8"])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--results-dir", type=Path, default=Path("results/fp8"))
    args = p.parse_args(argv)
    out = args.results_dir / "run"
    train_main(
        ["--model", MODEL, "--steps", str(args.steps), "--results-dir", str(out), "--seed", "0",
         "--precision", args.train_precision]
    )  # fmt: skip
    checkpoint = latest_checkpoint(sorted(out.iterdir())[-1] / "checkpoints")
    labels = torch.arange(10).repeat_interleave(10)
    lines = [
        f"Digits preset, {args.steps} steps, seed 0, {MODEL}, trained with --precision {args.train_precision}; "
        "100 samples (DDPM 250, guidance 4, seed 0) per row.",
        "",
        "| sampling precision | accuracy | Fréchet distance |",
        "|---|---|---|",
    ]
    for precision in args.sample_precisions:
        model = inference_weights(build_from_checkpoint(checkpoint).eval(), precision)
        with use_precision(precision, torch.device("cpu")):
            images = generate(model, labels, 4.0, 250, seed=0)
        m = digits_metrics(to_uint8(images), labels.numpy())
        lines.append(f"| {precision} | {m['accuracy']:.2f} | {m['frechet_distance']:.2f} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.train_precision == "tf32" else f"_train-{args.train_precision}"
    (args.results_dir / f"fp8_digits{suffix}.md").write_text(table + "\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
