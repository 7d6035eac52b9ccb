"""Per-GPU training memory of DiT-MoE under each parallel layout, estimated from the config.

    python -m dit.memory --gpus 8 --ep 8 --fsdp --grad-checkpointing --batch 32

What ``dit.train`` keeps on each GPU, in bytes:

- parameters, gradients (fp32), AdamW's two moments (fp32) and the EMA copy (fp32), each split
  by the layout: without FSDP, the routed experts are divided among the ``ep`` ranks of a group
  and everything else is replicated; with FSDP every parameter is divided among all GPUs (the
  experts over ``ep`` x data-parallel ranks, the rest over all ranks). FSDP also holds the full
  parameters and gradients of the blocks it is working on (two blocks, in the compute dtype, for
  prefetching).
- activations saved for the backward pass, counted tensor by tensor for one block, in the
  compute dtype (bf16 by default), for ``batch`` images per GPU: the block input, the two
  LayerNorms and their modulations, q/k/v and the attention output, the router probabilities, per
  routed slot the expert's pre-activation, hidden and output rows (and, with expert parallelism,
  the input row it received), and the shared expert's.
  With ``--grad-checkpointing`` only each block's input is kept, plus one block recomputed at a
  time. The routed slots a GPU computes are counted at their mean, ``k`` per token: an
  unbalanced router needs more.

Allocator fragmentation, the CUDA context (about 0.5 GB) and communication buffers are not counted.

``--sampling`` prints instead what the weights of a sampling run take: fp32, bf16
(``dit.sample --precision bf16``) and bf16 with FP8 routed experts (``--precision fp8``: one byte
per expert weight plus an fp32 scale per 128x128 block).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch

from moe_kernels import projection_width
from moe_kernels.fp8 import BLOCK as FP8_BLOCK

from .cli import positive_float, positive_int
from .flops import PAPER, count, latent_side
from .models import DiTConfig, parse_model_name

FP32 = 4
GiB = 2**30


@dataclass(frozen=True)
class Layout:
    """``gpus`` processes, expert-parallel degree ``ep``, with or without FSDP."""

    gpus: int
    ep: int = 1
    fsdp: bool = False
    grad_checkpointing: bool = False

    def check(self, config: DiTConfig) -> None:
        if self.gpus < 1 or self.ep < 1:
            raise ValueError(f"--gpus and --ep must be >= 1, got {self.gpus} and {self.ep}")
        if self.gpus % self.ep:
            raise ValueError(f"--ep {self.ep} must divide --gpus {self.gpus}")
        if self.ep > 1 and config.num_experts % self.ep:
            raise ValueError(
                f"--ep {self.ep} must divide the experts per layer of {config.name} ({config.num_experts})"
            )

    def describe(self) -> str:
        parts = [f"{self.gpus} GPU(s)", f"ep {self.ep}"]
        if self.fsdp:
            parts.append("FSDP")
        if self.grad_checkpointing:
            parts.append("grad ckpt")
        return ", ".join(parts)


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU."""

    params: float
    grads: float
    optimizer: float
    ema: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.ema + self.activations


def local_parameters(config: DiTConfig, layout: Layout) -> float:
    """The parameters one GPU stores (its shards; FSDP's gathered working copies not included)."""
    counts = count(config)
    experts, rest = counts.expert_params, counts.params - counts.expert_params
    if layout.fsdp:
        return (experts + rest) / layout.gpus
    return experts / layout.ep + rest


def estimate(config: DiTConfig, layout: Layout, batch: int, compute_bytes: int = 2) -> Memory:
    """Per-GPU memory of training ``config`` with ``batch`` images per GPU, activations and
    FSDP's gathered blocks in ``compute_bytes`` per value (2: bf16)."""
    layout.check(config)
    local = local_parameters(config, layout)
    params, grads = local * FP32, local * FP32
    if layout.fsdp:
        counts = count(config)
        # A block gathers its replicated weights whole and, of the experts, its ep rank's share.
        block = counts.block_params - counts.expert_params / config.depth * (1 - 1 / layout.ep)
        params += 2 * block * compute_bytes
        grads += 2 * block * compute_bytes
    return Memory(
        params=params,
        grads=grads,
        optimizer=2 * local * FP32,
        ema=local * FP32,
        activations=activation_bytes(config, batch, layout.grad_checkpointing, compute_bytes, layout.ep > 1),
    )


def available_bytes(device: torch.device) -> int:
    """The memory a process may count on: a GPU's total, or the host's available memory shared by
    the processes of this node (``LOCAL_WORLD_SIZE``, as torchrun sets it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as info:
            fields = dict(line.split(":", 1) for line in info)
        total = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def check_fits(
    config: DiTConfig, layout: Layout, batch: int, compute_bytes: int, device: torch.device, data: float = 0
) -> None:
    """``ValueError`` before anything is allocated when training ``config`` (``batch`` images per
    process, ``data`` bytes of a dataset held in memory) cannot fit in what ``device`` has, saying
    how much it needs and how much there is. The estimate is ``estimate``'s; a run that needs
    more than that many bytes would end in an allocator's failure (or in swapping) instead."""
    memory = estimate(config, layout, batch, compute_bytes)
    needed, available = memory.total + data, available_bytes(device)
    if needed > available:
        parts = (
            ("weights, gradients, AdamW and EMA", memory.total - memory.activations),
            ("activations", memory.activations),
            ("data", data),
        )
        shown = ", ".join(f"{name} {_size(value)}" for name, value in parts if value)
        raise ValueError(
            f"this run needs about {_size(needed)} per process ({shown}) and {device} has {_size(available)}: "
            "make the model or the batch smaller, add processes or --grad-checkpointing, or pass "
            "--skip-memory-check to go ahead anyway"
        )


def _size(count: float) -> str:
    return f"{count / GiB:.3g} GiB" if count >= GiB else f"{count / 2**20:.3g} MiB"


def activation_bytes(
    config: DiTConfig, batch: int, grad_checkpointing: bool, compute_bytes: int = 2, expert_parallel: bool = False
) -> float:
    """Saved activations of ``batch`` images through the whole model (see the module docstring)."""
    D, k, E = config.hidden_size, config.top_k, config.num_experts
    tokens = batch * (config.input_size // config.patch_size) ** 2
    H = int(D * config.mlp_ratio)
    # Attention: block input, LayerNorm output, modulation, q/k/v, output, projection output.
    attention = 8 * D
    if E:
        shared = config.num_shared_experts * D
        # LayerNorm input and output, modulation, router logits; per slot the pre-activation (2H),
        # hidden and output rows (and with expert parallelism the received input row); the shared
        # expert's pre-activation and hidden; the layer's output.
        ffn = 3 * D + E + k * (3 * H + D + (D if expert_parallel else 0)) + 3 * shared + D
    else:
        ffn = 3 * D + 2 * H + D
    per_block = tokens * (attention + ffn) * compute_bytes
    if grad_checkpointing:
        return config.depth * tokens * D * compute_bytes + per_block
    return config.depth * per_block


def sampling_weight_bytes(config: DiTConfig, precision: str) -> float:
    """Bytes of ``config``'s weights for sampling at ``precision`` (``"fp32"``, ``"bf16"`` or
    ``"fp8"``: bf16 with the routed experts' matrices in FP8 and their block scales in fp32)."""
    params = count(config).params
    if precision != "fp8" or not config.num_experts:
        return params * (FP32 if precision == "fp32" else 2)
    D, H, E = config.hidden_size, int(config.hidden_size * config.mlp_ratio), config.num_experts
    width_in = projection_width(config.expert_activation, H)
    blocks = -(-D // FP8_BLOCK) * -(-width_in // FP8_BLOCK) + -(-H // FP8_BLOCK) * -(-D // FP8_BLOCK)
    matrices = config.depth * E * (D * width_in + H * D)
    return matrices + config.depth * E * blocks * FP32 + (params - matrices) * 2


def sampling_table(configs: list[DiTConfig]) -> str:
    """One row per model: GiB of its weights for sampling in fp32, bf16 and with FP8 experts."""
    header = ("model", "params", "fp32", "bf16", "fp8 experts", "fp8 / bf16")
    rows = []
    for config in configs:
        fp32, bf16, fp8 = (sampling_weight_bytes(config, p) for p in ("fp32", "bf16", "fp8"))
        rows.append(
            (
                config.name,
                f"{count(config).params / 1e9:.2f}B",
                *(f"{b / GiB:.2f}" for b in (fp32, bf16, fp8)),
                f"{fp8 / bf16:.2f}",
            )
        )
    return _format(header, rows)


def table(configs: list[DiTConfig], layout: Layout, batch: int, budget_gib: float = 80) -> str:
    """One row per model: GiB per GPU of each part, the total, and whether it fits ``budget_gib``."""
    header = ("model", "params", "grads", "AdamW", "EMA", "activations", "total", f"fits {budget_gib:g} GiB")
    rows = []
    for config in configs:
        try:
            m = estimate(config, layout, batch)
        except ValueError as error:
            rows.append((config.name, *[""] * 6, f"({error})"))
            continue
        cells = [f"{value / GiB:.1f}" for value in (m.params, m.grads, m.optimizer, m.ema, m.activations, m.total)]
        rows.append((config.name, *cells, "yes" if m.total <= budget_gib * GiB else "no"))
    return _format(header, rows)


def layouts_table(config: DiTConfig, gpus: int, batch: int, budget_gib: float = 80) -> str:
    """Every layout of ``gpus`` GPUs for one model, smallest total first."""
    header = ("layout", "params", "grads", "AdamW", "EMA", "activations", "total", f"fits {budget_gib:g} GiB")
    rows = []
    for ep in [e for e in range(1, gpus + 1) if gpus % e == 0 and config.num_experts % e == 0]:
        for fsdp in (False, True):
            for grad_checkpointing in (False, True):
                layout = Layout(gpus, ep, fsdp, grad_checkpointing)
                m = estimate(config, layout, batch)
                cells = [
                    f"{value / GiB:.1f}" for value in (m.params, m.grads, m.optimizer, m.ema, m.activations, m.total)
                ]
                rows.append((m.total, (layout.describe(), *cells, "yes" if m.total <= budget_gib * GiB else "no")))
    return _format(header, [row for _, row in sorted(rows, key=lambda r: r[0])])


def _format(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return " ".join(f"{v:<{w}s}" if i == 0 else f"{v:>{w}s}" for i, (v, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join(line(row) for row in [header, *rows])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dit.memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--image-size", type=positive_int, default=256, help="image side in pixels (latents are 8x smaller)"
    )
    parser.add_argument("--gpus", type=positive_int, default=8, help="number of GPUs (default 8)")
    parser.add_argument("--ep", type=positive_int, default=1, help="expert-parallel degree, as dit.train --ep")
    parser.add_argument("--fsdp", action="store_true", help="as dit.train --fsdp")
    parser.add_argument("--grad-checkpointing", action="store_true", help="as dit.train --grad-checkpointing")
    parser.add_argument("--batch", type=positive_int, default=32, help="images per GPU (default 32)")
    parser.add_argument("--budget", type=positive_float, default=80, help="GiB per GPU (default 80)")
    parser.add_argument(
        "--sampling", action="store_true", help="the weights of a sampling run instead: fp32, bf16, FP8 experts"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        side = latent_side(args.image_size)
    except ValueError as error:
        parser.error(str(error))
    configs = []
    for name in (n for n in PAPER if "MoE" in n):
        config = parse_model_name(name)
        config.input_size = side
        configs.append(config)
    if args.sampling:
        print("GiB of weights for sampling (dit.sample --precision fp32 | bf16 | fp8), activations not included")
        print(sampling_table(configs))
        return
    layout = Layout(args.gpus, args.ep, args.fsdp, args.grad_checkpointing)
    if args.gpus % args.ep:
        parser.error(f"--ep {args.ep} must divide --gpus {args.gpus}, as dit.train's does the processes")
    if all(config.num_experts % args.ep for config in configs):
        parser.error(f"--ep {args.ep} divides the experts of no model ({sorted({c.num_experts for c in configs})})")
    print(
        f"GiB per GPU, training with AdamW and an EMA, {args.batch} images of {args.image_size}x{args.image_size} "
        f"per GPU, bf16 activations; {layout.describe()}"
    )
    print(table(configs, layout, args.batch, args.budget))
    flagship = configs[-1]
    print(f"\n{flagship.name} on {args.gpus} GPUs, every layout, smallest first")
    print(layouts_table(flagship, args.gpus, args.batch, args.budget))


if __name__ == "__main__":
    main()
