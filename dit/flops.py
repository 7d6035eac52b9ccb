"""Analytic parameter and compute counts of DiT / DiT-MoE, per image, forward.

    python -m dit.flops [--image-size 256]

Per-GPU training memory is ``python -m dit.memory``'s.

Compute is counted three ways, because the two papers count it differently:

- ``GMACs``: multiply-accumulates of every linear map on a token's activated path: patch and
  timestep embeddings, adaLN, the attention projections, the router, the k routed SwiGLU experts
  each token visits, the shared expert, the final layer. Attention's two N x N products are
  left out. This is how DiT-MoE's Table 1 "Gflops" were counted (the paper names calflops and
  torchprofile); it reproduces all six of them to the printed 0.01.
- ``+attn``: the same plus attention's N x N products. This is how DiT's own Gflops were
  counted; it reproduces DiT-S/B/L/XL/2 to within 0.02%.
- ``GFLOPs``: ``+attn`` at 2 FLOPs per multiply-accumulate, the unit of the benchmarks.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from moe_kernels import ROUTERS, projection_width

from .cli import positive_int
from .models import DiTConfig, parse_model_name, router_options

FREQUENCY_SIZE = 256


@dataclass(frozen=True)
class Published:
    """A model's figures as its paper prints them (256x256 images, 32x32x4 latents)."""

    params: float
    active_params: float
    gmacs: float
    source: str


_MOE, _DIT = "DiT-MoE Table 1", "DiT Table 4"
PAPER = {
    "DiT-MoE-S/2-8E2A": Published(199e6, 71e6, 15.43, _MOE),
    "DiT-MoE-S/2-16E2A": Published(369e6, 71e6, 15.44, _MOE),
    "DiT-MoE-B/2-8E2A": Published(795e6, 286e6, 61.68, _MOE),
    "DiT-MoE-L/2-8E2A": Published(2.8e9, 1.0e9, 219.26, _MOE),
    "DiT-MoE-XL/2-8E2A": Published(4.1e9, 1.5e9, 323.74, _MOE),
    "DiT-MoE-G/2-16E2A": Published(16.5e9, 3.1e9, 690.94, _MOE),
    "DiT-S/2": Published(33e6, 33e6, 6.06, _DIT),
    "DiT-B/2": Published(130e6, 130e6, 23.01, _DIT),
    "DiT-L/2": Published(458e6, 458e6, 80.71, _DIT),
    "DiT-XL/2": Published(675e6, 675e6, 118.64, _DIT),
}


@dataclass(frozen=True)
class Counts:
    params: int
    active_params: int
    linear_macs: int
    attention_macs: int
    expert_params: int = 0  # the routed experts' weights, all layers
    block_params: int = 0  # one transformer block's, its experts included

    @property
    def macs(self) -> int:
        return self.linear_macs + self.attention_macs

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def published_convention(self, source: str) -> int:
        """The multiply-accumulates counted the way ``source`` counted them."""
        return self.linear_macs if source == _MOE else self.macs


def _router_extras(config: DiTConfig) -> tuple[int, int]:
    """The parameters a router holds beyond its ``Linear(D, E)`` (DiffMoE's capacity predictor:
    ``Linear(D, D)``, SiLU, ``Linear(D, E)``), all applied to every token, and their
    multiply-accumulates per token (one per element of a weight matrix), from the router built
    on the meta device."""
    with torch.device("meta"):
        router = ROUTERS[config.router](config.hidden_size, config.num_experts, config.top_k, **router_options(config))
    extra = [p for name, p in router.named_parameters() if name not in ("weight", "bias")]
    return sum(p.numel() for p in extra), sum(p.numel() for p in extra if p.dim() >= 2)


def count(config: DiTConfig) -> Counts:
    """Parameters (total, and activated per token) and forward multiply-accumulates for one image."""
    D, p, C, L = config.hidden_size, config.patch_size, config.in_channels, config.depth
    N = (config.input_size // p) ** 2
    out_channels = 2 * C if config.learn_sigma else C
    E, k = config.num_experts, config.top_k
    H = int(D * config.mlp_ratio)
    shared = config.num_shared_experts * D

    embed_params = D * C * p * p + D + FREQUENCY_SIZE * D + D + D * D + D + (config.num_classes + 1) * D
    attn_params = 4 * D * D + 4 * D + (4 * (D // config.num_heads) if config.qk_norm else 0)
    adaln_params = 6 * D * D + 6 * D
    if E:
        matrices = projection_width(config.expert_activation, 1) + 1  # gate, up, down or in, out
        expert_macs = matrices * D * H
        expert = expert_macs + ((matrices - 1) * H + D if config.expert_biases else 0)
        router_params, router_macs = _router_extras(config)
        ffn_params = E * D + E * expert + matrices * D * shared + router_params
        ffn_active = E * D + k * expert + matrices * D * shared + router_params
        ffn_macs = N * (E * D + k * expert_macs + matrices * D * shared + router_macs)
    else:
        ffn_params = ffn_active = 2 * D * H + H + D
        ffn_macs = N * 2 * D * H
    final_params = 2 * D * D + 2 * D + D * p * p * out_channels + p * p * out_channels
    common = embed_params + L * (attn_params + adaln_params) + final_params

    embed_macs = N * D * C * p * p + FREQUENCY_SIZE * D + D * D
    block_macs = N * 4 * D * D + 6 * D * D + ffn_macs
    final_macs = 2 * D * D + N * D * p * p * out_channels
    return Counts(
        params=common + L * ffn_params,
        active_params=common + L * ffn_active,
        linear_macs=embed_macs + L * block_macs + final_macs,
        attention_macs=L * 2 * N * N * D,
        expert_params=L * E * expert if E else 0,
        block_params=attn_params + adaln_params + ffn_params,
    )


def _size(value: float) -> str:
    return f"{value / 1e6:.0f}M" if value < 1e9 else f"{value / 1e9:.2f}B"


def table(image_size: int = 256) -> str:
    """Every Table 1 model and its dense DiT counterparts, beside the published figures where the
    resolution is the papers' 256x256."""
    names = [*PAPER, "DiT-G/2"]
    published = image_size == 256
    header = ("model", "params", "paper", "active", "paper", "GMACs", "+attn", "paper", "GFLOPs", "")
    rows = []
    for name in names:
        config = parse_model_name(name)
        config.input_size = image_size // 8
        c = count(config)
        paper = PAPER.get(name) if published else None
        rows.append(
            (
                name,
                _size(c.params),
                _size(paper.params) if paper else "",
                _size(c.active_params),
                _size(paper.active_params) if paper else "",
                f"{c.linear_macs / 1e9:.2f}",
                f"{c.macs / 1e9:.2f}",
                f"{paper.gmacs:.2f}" if paper else "",
                f"{c.flops / 1e9:.1f}",
                f"({paper.source})" if paper else "",
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    text_columns = (0, len(header) - 1)

    def line(row: tuple[str, ...]) -> str:
        cells = (f"{v:<{w}s}" if i in text_columns else f"{v:>{w}s}" for i, (v, w) in enumerate(zip(row, widths)))
        return " ".join(cells).rstrip()

    return "\n".join(line(row) for row in [header, *rows])


def latent_side(image_size: int) -> int:
    """The latent side of ``image_size`` pixels (the VAE is 8x smaller), which the patch of 2
    must divide; ``ValueError`` otherwise."""
    if image_size < 16 or image_size % 16:
        raise ValueError(
            f"--image-size must be a positive multiple of 16 (latent side divisible by the patch), got {image_size}"
        )
    return image_size // 8


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dit.flops", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--image-size", type=positive_int, default=256, help="image side in pixels (latents are 8x smaller)"
    )
    # The memory report moved to its own command; the old flag says where.
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.memory:
        parser.error("the memory report is python -m dit.memory now, with the same flags (--gpus, --ep, ...)")
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        side = latent_side(args.image_size)
    except ValueError as error:
        parser.error(str(error))
    print(
        f"per image, forward, {args.image_size}x{args.image_size} ({side}x{side}x4 latents); "
        "GMACs: linear layers on the activated path; +attn: with attention's N x N products; GFLOPs = 2 x (+attn)"
    )
    print(table(args.image_size))


if __name__ == "__main__":
    main()
