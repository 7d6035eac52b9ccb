"""The routing study on the digits: every router of the layer and the dense model, several seeds.

    python experiments/routing_study.py [--steps 1500] [--seeds 0 1 2] [--routings dense tc ec diffmoe race race-plr promoe]

At equal activated parameters and equal training FLOPs per token (30 D^2 in each feed-forward,
D=96, as in ``ablate_digits.py``): the dense DiT-Ti/2 with a GELU MLP of ratio 15, and
DiT-MoE-Ti/2-8E2A (top-2 SwiGLU experts of 4D and a shared expert of 2D) routed by token choice,
expert choice per image, DiffMoE's batch pool, Expert Race (without and with Race-DiT's
per-layer regularization, weight 0.1) and ProMoE (each averaging 2 experts per token in
training). Each is trained with the digits preset for the same steps, once per seed; its final EMA draws ``--samples-per-class`` samples per class with guidance 4 (DDPM,
``--sample-steps``), scored by ``dit.evaluate``'s digits report (classifier accuracy and Fréchet
distance in the classifier's features), while ``dit.analyze``'s recorder counts the experts each
token gets, by sampling step and by patch position.

Writes to ``--results-dir``: ``routing_study.md`` (the table: mean and spread over seeds of the
final loss, the steps to reach the dense model's final loss, accuracy, Fréchet distance, and
experts per token), ``routing_study.png`` (loss curves; experts per token by sampling step and by
position) and ``routing_study.json`` (every number). Each run saves its result beside its checkpoints;
a later study with the same settings reads it instead of training again, so the study can be run
in parts (``--routings``) and goes on where a stopped one was.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from dit.analyze import RoutingRecorder
from dit.checkpoint import build_from_checkpoint, latest_checkpoint
from dit.evaluate import digits_metrics
from dit.sampling import generate, to_uint8
from dit.train import main as train_main

MOE = ["--model", "DiT-MoE-Ti/2-8E2A"]
# key: (name in the table, training flags)
ROUTINGS = {
    "dense": ("dense DiT (MLP x15)", ["--model", "DiT-Ti/2", "--set", "mlp_ratio=15"]),
    "tc": ("token choice (top-2)", MOE),
    "ec": ("expert choice (per image)", [*MOE, "--set", "router=expert-choice"]),
    "diffmoe": ("DiffMoE (batch pool)", [*MOE, "--set", "router=diffmoe"]),
    "race": ("Expert Race", [*MOE, "--set", "router=expert-race"]),
    "race-plr": (
        "Expert Race + per-layer reg.",
        [*MOE, "--set", "router=expert-race", "--set", "layer_regularization_coef=0.1"],
    ),
    "promoe": ("ProMoE", [*MOE, "--set", "router=promoe"]),
}
# Losses are noisy step to step: curves and the steps-to-target compare running means of this many logged losses.
WINDOW = 5


def loss_curve(run: Path) -> list[tuple[int, float]]:
    """``(step, loss)`` of every line ``dit.train`` logged."""
    curve = []
    for line in (run / "log.txt").read_text().splitlines():
        if "| loss " in line and "] step " in line:
            step = int(line.split("] step ")[1].split("|")[0])
            curve.append((step, float(line.split("| loss ")[1].split()[0])))
    return curve


def smoothed(curve: list[tuple[int, float]]) -> list[tuple[int, float]]:
    losses = [loss for _, loss in curve]
    return [(step, statistics.fmean(losses[max(0, i + 1 - WINDOW) : i + 1])) for i, (step, _) in enumerate(curve)]


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first logged step whose running-mean loss is at most ``target``."""
    return next((step for step, loss in smoothed(curve) if loss <= target), None)


def evaluate(checkpoint: Path, per_class: int, sample_steps: int) -> dict:
    """The digits report of guided samples, and the experts per token by step and by position."""
    model = build_from_checkpoint(checkpoint).eval()
    labels = torch.arange(10).repeat_interleave(per_class)
    recorder = RoutingRecorder(model, sample_steps).attach() if model.moe_layers() else None
    if recorder:
        recorder.start(labels)
    images = generate(model, labels, 4.0, sample_steps, seed=0)
    result = digits_metrics(to_uint8(images), labels.numpy())
    if recorder:
        recorder.detach()
        layers, tokens = recorder.by_step.shape[0], model.grid_size**2
        # Choices of the conditional images' tokens, over layers: per step [S], per position [P].
        per_step = recorder.by_step.sum(dim=(0, 2)).double() / (layers * len(labels) * tokens)
        per_position = recorder.by_position.sum(dim=(0, 2)).double() / (layers * len(labels) * sample_steps)
        result.update(experts_by_step=per_step.tolist(), experts_by_position=per_position.tolist())
    return {key: value for key, value in result.items() if key != "accuracy_per_class"}


def study_run(key: str, seed: int, args: argparse.Namespace) -> dict:
    """Train and evaluate one routing at one seed, or read the result an earlier study saved with the same
    settings (a study stopped midway, or run in parts, goes on where it was)."""
    out = args.results_dir / key / f"seed{seed}"
    settings = {"flags": ROUTINGS[key][1], "steps": args.steps, "log_every": args.log_every,
                "samples_per_class": args.samples_per_class, "sample_steps": args.sample_steps}  # fmt: skip
    saved = out / "result.json"
    if saved.is_file():
        stored = json.loads(saved.read_text())
        if stored.get("settings") == settings:
            return stored["result"]
    train_main([*ROUTINGS[key][1], "--steps", str(args.steps), "--seed", str(seed), "--results-dir", str(out),
                "--log-every", str(args.log_every), "--sample-steps", "2"])  # fmt: skip
    run = sorted(out.glob("[0-9][0-9][0-9]-*"))[-1]
    curve = loss_curve(run)
    result = evaluate(latest_checkpoint(run / "checkpoints"), args.samples_per_class, args.sample_steps)
    result.update(curve=curve, final_loss=smoothed(curve)[-1][1])
    saved.write_text(json.dumps({"settings": settings, "result": result}))
    return result


def _spread(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def table(runs: dict, steps: int, seeds: list[int]) -> str:
    """The markdown table of ``runs`` ({key: {seed: result}})."""
    dense_final = [r["final_loss"] for r in runs.get("dense", {}).values()]
    target = statistics.fmean(dense_final) if dense_final else None
    lines = [
        f"Digits preset, {steps} steps, seeds {', '.join(map(str, seeds))}; mean ± standard deviation over seeds. "
        "Final loss: the running mean of the last logged losses; to dense loss: the first logged step whose running "
        "mean reaches the dense model's final loss (- where none does).",
        "",
        "| routing | final loss | steps to dense loss | accuracy | Fréchet distance | experts per token (sampling: mean, min-max over steps) |",
        "|---|---|---|---|---|---|",
    ]
    for key, by_seed in runs.items():
        results = list(by_seed.values())
        reached = [steps_to(r["curve"], target) for r in results] if target is not None else []
        reached_text = "-" if target is None or any(s is None for s in reached) else _spread(reached, 0)
        experts = [statistics.fmean(r["experts_by_step"]) for r in results if "experts_by_step" in r]
        by_step = [e for r in results for e in r.get("experts_by_step", [])]
        experts_text = f"{_spread(experts, 2)} ({min(by_step):.2f}-{max(by_step):.2f})" if by_step else "- (dense)"
        lines.append(
            f"| {ROUTINGS[key][0]} | {_spread([r['final_loss'] for r in results], 4)} | {reached_text} | "
            f"{_spread([r['accuracy'] for r in results], 3)} | {_spread([r['frechet_distance'] for r in results], 2)} | "
            f"{experts_text} |"
        )
    return "\n".join(lines)


def figure(runs: dict, path: Path) -> None:
    """Loss curves (running means, averaged over seeds), and experts per token by sampling step and by position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (losses, by_step, by_position) = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    for key, by_seed in runs.items():
        # One colour per routing in every panel (the dense model has no experts-per-token lines).
        style = dict(label=ROUTINGS[key][0], color=f"C{list(ROUTINGS).index(key)}")
        curves = [smoothed(r["curve"]) for r in by_seed.values()]
        steps = [step for step, _ in curves[0]]
        losses.plot(steps, [statistics.fmean(c[i][1] for c in curves) for i in range(len(steps))], **style)
        results = [r for r in by_seed.values() if "experts_by_step" in r]
        for axis, field in ((by_step, "experts_by_step"), (by_position, "experts_by_position")):
            if results:
                values = torch.tensor([r[field] for r in results]).mean(dim=0)
                axis.plot(range(len(values)), values.tolist(), **style)
    losses.set(xlabel="training step", ylabel=f"loss (running mean of {WINDOW} logs)", yscale="log")
    by_step.set(xlabel="sampling step (noisy -> clean)", ylabel="experts per token")
    by_position.set(xlabel="patch position (row-major)", ylabel="experts per token")
    for axis in (losses, by_step, by_position):
        axis.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--routings", nargs="+", choices=list(ROUTINGS), default=list(ROUTINGS))
    p.add_argument("--samples-per-class", type=int, default=10)
    p.add_argument("--sample-steps", type=int, default=250)
    p.add_argument(
        "--log-every", type=int, default=25, help="training steps between logged losses (the curves' points)"
    )
    p.add_argument("--results-dir", type=Path, default=Path("results/routing_study"))
    args = p.parse_args(argv)
    runs: dict[str, dict[int, dict]] = {}
    for key in args.routings:
        for seed in args.seeds:
            runs.setdefault(key, {})[seed] = result = study_run(key, seed, args)
            print(ROUTINGS[key][0], f"seed {seed}", json.dumps({k: v for k, v in result.items() if k != "curve"}))
    text = table(runs, args.steps, args.seeds)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "routing_study.md").write_text(text + "\n")
    (args.results_dir / "routing_study.json").write_text(json.dumps(runs, indent=1))
    figure(runs, args.results_dir / "routing_study.png")
    print(text)
    return text


if __name__ == "__main__":
    main()
