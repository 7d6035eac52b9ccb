"""Top-k gating and the expert-level balance loss.

One Triton kernel does softmax -> top-k -> optional renormalisation and, in the same pass,
gathers what the balance loss needs: per-expert counts of routed slots and per-block column
sums of the probabilities. A second kernel is the whole backward, from the gradients of the
weights, the probabilities and those column sums to the gradient of the logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import resolve_backend
from .library import differentiable
from .validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dim,
    check_expert_ids,
    check_k,
    check_positive_int,
    check_same_device,
    check_tensor,
)

_BLOCK_T = 32


@triton.jit
def _row_block(T, E, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's rows of a ``[T, E]`` table and its masks."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    return rows, cols, row_ok, col_ok, row_ok[:, None] & col_ok[None, :]


@triton.jit
def _topk_gating_kernel(
    logits_ptr, probs_ptr, weights_ptr, experts_ptr, counts_ptr, prob_sums_ptr,
    T, E, stride_lt, stride_le,
    K: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, cols, row_ok, col_ok, mask = _row_block(T, E, BLOCK_T, BLOCK_E)
    logits = tl.load(
        logits_ptr + rows[:, None] * stride_lt + cols[None, :] * stride_le, mask=mask, other=-float("inf")
    ).to(tl.float32)
    # Rows past T are all -inf; shifting them by 0 instead of -inf keeps them NaN-free.
    row_max = tl.where(row_ok, tl.max(logits, axis=1), 0.0)
    num = tl.exp(logits - row_max[:, None])
    probs = num / tl.where(row_ok, tl.sum(num, axis=1), 1.0)[:, None]
    tl.store(probs_ptr + rows[:, None] * E + cols[None, :], probs, mask=mask)
    tl.store(prob_sums_ptr + pid * E + cols, tl.sum(tl.where(mask, probs, 0.0), axis=0), mask=col_ok)

    # Top-k by k rounds of argmax. Chosen and padded entries are set to -1, below any probability,
    # so a round never picks them again while k <= E real entries remain. A NaN (from a NaN or
    # infinite logit) ranks above every probability, as in torch.sort: NaN equals nothing, so
    # left in place it would match no column and yield the id BLOCK_E, outside [0, E).
    remaining = tl.where(mask, tl.where(probs != probs, 2.0, probs), -1.0)
    slots = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    top_e = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for j in range(K):
        best = tl.max(remaining, axis=1)
        idx = tl.min(tl.where(remaining == best[:, None], cols[None, :], BLOCK_E), axis=1)
        chosen = cols[None, :] == idx[:, None]
        remaining = tl.where(chosen, -1.0, remaining)
        counts += tl.sum((chosen & row_ok[:, None]).to(tl.int32), axis=0)
        # The probability itself, NaN included, so a bad row's NaN reaches the layer's output.
        weight = tl.sum(tl.where(chosen, probs, 0.0), axis=1)
        top_w = tl.where(slots[None, :] == j, weight[:, None], top_w)
        top_e = tl.where(slots[None, :] == j, idx[:, None], top_e)
    if NORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]
    out_mask = row_ok[:, None] & (slots[None, :] < K)
    tl.store(weights_ptr + rows[:, None] * K + slots[None, :], top_w, mask=out_mask)
    tl.store(experts_ptr + rows[:, None] * K + slots[None, :], top_e.to(tl.int64), mask=out_mask)
    # Integer atomics commute exactly, so the counts are deterministic.
    tl.atomic_add(counts_ptr + cols, counts, mask=col_ok)


@triton.jit
def _topk_gating_backward_kernel(
    grad_logits_ptr, probs_ptr, weights_ptr, experts_ptr, grad_weights_ptr, grad_probs_ptr, grad_sums_ptr,
    T, E, stride_gt, stride_ge,
    K: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GRAD_WEIGHTS: tl.constexpr, HAS_GRAD_PROBS: tl.constexpr,
    HAS_GRAD_SUMS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows, cols, row_ok, col_ok, mask = _row_block(T, E, BLOCK_T, BLOCK_E)
    probs = tl.load(probs_ptr + rows[:, None] * E + cols[None, :], mask=mask, other=0.0)
    grad = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    if HAS_GRAD_PROBS:
        grad += tl.load(grad_probs_ptr + rows[:, None] * stride_gt + cols[None, :] * stride_ge, mask=mask, other=0.0)
    if HAS_GRAD_SUMS:
        grad += tl.load(grad_sums_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_GRAD_WEIGHTS:
        # weights_j = p[e_j] / S with S = sum_l p[e_l] when normalising, so
        # dp[e_j] = (dw_j - sum_l dw_l * weights_l) / S; without it dp[e_j] = dw_j.
        shift = tl.zeros([BLOCK_T], dtype=tl.float32)
        scale = tl.full([BLOCK_T], 1.0, dtype=tl.float32)
        if NORMALIZE:
            total = tl.zeros([BLOCK_T], dtype=tl.float32)
            for j in range(K):
                w = tl.load(weights_ptr + rows * K + j, mask=row_ok, other=0.0)
                dw = tl.load(grad_weights_ptr + rows * K + j, mask=row_ok, other=0.0).to(tl.float32)
                e = tl.load(experts_ptr + rows * K + j, mask=row_ok, other=0)
                shift += dw * w
                total += tl.sum(tl.where(cols[None, :] == e[:, None], probs, 0.0), axis=1)
            scale = 1.0 / tl.where(row_ok, total, 1.0)
        for j in range(K):
            dw = tl.load(grad_weights_ptr + rows * K + j, mask=row_ok, other=0.0).to(tl.float32)
            e = tl.load(experts_ptr + rows * K + j, mask=row_ok, other=0)
            grad += tl.where(cols[None, :] == e[:, None], ((dw - shift) * scale)[:, None], 0.0)
    # Softmax backward: dlogits = p * (dp - sum(p * dp)).
    grad_logits = probs * (grad - tl.sum(probs * grad, axis=1)[:, None])
    tl.store(
        grad_logits_ptr + rows[:, None] * E + cols[None, :],
        grad_logits.to(grad_logits_ptr.dtype.element_ty),
        mask=mask,
    )


Tensor = torch.Tensor


def _gating_triton(logits: Tensor, k: int, normalize: bool):
    T, E = logits.shape
    num_blocks = triton.cdiv(T, _BLOCK_T)
    probs = logits.new_empty((T, E), dtype=torch.float32)
    weights = logits.new_empty((T, k), dtype=torch.float32)
    experts = logits.new_empty((T, k), dtype=torch.int64)
    counts = logits.new_zeros((E,), dtype=torch.int32)
    block_sums = logits.new_empty((num_blocks, E), dtype=torch.float32)
    if T > 0:
        _topk_gating_kernel[(num_blocks,)](
            logits, probs, weights, experts, counts, block_sums,
            T, E, logits.stride(0), logits.stride(1),
            K=k, NORMALIZE=normalize, BLOCK_T=_BLOCK_T,
            BLOCK_E=triton.next_power_of_2(E), BLOCK_K=triton.next_power_of_2(k),
        )
    return weights, experts, probs, counts, block_sums.sum(dim=0)


def _gating_torch(logits: Tensor, k: int, normalize: bool):
    probs = torch.softmax(logits.float(), dim=-1)
    # A stable descending sort keeps ties in index order and ranks NaN first: the kernel's rule.
    ordered, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights, experts = ordered[:, :k].contiguous(), order[:, :k].contiguous()
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    counts, prob_sums = _expert_stats_torch(probs, experts, logits.shape[1])
    return weights, experts, probs, counts, prob_sums


@torch.library.custom_op("moe_kernels::topk_gating", mutates_args=())
def topk_gating_op(logits: Tensor, k: int, normalize: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``logits [T, E] -> (weights [T, k], experts [T, k], probs [T, E], counts [E], prob_sums [E])``;
    ``counts`` and ``prob_sums`` are the balance loss's statistics."""
    return (_gating_triton if backend == "triton" else _gating_torch)(logits, k, normalize)


@topk_gating_op.register_fake
def _(logits, k, normalize, backend):
    (T, E), f32 = logits.shape, torch.float32
    return (logits.new_empty((T, k), dtype=f32), logits.new_empty((T, k), dtype=torch.int64),
            logits.new_empty((T, E), dtype=f32), logits.new_empty((E,), dtype=torch.int32), logits.new_empty((E,), dtype=f32))


def _gating_backward_triton(probs, weights, experts, grad_weights, grad_probs, grad_sums, normalize, dtype):
    T, E = probs.shape
    grad_logits = probs.new_empty((T, E), dtype=dtype)
    if T > 0:
        dummy = probs
        _topk_gating_backward_kernel[(triton.cdiv(T, _BLOCK_T),)](
            grad_logits, probs, weights, experts,
            dummy if grad_weights is None else grad_weights.contiguous(),
            dummy if grad_probs is None else grad_probs,
            dummy if grad_sums is None else grad_sums.contiguous(),
            T, E,
            *(grad_probs.stride() if grad_probs is not None else (0, 0)),
            K=experts.shape[1], NORMALIZE=normalize,
            HAS_GRAD_WEIGHTS=grad_weights is not None, HAS_GRAD_PROBS=grad_probs is not None,
            HAS_GRAD_SUMS=grad_sums is not None,
            BLOCK_T=_BLOCK_T, BLOCK_E=triton.next_power_of_2(E),
        )
    return grad_logits


def _gating_backward_torch(probs, weights, experts, grad_weights, grad_probs, grad_sums, normalize, dtype):
    grad = torch.zeros_like(probs)
    if grad_probs is not None:
        grad += grad_probs.float()
    if grad_sums is not None:
        grad += grad_sums.float()[None, :]
    if grad_weights is not None:
        # As in the kernel: dp[e_j] = (dw_j - sum_l dw_l * weights_l) / S when normalising.
        grad_chosen = grad_weights.float()
        if normalize:
            total = probs.gather(1, experts).sum(dim=1, keepdim=True)
            grad_chosen = (grad_chosen - (grad_chosen * weights).sum(dim=1, keepdim=True)) / total
        grad = grad.scatter_add(1, experts, grad_chosen)
    return (probs * (grad - (probs * grad).sum(dim=1, keepdim=True))).to(dtype)


@torch.library.custom_op("moe_kernels::topk_gating_backward", mutates_args=())
def topk_gating_backward_op(
    probs: Tensor, weights: Tensor, experts: Tensor, grad_weights: Tensor | None, grad_probs: Tensor | None,
    grad_sums: Tensor | None, normalize: bool, dtype: torch.dtype, backend: str,
) -> Tensor:
    """``d logits [T, E]`` (in ``dtype``) from the gradients of the weights, the probabilities and
    their column sums (any may be ``None``)."""
    backward = _gating_backward_triton if backend == "triton" else _gating_backward_torch
    return backward(probs, weights, experts, grad_weights, grad_probs, grad_sums, normalize, dtype)


@topk_gating_backward_op.register_fake
def _(probs, weights, experts, grad_weights, grad_probs, grad_sums, normalize, dtype, backend):
    return probs.new_empty(probs.shape, dtype=dtype)


def _setup_gating(ctx, inputs, output):
    logits, _, normalize, backend = inputs
    weights, experts, probs, counts, _ = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(experts, counts)
    ctx.save_for_backward(probs, weights, experts)
    ctx.normalize, ctx.dtype, ctx.backend = normalize, logits.dtype, backend


def _backward_gating(ctx, grad_weights, _grad_experts, grad_probs, _grad_counts, grad_sums):
    probs, weights, experts = ctx.saved_tensors
    if grad_weights is None and grad_probs is None and grad_sums is None:
        return None, None, None, None
    with torch.no_grad():  # first-order only; no_grad also keeps torch.func from tracing the op
        grad_logits = topk_gating_backward_op(
            probs, weights, experts, grad_weights, grad_probs, grad_sums, ctx.normalize, ctx.dtype, ctx.backend
        )
    return grad_logits, None, None, None


topk_gating_apply = differentiable(topk_gating_op, _setup_gating, _backward_gating)


@triton.jit
def _expert_stats_kernel(
    experts_ptr, probs_ptr, counts_ptr, prob_sums_ptr,
    T, E, stride_xt, stride_xk, stride_pt, stride_pe,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, cols, row_ok, col_ok, mask = _row_block(T, E, BLOCK_T, BLOCK_E)
    probs = tl.load(probs_ptr + rows[:, None] * stride_pt + cols[None, :] * stride_pe, mask=mask, other=0.0)
    tl.store(prob_sums_ptr + pid * E + cols, tl.sum(probs.to(tl.float32), axis=0), mask=col_ok)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for j in range(K):
        e = tl.load(experts_ptr + rows * stride_xt + j * stride_xk, mask=row_ok, other=-1)
        counts += tl.sum((cols[None, :] == e[:, None]).to(tl.int32), axis=0)
    tl.atomic_add(counts_ptr + cols, counts, mask=col_ok)


def _expert_stats_triton(probs: Tensor, experts: Tensor, num_experts: int):
    T, k = experts.shape
    num_blocks = triton.cdiv(T, _BLOCK_T)
    counts = probs.new_zeros((num_experts,), dtype=torch.int32)
    block_sums = probs.new_zeros((max(num_blocks, 1), num_experts), dtype=torch.float32)
    if T > 0:
        _expert_stats_kernel[(num_blocks,)](
            experts, probs, counts, block_sums,
            T, num_experts, *experts.stride(), *probs.stride(),
            K=k, BLOCK_T=_BLOCK_T, BLOCK_E=triton.next_power_of_2(num_experts),
        )
    return counts, block_sums.sum(dim=0)


def _expert_stats_torch(probs: Tensor, experts: Tensor, num_experts: int):
    flat = experts.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=experts.device)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return counts, probs.float().sum(dim=0)


@torch.library.custom_op("moe_kernels::expert_stats", mutates_args=())
def expert_stats_op(probs: Tensor, experts: Tensor, num_experts: int, backend: str) -> tuple[Tensor, Tensor]:
    """``(probs [T, E], experts [T, k]) -> (prob_sums [E] fp32, counts [E] int32)``."""
    counts, prob_sums = (_expert_stats_triton if backend == "triton" else _expert_stats_torch)(probs, experts, num_experts)
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


def gating_with_stats(logits: Tensor, k: int, normalize: bool, backend: str):
    """``topk_gating`` plus the balance-loss statistics ``counts [E]`` and ``prob_sums [E]``.

    Inputs are assumed valid; ``backend`` is already resolved.
    """
    return topk_gating_apply(logits, k, normalize, backend)


def loss_from_stats(
    counts: torch.Tensor, prob_sums: torch.Tensor, num_tokens: int, k: int, alpha: float
) -> torch.Tensor:
    """``alpha * sum_i (E * count_i / (T * k)) * (prob_sums_i / T)``: the balance loss from its statistics."""
    num_experts = counts.shape[0]
    f = counts.float() * (num_experts / max(num_tokens * k, 1))
    return alpha * (f * prob_sums).sum() / max(num_tokens, 1)


def topk_gating(
    logits: torch.Tensor, k: int, normalize: bool = False, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax router followed by top-k selection.

    Args:
        logits: ``[T, E]`` router logits (fp16, bf16 or fp32, any strides).
        k: experts per token, ``1 <= k <= E``.
        normalize: divide the ``k`` weights by their sum (DiT-MoE does not).
        backend: ``None``/``"auto"``, ``"triton"`` or ``"torch"``.
    Returns:
        ``weights [T, k]`` fp32, ``experts [T, k]`` int64 in descending probability, ``probs
        [T, E]`` fp32 ``softmax(logits)``. Differentiable in ``logits``.

    Ties go to the lower expert index, on both backends (``torch.topk`` does not promise an order
    for ties). Every id lies in ``[0, E)`` whatever the logits: a row with a NaN or infinite logit
    has a NaN softmax, which ranks above every number (as in ``torch.sort``), so it picks experts
    ``0..k-1`` with NaN weights, and the NaN reaches the output and the loss instead of an
    out-of-range index reaching memory.
    """
    check_tensor("logits", logits, 2, FLOAT_DTYPES)
    k = check_k(k, logits.shape[1])
    backend = resolve_backend(backend, logits.device)
    weights, experts, probs, _, _ = gating_with_stats(logits, k, bool(normalize), backend)
    return weights, experts, probs


def balance_loss(
    probs: torch.Tensor,
    experts: torch.Tensor,
    num_experts: int,
    alpha: float = 0.05,
    backend: str | None = None,
) -> torch.Tensor:
    """Expert-level balance loss of DiT-MoE (paper eq. 5, as the reference code computes it).

    ``f_i = E * count_i / (T * k)``, ``P_i = mean_t probs[t, i]``, ``loss = alpha * sum_i f_i * P_i``;
    equals ``alpha`` when perfectly balanced.

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
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float, got {type(alpha).__name__}")
    device = check_same_device(probs=probs, experts=experts)
    check_expert_ids("experts", experts, num_experts)
    prob_sums, counts = expert_stats_apply(probs, experts, num_experts, resolve_backend(backend, device))
    return loss_from_stats(counts, prob_sums, experts.shape[0], experts.shape[1], float(alpha))

