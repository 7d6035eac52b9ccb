"""What a user would pick instead of moe_kernels, behind one interface: ``layer(x) -> y``.

* ``LoopMoE``: the dispatch of the official DiT-MoE code (a Python loop over experts with
  boolean masks over the token copies), written here from its description.
* ``dense_swiglu``: a dense SwiGLU MLP, for same-activated-FLOPs and same-total-parameters
  comparisons.
* MegaBlocks ``dMoE`` and ScatterMoE, when they can be imported (they need CUDA builds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_kernels import MoE


class LoopMoE(nn.Module):
    """Python-loop MoE with the weights of ``moe`` (a ``moe_kernels.MoE``)."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moe = self.moe
        tokens = x.reshape(-1, moe.dim)
        probs = torch.softmax(moe.router(tokens).float(), dim=-1)
        weights, experts = probs.topk(moe.top_k, dim=-1)
        copies = tokens.repeat_interleave(moe.top_k, dim=0)
        flat = experts.reshape(-1)
        out = torch.empty_like(copies)
        H = moe.hidden_dim
        for e in range(moe.num_experts):
            mask = flat == e
            a = copies[mask] @ moe.w_in[e]
            out[mask] = (F.silu(a[:, :H]) * a[:, H:]) @ moe.w_out[e]
        y = (out.view(-1, moe.top_k, moe.dim) * weights.unsqueeze(-1).to(out.dtype)).sum(dim=1)
        return (y + moe.shared(tokens)).reshape(x.shape)


class DenseSwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.proj_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(F.silu(gate) * up)


def megablocks_dmoe(dim: int, hidden: int, num_experts: int, top_k: int, dtype: torch.dtype) -> nn.Module:
    """MegaBlocks dMoE (GLU experts, grouped GEMM) or ImportError."""
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import dMoE

    args = Arguments(
        hidden_size=dim,
        ffn_hidden_size=hidden,
        moe_num_experts=num_experts,
        moe_top_k=top_k,
        mlp_type="glu",
        mlp_impl="grouped",
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
    )
    layer = dMoE(args)
    return lambda x: layer(x)[0]


def scattermoe_glu(dim: int, hidden: int, num_experts: int, top_k: int, dtype: torch.dtype) -> nn.Module:
    """ScatterMoE GLU MLP behind a softmax top-k router, or ImportError."""
    from scattermoe.mlp import GLUMLP

    router = nn.Linear(dim, num_experts, bias=False).cuda().to(dtype)
    mlp = (
        GLUMLP(input_size=dim, hidden_size=hidden, num_experts=num_experts, top_k=top_k, activation=nn.SiLU())
        .cuda()
        .to(dtype)
    )

    def forward(x):
        probs = torch.softmax(router(x).float(), dim=-1)
        weights, experts = probs.topk(top_k, dim=-1)
        return mlp(x, weights.to(x.dtype), experts)

    return forward
