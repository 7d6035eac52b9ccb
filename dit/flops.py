"""Analytic parameter and FLOP counts of DiT / DiT-MoE, per image, forward.

    python -m dit.flops [--image-size 256]

Two FLOP columns. ``GFLOPs`` counts every matrix product, a multiply-add as 2 FLOPs: patch and
timestep embeddings, adaLN, attention (projections and the two N x N products), the router, the
k routed SwiGLU experts each token visits, the shared expert, the final layer. ``thop GMACs``
counts what ``thop.profile`` reports for the official DiT-MoE code: multiply-accumulates of the
``nn.Linear`` / ``nn.Conv2d`` modules that are *called*. Its experts (and shared experts) run
``F.linear`` on slices of their weights (``pretraining_tp = 2``) and its router is a custom
module calling ``F.linear``, so none of the MoE compute is seen; neither is attention's N x N
part. Hence thop's figure barely moves with the number or size of experts.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .models import DiTConfig, parse_model_name

# Table 1 of the paper (256x256 images, 32x32x4 latents): total and activated parameters.
PAPER_PARAMS = {
    "DiT-MoE-S/2-8E2A": (199e6, 71e6),
    "DiT-MoE-S/2-16E2A": (369e6, 71e6),
    "DiT-MoE-B/2-8E2A": (795e6, 286e6),
    "DiT-MoE-L/2-8E2A": (2.8e9, 1.0e9),
    "DiT-MoE-XL/2-8E2A": (4.1e9, 1.5e9),
    "DiT-MoE-G/2-16E2A": (16.5e9, 3.1e9),
}
FREQUENCY_SIZE = 256


@dataclass
class Counts:
    params: int
    active_params: int
    flops: int
    thop_macs: int


def count(config: DiTConfig) -> Counts:
    """Parameters (total and activated per token) and forward FLOPs for one image."""
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
        ffn_params = E * D + E * 3 * D * H + (3 * D * shared if shared else 0)
        ffn_active = E * D + k * 3 * D * H + (3 * D * shared if shared else 0)
    else:
        ffn_params = ffn_active = 2 * D * H + H + D
    final_params = 2 * D * D + 2 * D + D * p * p * out_channels + p * p * out_channels
    common = embed_params + L * (attn_params + adaln_params) + final_params

    embed_flops = 2 * N * D * C * p * p + 2 * (FREQUENCY_SIZE * D + D * D)
    attn_flops = 2 * N * D * 4 * D + 2 * 2 * N * N * D
    ffn_flops = (2 * N * D * E + 2 * N * k * 3 * D * H + 2 * N * 3 * D * shared) if E else 2 * N * 2 * D * H
    final_flops = 2 * D * 2 * D + 2 * N * D * p * p * out_channels
    flops = embed_flops + L * (attn_flops + 2 * D * 6 * D + ffn_flops) + final_flops

    thop_ffn = 0 if E else N * 2 * D * H
    thop = N * D * C * p * p + FREQUENCY_SIZE * D + D * D + L * (N * 4 * D * D + 6 * D * D + thop_ffn) + 2 * D * D + N * D * p * p * out_channels
    return Counts(common + L * ffn_params, common + L * ffn_active, flops, thop)


def table(image_size: int = 256) -> str:
    latent = image_size // 8
    names = [*PAPER_PARAMS, "DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2", "DiT-G/2"]
    lines = [
        f"{'model':20s} {'params':>9s} {'paper':>7s} {'active':>9s} {'paper':>7s} {'GFLOPs':>9s} {'thop GMACs':>11s}",
    ]
    for name in names:
        config = parse_model_name(name)
        config.input_size = latent
        c = count(config)
        paper_total, paper_active = PAPER_PARAMS.get(name, (None, None))
        fmt = lambda v: f"{v / 1e6:8.0f}M" if v < 1e9 else f"{v / 1e9:8.2f}B"  # noqa: E731
        paper = lambda v: "" if v is None else (f"{v / 1e6:.0f}M" if v < 1e9 else f"{v / 1e9:.1f}B")  # noqa: E731
        lines.append(
            f"{name:20s} {fmt(c.params)} {paper(paper_total):>7s} {fmt(c.active_params)} {paper(paper_active):>7s} "
            f"{c.flops / 1e9:9.1f} {c.thop_macs / 1e9:11.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dit.flops", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=256, help="image side in pixels (latents are 8x smaller)")
    args = p.parse_args(argv)
    print(f"per image, forward, {args.image_size}x{args.image_size} ({args.image_size // 8}x{args.image_size // 8}x4 latents)")
    print(table(args.image_size))


if __name__ == "__main__":
    main()
