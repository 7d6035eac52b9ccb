"""Top-k gating.

One Triton kernel does scoring (softmax or sigmoid) -> selection -> top-k -> optional
renormalisation and scaling and, in the same pass, gathers what the balance loss needs
(``balance.py``): per-expert counts of routed slots and per-block column sums of the scores.
Selection may add a per-expert bias (DeepSeek-V3's auxiliary-loss-free balancing) and may first
keep the best ``topk_groups`` of ``num_groups`` expert groups (group-limited routing); neither
changes the weights, which are always the chosen experts' unbiased scores. A second kernel is
the whole backward, from the gradients of the weights, the scores and those column sums to the
gradient of the logits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .backend import resolve_backend
from .balance import BLOCK_ROWS, expert_stats_torch, row_block
from .library import custom_op, differentiable, gradients
from .rules import SCALE, check_k, check_positive_int
from .validation import FLOAT_DTYPES, check_dim, check_same_device, check_tensor


@triton.jit
def _argmax(values, ids, free, NONE: tl.constexpr):
    """Per row, the lowest id among the ``free`` entries of greatest value (``NONE`` if no entry is free)."""
    best = tl.max(tl.where(free, values, -float("inf")), axis=1)
    return tl.min(tl.where(free & (values == best[:, None]), ids[None, :], NONE), axis=1)


@triton.jit
def _topk_gating_kernel(
    logits_ptr,
    bias_ptr,
    probs_ptr,
    weights_ptr,
    experts_ptr,
    counts_ptr,
    prob_sums_ptr,
    T,
    E,
    stride_lt,
    stride_le,
    scale,
    K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, cols, row_ok, col_ok, mask = row_block(T, E, BLOCK_T, BLOCK_E)
    logits = tl.load(
        logits_ptr + rows[:, None] * stride_lt + cols[None, :] * stride_le, mask=mask, other=-float("inf")
    ).to(tl.float32)
    if SIGMOID:
        probs = tl.sigmoid(logits)
    else:
        # Rows past T are all -inf; shifting them by 0 instead of -inf keeps them NaN-free.
        row_max = tl.where(row_ok, tl.max(logits, axis=1), 0.0)
        num = tl.exp(logits - row_max[:, None])
        probs = num / tl.where(row_ok, tl.sum(num, axis=1), 1.0)[:, None]
    probs = tl.where(mask, probs, 0.0)
    tl.store(probs_ptr + rows[:, None] * E + cols[None, :], probs, mask=mask)
    tl.store(prob_sums_ptr + pid * E + cols, tl.sum(probs, axis=0), mask=col_ok)

    # What selection ranks: the score, plus the bias if any. A NaN (from a NaN logit, or an
    # infinite one under softmax) ranks above every number, as in torch.sort: NaN equals
    # nothing, so left in place it would match no column.
    rank = probs
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        rank += bias[None, :]
    rank = tl.where(rank != rank, float("inf"), rank)
    free = mask
    if NUM_GROUPS > 1:
        # Group-limited routing: a group's score is the sum of its two best entries (its only
        # one if it has one); only the best TOPK_GROUPS groups stay free.
        group_size = E // NUM_GROUPS
        group_of = cols // group_size
        groups = tl.arange(0, BLOCK_G)
        group_score = tl.full([BLOCK_T, BLOCK_G], -float("inf"), dtype=tl.float32)
        for g in range(NUM_GROUPS):
            members = mask & (group_of == g)[None, :]
            first = _argmax(rank, cols, members, BLOCK_E)
            score = tl.max(tl.where(members, rank, -float("inf")), axis=1)
            second = tl.max(tl.where(members & (cols[None, :] != first[:, None]), rank, -float("inf")), axis=1)
            score += tl.where(group_size > 1, second, 0.0)
            group_score = tl.where(groups[None, :] == g, score[:, None], group_score)
        group_free = row_ok[:, None] & (groups[None, :] < NUM_GROUPS)
        kept = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
        for _ in range(TOPK_GROUPS):
            best_group = _argmax(group_score, groups, group_free, BLOCK_G)
            group_free &= groups[None, :] != best_group[:, None]
            kept |= group_of[None, :] == best_group[:, None]
        free &= kept

    # Top-k by k rounds of argmax over the entries still free; a chosen one is no longer free,
    # so every id lies in [0, E) while k <= the entries free at the start.
    slots = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    top_e = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for j in range(K):
        idx = _argmax(rank, cols, free, BLOCK_E)
        chosen = cols[None, :] == idx[:, None]
        free &= ~chosen
        counts += tl.sum((chosen & row_ok[:, None]).to(tl.int32), axis=0)
        # The score itself, NaN included, so a bad row's NaN reaches the layer's output.
        weight = tl.sum(tl.where(chosen, probs, 0.0), axis=1)
        top_w = tl.where(slots[None, :] == j, weight[:, None], top_w)
        top_e = tl.where(slots[None, :] == j, idx[:, None], top_e)
    if HAS_BIAS:
        # A non-finite bias would win (NaN, +inf) or lose (-inf) every selection silently: it
        # makes every weight NaN instead (bias * 0 is NaN there), so the fault shows.
        top_w += tl.sum(tl.where(col_ok, bias * 0.0, 0.0))
    if NORMALIZE:
        top_w = top_w / tl.where(row_ok, tl.sum(top_w, axis=1), 1.0)[:, None]
    top_w = top_w * scale
    out_mask = row_ok[:, None] & (slots[None, :] < K)
    tl.store(weights_ptr + rows[:, None] * K + slots[None, :], top_w, mask=out_mask)
    tl.store(experts_ptr + rows[:, None] * K + slots[None, :], top_e.to(tl.int64), mask=out_mask)
    # Integer atomics commute exactly, so the counts are deterministic.
    tl.atomic_add(counts_ptr + cols, counts, mask=col_ok)


@triton.jit
def _topk_gating_backward_kernel(
    grad_logits_ptr,
    probs_ptr,
    weights_ptr,
    experts_ptr,
    grad_weights_ptr,
    grad_probs_ptr,
    grad_sums_ptr,
    T,
    E,
    stride_gt,
    stride_ge,
    scale,
    K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    SIGMOID: tl.constexpr,
    HAS_GRAD_WEIGHTS: tl.constexpr,
    HAS_GRAD_PROBS: tl.constexpr,
    HAS_GRAD_SUMS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    rows, cols, row_ok, col_ok, mask = row_block(T, E, BLOCK_T, BLOCK_E)
    probs = tl.load(probs_ptr + rows[:, None] * E + cols[None, :], mask=mask, other=0.0)
    grad = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    if HAS_GRAD_PROBS:
        grad += tl.load(grad_probs_ptr + rows[:, None] * stride_gt + cols[None, :] * stride_ge, mask=mask, other=0.0)
    if HAS_GRAD_SUMS:
        grad += tl.load(grad_sums_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_GRAD_WEIGHTS:
        # weights_j = c * p[e_j] / S with S = sum_l p[e_l] when normalising, so
        # dp[e_j] = (c * dw_j - sum_l dw_l * weights_l) / S; without it dp[e_j] = c * dw_j.
        shift = tl.zeros([BLOCK_T], dtype=tl.float32)
        divisor = tl.full([BLOCK_T], 1.0, dtype=tl.float32)
        if NORMALIZE:
            total = tl.zeros([BLOCK_T], dtype=tl.float32)
            for j in range(K):
                w = tl.load(weights_ptr + rows * K + j, mask=row_ok, other=0.0)
                dw = tl.load(grad_weights_ptr + rows * K + j, mask=row_ok, other=0.0).to(tl.float32)
                e = tl.load(experts_ptr + rows * K + j, mask=row_ok, other=0)
                shift += dw * w
                total += tl.sum(tl.where(cols[None, :] == e[:, None], probs, 0.0), axis=1)
            divisor = tl.where(row_ok, total, 1.0)
        for j in range(K):
            dw = tl.load(grad_weights_ptr + rows * K + j, mask=row_ok, other=0.0).to(tl.float32)
            e = tl.load(experts_ptr + rows * K + j, mask=row_ok, other=0)
            grad += tl.where(cols[None, :] == e[:, None], ((scale * dw - shift) / divisor)[:, None], 0.0)
    if SIGMOID:
        grad_logits = grad * probs * (1.0 - probs)
    else:
        # Softmax backward: dlogits = p * (dp - sum(p * dp)).
        grad_logits = probs * (grad - tl.sum(probs * grad, axis=1)[:, None])
    tl.store(
        grad_logits_ptr + rows[:, None] * E + cols[None, :],
        grad_logits.to(grad_logits_ptr.dtype.element_ty),
        mask=mask,
    )


Tensor = torch.Tensor


def _gating_triton(
    logits: Tensor,
    k: int,
    normalize: bool,
    score: str,
    bias: Tensor | None,
    num_groups: int,
    topk_groups: int,
    scale: float,
):
    T, E = logits.shape
    num_blocks = triton.cdiv(T, BLOCK_ROWS)
    probs = logits.new_empty((T, E), dtype=torch.float32)
    weights = logits.new_empty((T, k), dtype=torch.float32)
    experts = logits.new_empty((T, k), dtype=torch.int64)
    counts = logits.new_zeros((E,), dtype=torch.int32)
    block_sums = logits.new_empty((num_blocks, E), dtype=torch.float32)
    if T > 0:
        _topk_gating_kernel[(num_blocks,)](
            logits,
            probs if bias is None else bias,
            probs,
            weights,
            experts,
            counts,
            block_sums,
            T,
            E,
            logits.stride(0),
            logits.stride(1),
            scale,
            K=k,
            NORMALIZE=normalize,
            SIGMOID=score == "sigmoid",
            HAS_BIAS=bias is not None,
            NUM_GROUPS=num_groups,
            TOPK_GROUPS=topk_groups,
            BLOCK_T=BLOCK_ROWS,
            BLOCK_E=triton.next_power_of_2(E),
            BLOCK_K=triton.next_power_of_2(k),
            BLOCK_G=triton.next_power_of_2(num_groups),
        )
    return weights, experts, probs, counts, block_sums.sum(dim=0)


def _scores_torch(logits: Tensor, score: str) -> Tensor:
    return torch.sigmoid(logits.float()) if score == "sigmoid" else torch.softmax(logits.float(), dim=-1)


def _gating_torch(
    logits: Tensor,
    k: int,
    normalize: bool,
    score: str,
    bias: Tensor | None,
    num_groups: int,
    topk_groups: int,
    scale: float,
):
    probs = _scores_torch(logits, score)
    rank = probs if bias is None else probs + bias.float()
    if num_groups > 1:
        T, E = rank.shape
        # Stable descending sorts rank NaN first and keep ties in index order: the kernel's rules.
        grouped = rank.view(T, num_groups, E // num_groups)
        group_score = torch.sort(grouped, dim=-1, descending=True, stable=True)[0][..., :2].sum(dim=-1)
        best_groups = torch.sort(group_score, dim=-1, descending=True, stable=True)[1][:, :topk_groups]
        kept = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, best_groups, True)
        rank = grouped.masked_fill(~kept[..., None], -torch.inf).view(T, E)
    order = torch.sort(rank, dim=-1, descending=True, stable=True)[1]
    experts = order[:, :k].contiguous()
    weights = probs.gather(1, experts)
    if bias is not None:  # all NaN if any bias is not finite, as in the kernel
        weights = weights + (bias.float() * 0).sum()
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if scale != 1.0:
        weights = weights * scale
    counts, prob_sums = expert_stats_torch(probs, experts, logits.shape[1])
    return weights, experts, probs, counts, prob_sums


@custom_op("moe_kernels::topk_gating")
def topk_gating_op(
    logits: Tensor,
    k: int,
    normalize: bool,
    backend: str,
    score: str,
    bias: Tensor | None,
    num_groups: int,
    topk_groups: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``logits [T, E] -> (weights [T, k], experts [T, k], probs [T, E], counts [E], prob_sums [E])``;
    ``probs`` are the scores, ``counts`` and ``prob_sums`` the balance loss's statistics."""
    gating = _gating_triton if backend == "triton" else _gating_torch
    return gating(logits, k, normalize, score, bias, num_groups, topk_groups, scale)


@topk_gating_op.register_fake
def _(logits, k, normalize, backend, score, bias, num_groups, topk_groups, scale):
    (T, E), f32 = logits.shape, torch.float32
    return (
        logits.new_empty((T, k), dtype=f32),
        logits.new_empty((T, k), dtype=torch.int64),
        logits.new_empty((T, E), dtype=f32),
        logits.new_empty((E,), dtype=torch.int32),
        logits.new_empty((E,), dtype=f32),
    )


def _gating_backward_triton(
    probs, weights, experts, grad_weights, grad_probs, grad_sums, normalize, dtype, score, scale
):
    T, E = probs.shape
    grad_logits = probs.new_empty((T, E), dtype=dtype)
    if T > 0:
        dummy = probs
        _topk_gating_backward_kernel[(triton.cdiv(T, BLOCK_ROWS),)](
            grad_logits,
            probs,
            weights,
            experts,
            dummy if grad_weights is None else grad_weights.contiguous(),
            dummy if grad_probs is None else grad_probs,
            dummy if grad_sums is None else grad_sums.contiguous(),
            T,
            E,
            *(grad_probs.stride() if grad_probs is not None else (0, 0)),
            scale,
            K=experts.shape[1],
            NORMALIZE=normalize,
            SIGMOID=score == "sigmoid",
            HAS_GRAD_WEIGHTS=grad_weights is not None,
            HAS_GRAD_PROBS=grad_probs is not None,
            HAS_GRAD_SUMS=grad_sums is not None,
            BLOCK_T=BLOCK_ROWS,
            BLOCK_E=triton.next_power_of_2(E),
        )
    return grad_logits


def _gating_backward_torch(
    probs, weights, experts, grad_weights, grad_probs, grad_sums, normalize, dtype, score, scale
):
    grad = torch.zeros_like(probs)
    if grad_probs is not None:
        grad += grad_probs.float()
    if grad_sums is not None:
        grad += grad_sums.float()[None, :]
    if grad_weights is not None:
        # As in the kernel: dp[e_j] = (c * dw_j - sum_l dw_l * weights_l) / S when normalising.
        grad_chosen = scale * grad_weights.float()
        if normalize:
            total = probs.gather(1, experts).sum(dim=1, keepdim=True)
            grad_chosen = (grad_chosen - (grad_weights.float() * weights).sum(dim=1, keepdim=True)) / total
        grad = grad.scatter_add(1, experts, grad_chosen)
    if score == "sigmoid":
        return (grad * probs * (1 - probs)).to(dtype)
    return (probs * (grad - (probs * grad).sum(dim=1, keepdim=True))).to(dtype)


@custom_op("moe_kernels::topk_gating_backward")
def topk_gating_backward_op(
    probs: Tensor,
    weights: Tensor,
    experts: Tensor,
    grad_weights: Tensor | None,
    grad_probs: Tensor | None,
    grad_sums: Tensor | None,
    normalize: bool,
    dtype: torch.dtype,
    backend: str,
    score: str,
    scale: float,
) -> Tensor:
    """``d logits [T, E]`` (in ``dtype``) from the gradients of the weights, the scores and
    their column sums (any may be ``None``)."""
    backward = _gating_backward_triton if backend == "triton" else _gating_backward_torch
    return backward(probs, weights, experts, grad_weights, grad_probs, grad_sums, normalize, dtype, score, scale)


@topk_gating_backward_op.register_fake
def _(probs, weights, experts, grad_weights, grad_probs, grad_sums, normalize, dtype, backend, score, scale):
    return probs.new_empty(probs.shape, dtype=dtype)


class GatingInputs(NamedTuple):
    """The arguments of ``moe_kernels::topk_gating``, in its schema's order."""

    logits: Tensor
    k: int
    normalize: bool
    backend: str
    score: str = "softmax"
    bias: Tensor | None = None
    num_groups: int = 1
    topk_groups: int = 1
    scale: float = 1.0


class Gating(NamedTuple):
    """What gating gives: the routing and the balance loss's statistics."""

    weights: Tensor  # [T, k] fp32
    experts: Tensor  # [T, k] int64
    probs: Tensor  # [T, E] fp32, the scores
    counts: Tensor  # [E] int32, routed slots per expert
    prob_sums: Tensor  # [E] fp32, column sums of the scores


def _setup_gating(ctx, inputs, output):
    args, out = GatingInputs(*inputs), Gating(*output)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(out.experts, out.counts)
    ctx.save_for_backward(out.probs, out.weights, out.experts)
    ctx.normalize, ctx.dtype, ctx.backend, ctx.score, ctx.scale = (
        args.normalize,
        args.logits.dtype,
        args.backend,
        args.score,
        args.scale,
    )


def _backward_gating(ctx, grad_weights, _grad_experts, grad_probs, _grad_counts, grad_sums):
    probs, weights, experts = ctx.saved_tensors
    if grad_weights is None and grad_probs is None and grad_sums is None:
        return gradients(GatingInputs)
    with torch.no_grad():  # first-order only; no_grad also keeps torch.func from tracing the op
        grad_logits = topk_gating_backward_op(
            probs, weights, experts, grad_weights, grad_probs, grad_sums,
            ctx.normalize, ctx.dtype, ctx.backend, ctx.score, ctx.scale,
        )  # fmt: skip
    return gradients(GatingInputs, logits=grad_logits)


topk_gating_apply = differentiable(topk_gating_op, _setup_gating, _backward_gating)


SCORES = ("softmax", "sigmoid")


def gating_with_stats(inputs: GatingInputs) -> Gating:
    """``topk_gating`` of ``inputs`` (assumed valid, ``backend`` resolved) plus the balance-loss
    statistics ``counts [E]`` and ``prob_sums [E]``."""
    return Gating(*topk_gating_apply(*inputs))


def check_routing_options(
    num_experts: int,
    k: int,
    score: str,
    num_groups: int,
    topk_groups: int | None,
    scale: float,
    *,
    names: tuple[str, str, str] = ("the number of experts", "k", "scale"),
) -> tuple[int, int, float]:
    """Validate the routing variants of ``topk_gating``; return ``(num_groups, topk_groups, scale)``.
    ``names``: what the caller calls ``num_experts``, ``k`` and ``scale``, for the messages."""
    experts, k_name, scale_name = names
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    num_groups = check_positive_int("num_groups", num_groups)
    if num_experts % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide {experts} ({num_experts})")
    topk_groups = num_groups if topk_groups is None else check_positive_int("topk_groups", topk_groups)
    if topk_groups > num_groups:
        raise ValueError(f"topk_groups ({topk_groups}) must be at most num_groups ({num_groups})")
    if k > topk_groups * (num_experts // num_groups):
        raise ValueError(
            f"{k_name} ({k}) must be at most the experts of the kept groups: topk_groups ({topk_groups}) x "
            f"{num_experts // num_groups} experts per group"
        )
    return num_groups, topk_groups, SCALE.check(scale_name, scale)


def topk_gating(
    logits: torch.Tensor,
    k: int,
    normalize: bool = False,
    backend: str | None = None,
    *,
    score: str = "softmax",
    bias: torch.Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int | None = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router scores followed by top-k selection.

    Args:
        logits: ``[T, E]`` router logits (fp16, bf16 or fp32, any strides).
        k: experts per token, ``1 <= k <= E``.
        normalize: divide the ``k`` weights by their sum (DiT-MoE does not). With softmax scores
            this equals taking the top-k of the logits and a softmax over those ``k`` (GPT-OSS).
        backend: ``None``/``"auto"``, ``"triton"`` or ``"torch"``.
        score: ``"softmax"`` over the experts, or an independent ``"sigmoid"`` per expert
            (DeepSeek-V3).
        bias: ``[E]``, added to the scores for selection only: the weights stay the unbiased
            scores (DeepSeek-V3's auxiliary-loss-free balancing; see ``update_selection_bias``).
            It must be finite; where it is not (a layer's buffer gone bad), every weight is
            NaN, so the fault shows in the output instead of skewing the routing silently.
        num_groups, topk_groups: group-limited routing. The experts form ``num_groups`` equal
            groups; a group's score is the sum of its two best (biased) scores; the ``k`` experts
            are chosen among the best ``topk_groups`` groups only. Default: no limit.
        scale: a factor on the weights, after ``normalize`` (DeepSeek-V3's routed scaling).
    Returns:
        ``weights [T, k]`` fp32, ``experts [T, k]`` int64 in descending (biased) score, ``probs
        [T, E]`` fp32, the scores. Differentiable in ``logits``.

    Ties go to the lower expert (and group) index, on both backends (``torch.topk`` does not
    promise an order for ties). Every id lies in ``[0, E)`` whatever the logits: a NaN score (a
    NaN logit, or an infinite one under softmax, which makes the whole row NaN) ranks above every
    number (as in ``torch.sort``), so such a row still names ``k`` valid experts, with NaN
    weights, and the NaN reaches the output and the loss instead of an out-of-range index
    reaching memory.
    """
    check_tensor("logits", logits, 2, FLOAT_DTYPES)
    E = logits.shape[1]
    k = check_k(k, E)
    num_groups, topk_groups, scale = check_routing_options(E, k, score, num_groups, topk_groups, scale)
    if bias is not None:
        check_tensor("bias", bias, 1, FLOAT_DTYPES)
        check_dim("bias", bias, 0, E, "E, the experts of logits")
        check_same_device(logits=logits, bias=bias)
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(bias).all()):
            raise ValueError("bias must be finite")
    backend = resolve_backend(backend, logits.device)
    gating = gating_with_stats(
        GatingInputs(logits, k, bool(normalize), backend, score, bias, num_groups, topk_groups, scale)
    )
    return gating.weights, gating.experts, gating.probs
