"""Import checkpoints of the official DiT-MoE code (github.com/feizc/DiT-MoE).

``convert_official(ckpt) -> state_dict`` renames and reshapes its weights into this package's
``DiT``; ``python -m dit.convert IN OUT.safetensors`` also infers the config and writes a file
that ``dit.sample --ckpt`` reads. Both attention layouts are accepted: timm's (``attn.qkv``,
``attn.proj``) and the flash-attention one (``attn.Wqkv``, ``attn.out_proj``, with per-head q/k
LayerNorms). The official per-expert ``gate_proj``/``up_proj``/``down_proj`` matrices become the
stacked ``w_in [E, D, 2H]`` (gate columns, then up columns) and ``w_out [E, H, D]``.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

import torch

from .checkpoint import check_matches, save_weights
from .cli import positive_int
from .files import check_writable, replace_atomically
from .models import DiT, DiTConfig, sincos_pos_embed

# Renames that keep the tensor as it is: official key (regex) -> ours.
_RENAMES = [
    (r"(x_embedder\.proj\.(weight|bias))", r"\1"),
    (r"(t_embedder\.mlp\.[02]\.(weight|bias))", r"\1"),
    (r"(y_embedder\.embedding_table\.weight)", r"\1"),
    (r"(final_layer\.(linear|adaLN_modulation\.1)\.(weight|bias))", r"\1"),
    (r"blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)", r"blocks.\1.adaLN_modulation.1.\2"),
    (r"blocks\.(\d+)\.attn\.(?:qkv|Wqkv)\.(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.(?:proj|out_proj)\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"blocks\.(\d+)\.attn\.([qk]_norm)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.ffn.\2.\3"),
    (r"blocks\.(\d+)\.moe\.gate\.weight", r"blocks.\1.ffn.router.weight"),
]
_EXPERT = re.compile(r"blocks\.(\d+)\.moe\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
_SHARED = re.compile(r"blocks\.(\d+)\.moe\.shared_experts\.(gate|up|down)_proj\.weight")
# Head counts of the paper's widths; the timm layout does not record them.
_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16, 1408: 16}


def load_official(ckpt: str | Path | dict) -> dict[str, torch.Tensor]:
    """The raw state dict inside an official checkpoint (a path or a loaded object); accepts
    ``{"ema": ...}`` (preferred) or ``{"model": ...}`` wrappers and DDP's ``module.`` prefix."""
    if not isinstance(ckpt, dict):
        path = Path(ckpt)
        if not path.is_file():
            raise ValueError(f"checkpoint {path} does not exist")
        torch.serialization.add_safe_globals([argparse.Namespace])
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {error}") from error
    expected = "a state dict of tensors, or one wrapped as {'ema': ...} or {'model': ...}"
    if not isinstance(ckpt, dict):
        raise ValueError(f"expected {expected}, got a {type(ckpt).__name__}")
    for wrapper in ("ema", "model"):
        if isinstance(ckpt.get(wrapper), dict):
            ckpt = ckpt[wrapper]
            break
    if not ckpt or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt.items()):
        raise ValueError(f"expected {expected}")
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


def convert_official(ckpt: str | Path | dict) -> dict[str, torch.Tensor]:
    """An official DiT-MoE (or DiT) checkpoint -> a state dict for ``dit.models.DiT``."""
    source = load_official(ckpt)
    out: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[int, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    shared: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    unknown = []
    for key, value in source.items():
        if key == "pos_embed":
            _check_pos_embed(value)
        elif m := _EXPERT.fullmatch(key):
            experts[int(m[1])][int(m[2])][m[3]] = value
        elif m := _SHARED.fullmatch(key):
            shared[int(m[1])][m[2]] = value
        else:
            for pattern, target in _RENAMES:
                if re.fullmatch(pattern, key):
                    out[re.sub(pattern, target, key)] = value
                    break
            else:
                unknown.append(key)
    if unknown:
        raise ValueError(f"unrecognised keys in the official checkpoint: {', '.join(sorted(unknown)[:8])}")
    for block, by_expert in experts.items():
        ids = sorted(by_expert)
        if ids != list(range(len(ids))) or any(set(by_expert[i]) != {"gate", "up", "down"} for i in ids):
            raise ValueError(
                f"block {block}: experts must be numbered 0..E-1, each with gate_proj, up_proj and down_proj"
            )
        # nn.Linear stores [out, in]; our experts store [in, out].
        out[f"blocks.{block}.ffn.w_in"] = torch.stack(
            [torch.cat([by_expert[i]["gate"].T, by_expert[i]["up"].T], dim=1) for i in ids]
        )
        out[f"blocks.{block}.ffn.w_out"] = torch.stack([by_expert[i]["down"].T for i in ids])
    for block, parts in shared.items():
        out[f"blocks.{block}.ffn.shared.proj_in.weight"] = torch.cat([parts["gate"], parts["up"]], dim=0)
        out[f"blocks.{block}.ffn.shared.proj_out.weight"] = parts["down"]
    return {k: v.contiguous() for k, v in out.items()}


def _check_pos_embed(pos_embed: torch.Tensor) -> None:
    # Ours is computed, not stored: make sure the official one is the same fixed sin-cos table.
    num_patches, dim = pos_embed.shape[-2:]
    grid = int(round(num_patches**0.5))
    if grid * grid != num_patches or not torch.allclose(
        pos_embed.reshape(num_patches, dim).float(), sincos_pos_embed(dim, grid), atol=1e-4
    ):
        raise ValueError("the checkpoint's pos_embed is not the fixed 2-D sin-cos embedding DiT uses")


def infer_config(
    official: dict[str, torch.Tensor], num_heads: int | None = None, top_k: int = 2, input_size: int | None = None
) -> DiTConfig:
    """The ``DiTConfig`` an official state dict describes. The head count is read from the
    q/k norms when present, else from the paper's table (or ``num_heads``); ``top_k`` is not
    stored in the weights (every official config uses 2)."""
    required = ("x_embedder.proj.weight", "final_layer.linear.weight", "y_embedder.embedding_table.weight")
    missing = [key for key in required if key not in official]
    if missing or not any(key.startswith("blocks.") for key in official):
        raise ValueError(f"not a DiT or DiT-MoE checkpoint: it lacks {', '.join(missing) or 'blocks.*'}")
    proj = official["x_embedder.proj.weight"]
    hidden, channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = 1 + max(int(k.split(".")[1]) for k in official if k.startswith("blocks."))
    num_experts = len({k.split(".")[4] for k in official if k.startswith("blocks.0.moe.experts.")})
    if "blocks.0.attn.q_norm.weight" in official:
        num_heads = num_heads or hidden // official["blocks.0.attn.q_norm.weight"].shape[0]
    num_heads = num_heads or _HEADS.get(hidden)
    if num_heads is None:
        raise ValueError(f"cannot infer the number of heads of width {hidden}: pass num_heads")
    if input_size is None:
        input_size = int(round(official["pos_embed"].shape[-2] ** 0.5)) * patch if "pos_embed" in official else 32
    out_channels = official["final_layer.linear.weight"].shape[0] // (patch * patch)
    shared = official.get("blocks.0.moe.shared_experts.gate_proj.weight")
    mlp = official.get("blocks.0.moe.experts.0.gate_proj.weight", official.get("blocks.0.mlp.fc1.weight"))
    if mlp is None:
        raise ValueError("not a DiT or DiT-MoE checkpoint: block 0 has neither mlp.fc1 nor moe.experts.0")
    name = f"DiT-MoE-?/{patch}-{num_experts}E{top_k}A" if num_experts else f"DiT-?/{patch}"
    return DiTConfig(
        input_size=input_size,
        patch_size=patch,
        in_channels=channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp.shape[0] / hidden,
        num_classes=official["y_embedder.embedding_table.weight"].shape[0] - 1,
        learn_sigma=out_channels == 2 * channels,
        num_experts=num_experts,
        top_k=top_k,
        num_shared_experts=0 if shared is None else shared.shape[0] // hidden,
        balance_loss_alpha=0.01,
        qk_norm="blocks.0.attn.q_norm.weight" in official,
        name=name,
        latent=channels == 4,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dit.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("input", help="official checkpoint (.pt)")
    p.add_argument("output", help="output .safetensors")
    p.add_argument("--num-heads", type=positive_int, default=None)
    p.add_argument("--top-k", type=positive_int, default=2)
    p.add_argument(
        "--input-size", type=positive_int, default=None, help="latent side (default: from pos_embed, else 32)"
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        output = check_writable(args.output, "output", {"input": args.input})
        official = load_official(args.input)
        config = infer_config(official, args.num_heads, args.top_k, args.input_size)
        state_dict = convert_official(official)
        with torch.device("meta"):  # shapes only: no memory for the weights
            check_matches(DiT(config, moe_backend="torch").state_dict(), state_dict, args.input)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    replace_atomically(lambda tmp: save_weights(state_dict, tmp, config), output)
    print(
        f"converted {len(official)} tensors into {len(state_dict)} ({config.depth} blocks, width {config.hidden_size}, "
        f"{config.num_experts} experts) -> {args.output}"
    )


if __name__ == "__main__":
    main()
