"""A Hugging Face MoE model trained with its experts on moe_kernels: one line switches it.

    python examples/hf_moe_training.py [--steps 30] [--backend auto|triton|torch]

Builds a tiny random Qwen3-MoE (no download), switches its experts to moe_kernels, and trains it
to continue a repeating token pattern with transformers' own loss and router loss. The same
line works for Mixtral, OLMoE, Qwen2-MoE, DeepSeek-V3 and any model whose experts transformers
lets be swapped (``experts_implementation``).
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

import moe_kernels.integrations.huggingface as mk_hf


def build_model() -> torch.nn.Module:
    config = Qwen3MoeConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return AutoModelForCausalLM.from_config(config)


def batches(steps: int, batch: int = 16, length: int = 24, seed: int = 0):
    """Sequences that repeat a random 4-token motif: learnable in a few dozen steps."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        motif = torch.randint(3, 32, (batch, 4), generator=generator)
        yield motif.repeat(1, length // 4)


def train(steps: int = 30, backend: str | None = None, seed: int = 0) -> list[float]:
    """Train for ``steps`` steps; return the loss of each."""
    torch.manual_seed(seed)
    model = build_model().train()
    model.set_experts_implementation(mk_hf.register(backend))  # the one line
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step, ids in enumerate(batches(steps, seed=seed)):
        out = model(ids, labels=ids)  # out.loss includes the router's load-balancing loss
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d} | loss {out.loss.item():.4f} | router loss {out.aux_loss.item():.4f}")
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    args = parser.parse_args()
    train(args.steps, args.backend)


if __name__ == "__main__":
    main()
