"""Sparse upcycling: a dense DiT checkpoint becomes a DiT-MoE one (Komatsuzaki et al., 2022).

    python -m dit.upcycle --dense CKPT --model DiT-MoE-S/2-8E2A --out upcycled.safetensors
    python -m dit.train --init upcycled.safetensors ...      # then fine-tune it

Everything but the MLPs is copied: patch, timestep and label embedders, attention, adaLN and the
final layer. Every block's MLP ``fc2(gelu_tanh(fc1(x)))`` becomes an MoE layer whose routed
experts are all copies of it, so the experts keep DiT's activation (GELU-tanh) and its biases
(``expert_activation="gelu_tanh"``, ``expert_biases=True``). The router starts at normal(0, 0.02),
as DiT-MoE's own ``upcycle.py`` does, or at zero (``--router-init zero``).

With the routing weights renormalised over the top k (the default, ``--normalize``), every token's
weights sum to 1 and all its experts are the same MLP, so the upcycled model computes exactly what
the dense one did; without (``--no-normalize``, DiT-MoE's routing), each block's MLP output is
scaled by its top-k probability mass, about ``k / E`` at the start.

Shared experts (``--shared-experts``, default 2 as in DiT-MoE) are new: their input projection is
initialised as a fresh model's and their output projection is zero, so they too add nothing until
training moves them (as adaLN-Zero starts its gates). The upcycled model therefore starts as the
dense model, whichever options are chosen but ``--no-normalize``.

``CKPT`` is one of ours (a checkpoint directory, whose ``--which`` weights are read, or a
``.safetensors`` file) or a checkpoint of the original DiT release (``.pt``, e.g.
``DiT-XL-2-256x256.pt``: ``blocks.N.mlp.fc1/fc2``, fused ``attn.qkv``), read as ``dit.convert``
reads it.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from .checkpoint import check_matches, load_weights, save_weights
from .cli import nonnegative_int, positive_int, seed
from .convert import convert_official, infer_config, load_official
from .files import check_writable, replace_atomically
from .models import DiT, DiTConfig, parse_model_name

ROUTER_INITS = ("normal", "zero")
ROUTER_STD = 0.02


def read_dense(path: str | Path, which: str = "ema", num_heads: int | None = None) -> tuple[dict, DiTConfig]:
    """The weights and config of a dense DiT: ours (checkpoint directory or ``.safetensors``) or
    the original release's ``.pt``. Raises ``ValueError`` for a missing file or an MoE model."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--dense {path}: no such file or directory")
    if path.is_file() and path.suffix != ".safetensors":
        official = load_official(path)
        state_dict, config = convert_official(official), infer_config(official, num_heads)
    else:
        state_dict, config = load_weights(path, which)
    if config.num_experts:
        raise ValueError(f"--dense {path} is already an MoE model ({config.name}); upcycling starts from a dense DiT")
    return state_dict, config


def moe_config(dense: DiTConfig, model: str, shared_experts: int, normalize: bool) -> DiTConfig:
    """The DiT-MoE config that ``model`` (e.g. ``DiT-MoE-S/2-8E2A``) names, on the dense model's
    data (input size, channels, classes, objective): its shape must be the dense model's."""
    target = parse_model_name(model)
    if not target.num_experts:
        raise ValueError(f"--model {model} is dense; name an MoE model, e.g. DiT-MoE-S/2-8E2A")
    shape = ("depth", "hidden_size", "num_heads", "patch_size")
    mine, theirs = (tuple(getattr(c, f) for f in shape) for c in (target, dense))
    if mine != theirs:
        describe = "{} blocks of width {}, {} heads, patch {}".format
        raise ValueError(
            f"--model {model} has {describe(*mine)} but the dense checkpoint ({dense.name}) has {describe(*theirs)}"
        )
    return dataclasses.replace(
        dense,
        num_experts=target.num_experts,
        top_k=target.top_k,
        num_shared_experts=shared_experts,
        expert_activation="gelu_tanh",
        expert_biases=True,
        normalize_weights=normalize,
        name=model,
    )


def upcycle(
    dense: dict[str, torch.Tensor],
    config: DiTConfig,
    router_init: str = "normal",
    seed: int = 0,
    source: str | Path = "the dense checkpoint",
) -> DiT:
    """The DiT-MoE ``config``, built from the dense state dict ``dense`` of the same shape.

    Each block's ``ffn.fc1``/``ffn.fc2`` (weights ``[H, D]``, ``[D, H]`` and biases) become every
    routed expert's ``w_in [E, D, H]``, ``b_in [E, H]``, ``w_out [E, H, D]`` and ``b_out [E, D]``.
    The weights are written into the new model in place, the only copy made.
    """
    if router_init not in ROUTER_INITS:
        raise ValueError(f"router_init must be one of {ROUTER_INITS}, got {router_init!r}")
    torch.manual_seed(seed)  # the shared experts' input projections: as a fresh model draws them
    model = DiT(config, moe_backend="torch")
    shapes = {key: value for key, value in model.state_dict().items() if ".ffn." not in key}
    H, D = int(config.hidden_size * config.mlp_ratio), config.hidden_size
    for i in range(config.depth):
        mlp = {f"blocks.{i}.ffn.{name}": torch.empty(shape, device="meta") for name, shape in _mlp_shapes(H, D).items()}
        shapes.update(mlp)  # shapes only: meta tensors hold no memory
    check_matches(shapes, dense, source)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.load_state_dict({key: value for key, value in dense.items() if ".ffn." not in key}, strict=False)
        for i, moe in enumerate(model.moe_layers()):
            mlp = {name: dense[f"blocks.{i}.ffn.{name}"] for name in _mlp_shapes(H, D)}
            moe.w_in.copy_(mlp["fc1.weight"].T.expand_as(moe.w_in))
            moe.b_in.copy_(mlp["fc1.bias"].expand_as(moe.b_in))
            moe.w_out.copy_(mlp["fc2.weight"].T.expand_as(moe.w_out))
            moe.b_out.copy_(mlp["fc2.bias"].expand_as(moe.b_out))
            router = moe.router.weight
            router.copy_(torch.randn(router.shape, generator=generator) * ROUTER_STD if router_init == "normal" else 0)
            if moe.shared is not None:
                moe.shared.proj_out.weight.zero_()
    return model


def _mlp_shapes(H: int, D: int) -> dict[str, tuple[int, ...]]:
    """DiT's MLP, ``fc2(gelu_tanh(fc1(x)))``, as ``nn.Linear`` stores it."""
    return {"fc1.weight": (H, D), "fc1.bias": (H,), "fc2.weight": (D, H), "fc2.bias": (D,)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dit.upcycle", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dense", required=True, help="dense DiT: a checkpoint directory, a .safetensors file, or a .pt")
    p.add_argument("--model", required=True, help="the DiT-MoE to make, e.g. DiT-MoE-S/2-8E2A (same size and patch)")
    p.add_argument("--out", required=True, help="the .safetensors file to write (weights and config)")
    p.add_argument("--router-init", choices=ROUTER_INITS, default="normal", help="normal(0, 0.02), or zero")
    p.add_argument(
        "--shared-experts",
        type=nonnegative_int,
        default=2,
        help="shared experts (one MLP of width N * hidden size), starting with a zero output projection",
    )
    p.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="renormalise the top-k routing weights (on: the upcycled model starts equal to the dense one)",
    )
    p.add_argument(
        "--which", choices=("ema", "model"), default="ema", help="the weights read from a checkpoint directory"
    )
    p.add_argument("--num-heads", type=positive_int, default=None, help="heads of a .pt whose width is not the paper's")
    p.add_argument("--seed", type=seed, default=0, help="seed of the router and shared-expert initialisation")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        out = check_writable(args.out, "--out", {"--dense": args.dense})
        if out.suffix != ".safetensors":
            raise ValueError(f"--out must name a .safetensors file, got {args.out}")
        dense, dense_config = read_dense(args.dense, args.which, args.num_heads)
        config = moe_config(dense_config, args.model, args.shared_experts, args.normalize)
        model = upcycle(dense, config, args.router_init, args.seed, args.dense)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    extra = {"upcycled_from": str(args.dense), "router_init": args.router_init, "seed": str(args.seed)}
    replace_atomically(lambda tmp: save_weights(model.state_dict(), tmp, config, extra), out)
    print(
        f"upcycled {dense_config.name} into {config.name}: {config.depth} blocks, {config.num_experts} experts of "
        f"the dense MLP each, top-{config.top_k}{' renormalised' if config.normalize_weights else ''}, "
        f"{config.num_shared_experts} shared -> {out}\nfine-tune it with: python -m dit.train --init {out} ..."
    )


if __name__ == "__main__":
    main()
