"""Routing analysis, as in the paper's Figs. 5-7: ``python -m dit.analyze --ckpt PATH``.

Samples with the EMA weights while recording, for every MoE layer, which experts each token
goes to; then draws how often each expert is chosen per class (Fig. 5), per patch position
(Fig. 6) and per denoising step (Fig. 7), one panel per layer, saves the raw counts
(``routing_counts.npz``) and prints the entropy of expert use per layer and per step.

Under expert choice a token gets 0 to E experts, so the compute it receives varies: the
analysis then also draws the distribution of experts per token by patch position and by step
(``experts_per_token_by_{position,step}.png``), with the mean experts per token and the share of
tokens no expert took in the summary. Recording hooks into ``MoE.on_route``; a model without a
recorder attached pays nothing.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moe_kernels import ROUTERS

from .checkpoint import build_from_checkpoint
from .cli import add_moe_backend_argument, coefficient, nonnegative_int, positive_int, seed
from .files import check_writable_dir
from .models import DiT
from .sampling import SAMPLERS, check_steps, generate


class RoutingRecorder:
    """Counts expert choices of the conditional images, per layer, by class, patch and step.

    Attach it, run the sampler once per batch (``start(labels)`` before each), detach.
    ``by_class [L, C, E]``, ``by_position [L, P, E]``, ``by_step [L, S, E]`` hold the counts of
    (token, expert) pairs. Under expert choice, ``per_token_by_position [L, P, E + 1]`` and
    ``per_token_by_step [L, S, E + 1]`` count the tokens that got 0, 1, ..., E experts (else
    ``None``).
    """

    def __init__(self, model: DiT, num_steps: int):
        self.model = model
        layers = model.moe_layers()
        if not layers:
            raise ValueError("the model has no MoE layers to analyse")
        L, E, P = len(layers), layers[0].num_experts, model.grid_size**2
        self.expert_choice = not ROUTERS[model.config.router].top_k_per_token
        self.by_class = torch.zeros(L, model.config.num_classes, E, dtype=torch.long)
        self.by_position = torch.zeros(L, P, E, dtype=torch.long)
        self.by_step = torch.zeros(L, num_steps, E, dtype=torch.long)
        self.per_token_by_position = torch.zeros(L, P, E + 1, dtype=torch.long) if self.expert_choice else None
        self.per_token_by_step = torch.zeros(L, num_steps, E + 1, dtype=torch.long) if self.expert_choice else None
        self.step, self.labels = -1, None
        self._hook = None

    def attach(self) -> RoutingRecorder:
        for index, moe in enumerate(self.model.moe_layers()):
            moe.on_route = lambda experts, weights, index=index: self._record(index, experts)
        # Each sampling step calls the model once (guidance batches both passes together).
        self._hook = self.model.register_forward_pre_hook(lambda module, args: self._next_step())
        return self

    def detach(self) -> None:
        for moe in self.model.moe_layers():
            moe.on_route = None
        if self._hook is not None:
            self._hook.remove()

    def start(self, labels: torch.Tensor) -> None:
        self.labels, self.step = labels.cpu(), -1

    def _next_step(self) -> None:
        self.step += 1

    def _chosen(self, experts: torch.Tensor) -> torch.Tensor:
        """``[B, P, E]``: how often each conditional image's patch went to each expert, from the
        token-choice experts ``[T, k]`` or the expert-choice mask ``[T, E]``. The conditional
        images come first in a guided batch."""
        B, P, E = len(self.labels), self.by_position.shape[1], self.by_position.shape[2]
        if self.expert_choice:
            return experts[: B * P].cpu().view(B, P, E).long()
        return F.one_hot(experts[: B * P].cpu().view(B, P, -1), E).sum(dim=2)

    def _record(self, layer: int, experts: torch.Tensor) -> None:
        chosen = self._chosen(experts)
        self.by_class[layer].index_add_(0, self.labels, chosen.sum(dim=1))
        self.by_position[layer] += chosen.sum(dim=0)
        in_steps = self.step < self.by_step.shape[1]
        if in_steps:
            self.by_step[layer, self.step] += chosen.sum(dim=(0, 1))
        if self.expert_choice:
            per_token = F.one_hot(chosen.sum(dim=2), chosen.shape[2] + 1)  # [B, P, E + 1]
            self.per_token_by_position[layer] += per_token.sum(dim=0)
            if in_steps:
                self.per_token_by_step[layer, self.step] += per_token.sum(dim=(0, 1))


def entropy_bits(counts: torch.Tensor) -> torch.Tensor:
    """Entropy (bits) of the expert distribution along the last axis."""
    p = counts.double() / counts.sum(dim=-1, keepdim=True).clamp(min=1)
    return -(p * torch.log2(p.clamp(min=1e-12))).sum(dim=-1)


def heatmaps(
    counts: torch.Tensor,
    ylabel: str,
    title: str,
    path: Path,
    yticks: list[str] | None = None,
    xlabel: str = "expert",
    colorbar: str = "share of the row's expert choices",
) -> None:
    """One panel per layer: rows are classes / positions / steps, columns experts (or expert
    counts); each row shows the share of that row's total in each column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, rows, E = counts.shape
    shares = (counts.double() / counts.sum(dim=-1, keepdim=True).clamp(min=1)).numpy()
    cols = min(L, 4)
    grid_rows = math.ceil(L / cols)
    fig, axes = plt.subplots(
        grid_rows, cols, figsize=(3.4 * cols + 1.2, 2.9 * grid_rows + 0.6), squeeze=False, constrained_layout=True
    )
    for layer in range(grid_rows * cols):
        ax = axes[layer // cols][layer % cols]
        if layer >= L:
            ax.axis("off")
            continue
        image = ax.imshow(
            shares[layer], aspect="auto", cmap="viridis", vmin=0, vmax=max(shares.max(), 1e-9), interpolation="nearest"
        )
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xticks(range(E))
        ax.tick_params(labelsize=7)
        if yticks is not None and len(yticks) <= 20:
            ax.set_yticks(range(len(yticks)), yticks)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label=colorbar)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(recorder: RoutingRecorder) -> str:
    E = recorder.by_step.shape[2]
    lines = [
        f"entropy of expert use, bits (uniform over {E} experts = {math.log2(E):.2f})",
        "layer  overall  by-class(mean)  by-position(mean)",
    ]
    overall = entropy_bits(recorder.by_position.sum(dim=1))
    for layer in range(len(overall)):
        lines.append(
            f"{layer:5d}  {overall[layer]:7.3f}  {entropy_bits(recorder.by_class[layer]).mean():14.3f}"
            f"  {entropy_bits(recorder.by_position[layer]).mean():17.3f}"
        )
    steps = entropy_bits(recorder.by_step).mean(dim=0)
    picks = sorted({0, len(steps) // 4, len(steps) // 2, 3 * len(steps) // 4, len(steps) - 1})
    lines.append("step (0 = first, noisiest)  mean entropy over layers")
    lines += [f"{s:5d}  {steps[s]:.3f}" for s in picks]
    if recorder.expert_choice:
        mean, unchosen = experts_per_token(recorder.per_token_by_position.sum(dim=1))
        lines.append("experts per token (expert choice): layer  mean  share of tokens with none")
        lines += [f"{layer:5d}  {mean[layer]:.3f}  {unchosen[layer]:.3f}" for layer in range(len(mean))]
        mean, unchosen = experts_per_token(recorder.per_token_by_step.sum(dim=0))
        lines.append("step  mean experts per token  share with none (over layers)")
        lines += [f"{s:5d}  {mean[s]:.3f}  {unchosen[s]:.3f}" for s in picks]
    return "\n".join(lines)


def experts_per_token(histogram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From ``[..., E + 1]`` counts of tokens with 0..E experts: the mean experts per token and
    the share of tokens with none."""
    total = histogram.sum(dim=-1).clamp(min=1).double()
    mean = (histogram.double() * torch.arange(histogram.shape[-1])).sum(dim=-1) / total
    return mean, histogram[..., 0].double() / total


def analyze(args: argparse.Namespace) -> RoutingRecorder:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_from_checkpoint(args.ckpt, "ema", moe_backend=args.moe_backend).to(device).eval()
    config = model.config
    check_steps(config, args.steps, args.sampler)
    classes = args.classes if args.classes is not None else list(range(min(config.num_classes, 10)))
    if any(not 0 <= c < config.num_classes for c in classes):
        raise ValueError(f"--classes must lie in [0, {config.num_classes})")
    out = check_writable_dir(args.out, "--out")
    labels = torch.tensor(classes).repeat_interleave(args.samples_per_class)
    recorder = RoutingRecorder(model, args.steps).attach()
    try:
        for first in tqdm(range(0, len(labels), args.batch_size), desc="sampling with routing recorded"):
            chunk = labels[first : first + args.batch_size]
            recorder.start(chunk)
            generate(model, chunk, args.cfg_scale, args.steps, args.sampler, seed=args.seed, first_index=first)
    finally:
        recorder.detach()

    per_token = {}
    if recorder.expert_choice:
        per_token = dict(
            per_token_by_position=recorder.per_token_by_position.numpy(),
            per_token_by_step=recorder.per_token_by_step.numpy(),
        )
    np.savez(
        out / "routing_counts.npz",
        by_class=recorder.by_class.numpy(),
        by_position=recorder.by_position.numpy(),
        by_step=recorder.by_step.numpy(),
        classes=np.array(classes),
        **per_token,
    )
    heatmaps(
        recorder.by_class[:, classes],
        "class",
        "Expert choices per class (Fig. 5)",
        out / "experts_by_class.png",
        [str(c) for c in classes],
    )
    heatmaps(
        recorder.by_position,
        "patch position (row-major)",
        "Expert choices per patch position (Fig. 6)",
        out / "experts_by_position.png",
    )
    heatmaps(
        recorder.by_step,
        "denoising step (noisiest first)",
        "Expert choices per denoising step (Fig. 7)",
        out / "experts_by_step.png",
    )
    maps = "experts_by_{class,position,step}.png"
    if recorder.expert_choice:
        for counts, ylabel, what in (
            (recorder.per_token_by_position, "patch position (row-major)", "position"),
            (recorder.per_token_by_step, "denoising step (noisiest first)", "step"),
        ):
            heatmaps(
                counts,
                ylabel,
                f"Experts per token by {what} (expert choice)",
                out / f"experts_per_token_by_{what}.png",
                xlabel="experts per token",
                colorbar="share of the row's tokens",
            )
        maps += ", experts_per_token_by_{position,step}.png"
    text = summary(recorder)
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    print(f"wrote routing_counts.npz, {maps} and summary.txt to {out}")
    return recorder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dit.analyze", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", required=True, help="checkpoint directory or .safetensors file of a DiT-MoE")
    p.add_argument("--samples-per-class", type=positive_int, default=16)
    p.add_argument(
        "--classes", type=nonnegative_int, nargs="+", default=None, help="classes to sample (default: the first 10)"
    )
    p.add_argument("--steps", type=positive_int, default=50, help="sampling steps (rows of the per-step map)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None)
    p.add_argument("--cfg-scale", type=coefficient, default=1.5)
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", default="routing")
    add_moe_backend_argument(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        analyze(args)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error


if __name__ == "__main__":
    main()
