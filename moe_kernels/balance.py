"""The expert-level balance loss and the other balancing tools.

``balance_loss`` is DiT-MoE's loss (and, as an option, the Switch Transformer's) from its two
statistics: per-expert counts of routed slots and per-expert sums of the router scores. The
gating kernel (``topk_gating.py``) gathers both in the same pass as top-k, so the ``MoE`` layer gets
them for free and calls ``loss_from_stats``; for probabilities and experts from elsewhere, one
Triton kernel here computes them. ``router_z_loss`` is ST-MoE's z-loss;
``update_selection_bias`` is DeepSeek-V3's auxiliary-loss-free balancing, which moves the
selection bias that ``topk_gating`` takes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import resolve_backend
from .library import custom_op, differentiable
from .rules import COEFFICIENT, check_k, check_positive_int
from .validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_counts,
    check_dim,
    check_expert_ids,
    check_same_device,
    check_tensor,
)

# Rows of a [T, E] table per program, in the gating and statistics kernels.
BLOCK_ROWS = 32


@triton.jit
def row_block(T, E, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's rows of a ``[T, E]`` table and its masks."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    return rows, cols, row_ok, col_ok, row_ok[:, None] & col_ok[None, :]


Tensor = torch.Tensor


@triton.jit
def _expert_stats_kernel(
    experts_ptr,
    probs_ptr,
    counts_ptr,
    prob_sums_ptr,
    T,
    E,
    stride_xt,
    stride_xk,
    stride_pt,
    stride_pe,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, cols, row_ok, col_ok, mask = row_block(T, E, BLOCK_T, BLOCK_E)
    probs = tl.load(probs_ptr + rows[:, None] * stride_pt + cols[None, :] * stride_pe, mask=mask, other=0.0)
    tl.store(prob_sums_ptr + pid * E + cols, tl.sum(probs.to(tl.float32), axis=0), mask=col_ok)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for j in range(K):
        e = tl.load(experts_ptr + rows * stride_xt + j * stride_xk, mask=row_ok, other=-1)
        counts += tl.sum((cols[None, :] == e[:, None]).to(tl.int32), axis=0)
    tl.atomic_add(counts_ptr + cols, counts, mask=col_ok)


def _expert_stats_triton(probs: Tensor, experts: Tensor, num_experts: int):
    T, k = experts.shape
    num_blocks = triton.cdiv(T, BLOCK_ROWS)
    counts = probs.new_zeros((num_experts,), dtype=torch.int32)
    block_sums = probs.new_zeros((max(num_blocks, 1), num_experts), dtype=torch.float32)
    if T > 0:
        _expert_stats_kernel[(num_blocks,)](
            experts,
            probs,
            counts,
            block_sums,
            T,
            num_experts,
            *experts.stride(),
            *probs.stride(),
            K=k,
            BLOCK_T=BLOCK_ROWS,
            BLOCK_E=triton.next_power_of_2(num_experts),
        )
    return counts, block_sums.sum(dim=0)


def expert_stats_torch(probs: Tensor, experts: Tensor, num_experts: int):
    flat = experts.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=experts.device)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return counts, probs.float().sum(dim=0)


@custom_op("moe_kernels::expert_stats")
def expert_stats_op(probs: Tensor, experts: Tensor, num_experts: int, backend: str) -> tuple[Tensor, Tensor]:
    """``(probs [T, E], experts [T, k]) -> (prob_sums [E] fp32, counts [E] int32)``."""
    counts, prob_sums = (_expert_stats_triton if backend == "triton" else expert_stats_torch)(
        probs, experts, num_experts
    )
    return prob_sums, counts


@expert_stats_op.register_fake
def _(probs, experts, num_experts, backend):
    return probs.new_empty((num_experts,), dtype=torch.float32), probs.new_empty((num_experts,), dtype=torch.int32)


def _setup_stats(ctx, inputs, output):
    probs = inputs[0]
    ctx.mark_non_differentiable(output[1])
    ctx.probs_shape, ctx.probs_dtype = probs.shape, probs.dtype


def _backward_stats(ctx, grad_sums, _grad_counts):
    return grad_sums.to(ctx.probs_dtype)[None, :].expand(ctx.probs_shape), None, None, None


expert_stats_apply = differentiable(expert_stats_op, _setup_stats, _backward_stats)


CONVENTIONS = ("dit-moe", "switch")


def loss_from_stats(
    counts: torch.Tensor, prob_sums: torch.Tensor, num_tokens: int, k: int, alpha: float, convention: str = "dit-moe"
) -> torch.Tensor:
    """The balance loss from its statistics: ``alpha * sum_i f_i * P_i`` with ``P_i =
    prob_sums_i / T`` and ``f_i = E * count_i / (T * k)`` (``"dit-moe"``) or ``E * count_i / T``
    (``"switch"``, Mixtral's and transformers', ``k`` times larger)."""
    num_experts = counts.shape[0]
    slots = num_tokens * (k if convention == "dit-moe" else 1)
    f = counts.float() * (num_experts / max(slots, 1))
    return alpha * (f * prob_sums).sum() / max(num_tokens, 1)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss, ``mean_t logsumexp(logits[t])^2``: keeps router logits small."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def update_selection_bias(bias: torch.Tensor, counts: torch.Tensor, rate: float = 1e-3) -> torch.Tensor:
    """DeepSeek-V3's auxiliary-loss-free balancing, in place: each expert's selection bias rises
    by ``rate`` if it got fewer than the mean number of routed slots, falls by ``rate`` if more.

    Args:
        bias: ``[E]`` fp32, as passed to ``topk_gating(bias=...)``.
        counts: ``[E]`` routed slots per expert (``MoE.expert_counts``, summed over the steps
            and processes of the update).
    Returns:
        ``bias``.
    """
    check_tensor("bias", bias, 1, FLOAT_DTYPES)
    check_tensor("counts", counts, 1, (*INDEX_DTYPES, *FLOAT_DTYPES))
    check_dim("counts", counts, 0, bias.shape[0], "E, the experts of bias")
    check_same_device(bias=bias, counts=counts)
    rate = COEFFICIENT.check("rate", rate)
    check_counts("counts", counts)
    load = counts.float()
    with torch.no_grad():
        return bias.add_(rate * torch.sign(load.mean() - load).to(bias.dtype))


def balance_loss(
    probs: torch.Tensor,
    experts: torch.Tensor,
    num_experts: int,
    alpha: float = 0.05,
    backend: str | None = None,
    convention: str = "dit-moe",
) -> torch.Tensor:
    """Expert-level balance loss of DiT-MoE (paper eq. 5, as the reference code computes it).

    ``f_i = E * count_i / (T * k)``, ``P_i = mean_t probs[t, i]``, ``loss = alpha * sum_i f_i * P_i``;
    equals ``alpha`` when perfectly balanced. ``convention="switch"`` takes ``f_i = E * count_i /
    T`` instead: the Switch Transformer's loss as Mixtral and transformers compute it, ``k`` times
    DiT-MoE's (it equals ``k * alpha`` when balanced).

    Args:
        probs: ``[T, E]`` router probabilities.
        experts: ``[T, k]`` chosen expert ids (int32 or int64).
        num_experts: ``E``.
    Returns:
        a 0-d fp32 tensor, differentiable in ``probs``.
    """
    check_tensor("probs", probs, 2, FLOAT_DTYPES)
    check_tensor("experts", experts, 2, INDEX_DTYPES)
    num_experts = check_positive_int("num_experts", num_experts)
    check_dim("probs", probs, 1, num_experts, "num_experts")
    check_dim("experts", experts, 0, probs.shape[0], "tokens, as in probs")
    check_k(experts.shape[1], num_experts, name="experts.shape[1]")
    alpha = COEFFICIENT.check("alpha", alpha)
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    device = check_same_device(probs=probs, experts=experts)
    check_expert_ids("experts", experts, num_experts)
    prob_sums, counts = expert_stats_apply(probs, experts, num_experts, resolve_backend(backend, device))
    return loss_from_stats(counts, prob_sums, experts.shape[0], experts.shape[1], alpha, convention)
