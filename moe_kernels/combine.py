"""The combine: ``y[t] = sum over token t's slots s of weights[s] * src[s]``, and its weight gradient.

A token's slots are consecutive. Under token choice every token owns ``k`` of them (slot ``t * k
+ j``); under expert choice a token owns as many as the experts that chose it, 0 to ``E``, and
``starts [T + 1]`` says where each token's slots begin. ``slots`` is ``k`` or ``starts``. The rows
of ``src [S, D]`` are in slot order, or in any order with ``rows [S]`` saying where each slot's row
is: then the GEMM before the combine stores its expert-major rows contiguously and each token
gathers its own (no scattered store). Each token's sum is read by one program in a fixed order, so
the reduce is deterministic: no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_T = 16
_BLOCK_D = 128

Slots = int | torch.Tensor


@triton.jit
def _token_slots(starts_ptr, rows, row_ok, K: tl.constexpr, VARLEN: tl.constexpr):
    """The first slot of each token of ``rows``, their slot counts, and the block's largest count."""
    if VARLEN:
        first = tl.load(starts_ptr + rows, mask=row_ok, other=0)
        count = tl.load(starts_ptr + rows + 1, mask=row_ok, other=0) - first
        most = tl.max(count, axis=0)
    else:
        first = rows * K
        count = tl.zeros_like(rows) + K  # a tensor, so that `j < count` is one too
        most = K
    return first.to(tl.int64), count, most


@triton.jit
def _combine_kernel(
    src_ptr,
    weights_ptr,
    starts_ptr,
    src_rows_ptr,
    out_ptr,
    T,
    D,
    K: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    GATHER: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < T
    first, count, most = _token_slots(starts_ptr, rows, row_ok, K, VARLEN)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in range(most):
        slot_ok = row_ok & (j < count)
        mask = slot_ok[:, None] & (cols < D)[None, :]
        if GATHER:
            src_row = tl.load(src_rows_ptr + first + j, mask=slot_ok, other=0).to(tl.int64)
        else:
            src_row = first + j
        src = tl.load(src_ptr + src_row[:, None] * D + cols[None, :], mask=mask, other=0.0)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + first + j, mask=slot_ok, other=0.0).to(tl.float32)
            acc += w[:, None] * src.to(tl.float32)
        else:
            acc += src.to(tl.float32)
    mask = row_ok[:, None] & (cols < D)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_weight_grad_kernel(
    grad_ptr,
    src_ptr,
    starts_ptr,
    out_ptr,
    T,
    D,
    stride_gt,
    stride_gd,
    K: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    first, count, most = _token_slots(starts_ptr, rows, row_ok, K, VARLEN)
    for j in range(most):
        slot_ok = row_ok & (j < count)
        dot = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = (cols < D)[None, :]
            grad = tl.load(
                grad_ptr + rows.to(tl.int64)[:, None] * stride_gt + cols[None, :] * stride_gd,
                mask=slot_ok[:, None] & col_ok,
                other=0.0,
            )
            src = tl.load(src_ptr + (first + j)[:, None] * D + cols[None, :], mask=slot_ok[:, None] & col_ok, other=0.0)
            dot += tl.sum(grad.to(tl.float32) * src.to(tl.float32), axis=1)
        tl.store(out_ptr + first + j, dot, mask=slot_ok)


@triton.jit
def _weighted_rows_kernel(
    x_ptr,
    rows_ptr,
    weights_ptr,
    weight_rows_ptr,
    out_ptr,
    R,
    D,
    stride_xt,
    stride_xd,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = r < R
    tokens = tl.load(rows_ptr + r, mask=r_ok, other=0).to(tl.int64)
    w = tl.load(weights_ptr + tl.load(weight_rows_ptr + r, mask=r_ok, other=0), mask=r_ok, other=0.0)
    mask = r_ok[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + tokens[:, None] * stride_xt + cols[None, :] * stride_xd, mask=mask, other=0.0)
    out = (x.to(tl.float32) * w.to(tl.float32)[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + r.to(tl.int64)[:, None] * D + cols[None, :], out, mask=mask)


def _layout(slots: Slots, src: torch.Tensor) -> tuple[int, torch.Tensor, bool]:
    """``K`` (0 for per-token counts), the ``starts`` pointer (any tensor where unused), ``VARLEN``."""
    if isinstance(slots, int):
        return slots, src, False
    return 0, slots, True


def combine(
    src: torch.Tensor,
    weights: torch.Tensor | None,
    slots: Slots,
    num_tokens: int,
    out_dtype: torch.dtype,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``src [S, D]`` (contiguous), ``weights [S]`` (contiguous) or ``None`` (plain sum),
    ``slots`` (``k`` or ``starts [T + 1]`` int32), ``rows [S]`` int32 (the row of ``src`` holding
    each slot, as ``dispatch.row_of_slot`` gives it; ``None``: ``src`` is in slot order) ->
    ``[T, D]``, fp32 accumulation."""
    D = src.shape[1]
    out = src.new_empty((num_tokens, D), dtype=out_dtype)
    if num_tokens == 0 or D == 0:
        return out
    K, starts, varlen = _layout(slots, src)
    _combine_kernel[(triton.cdiv(num_tokens, _BLOCK_T), triton.cdiv(D, _BLOCK_D))](
        src,
        src if weights is None else weights,
        starts,
        src if rows is None else rows,
        out,
        num_tokens,
        D,
        K=K,
        VARLEN=varlen,
        HAS_WEIGHTS=weights is not None,
        GATHER=rows is not None,
        BLOCK_T=_BLOCK_T,
        BLOCK_D=_BLOCK_D,
    )
    return out


def combine_weight_grad(grad: torch.Tensor, src: torch.Tensor, slots: Slots) -> torch.Tensor:
    """``d weights[s] = <grad[token of s], src[s]>``: ``grad [T, D]``, ``src [S, D]`` -> fp32 ``[S]``."""
    (T, D), S = grad.shape, src.shape[0]
    out = src.new_empty((S,), dtype=torch.float32)
    if T == 0 or S == 0:
        return out
    K, starts, varlen = _layout(slots, src)
    _combine_weight_grad_kernel[(triton.cdiv(T, _BLOCK_T),)](
        grad, src, starts, out, T, D, *grad.stride(), K=K, VARLEN=varlen, BLOCK_T=_BLOCK_T, BLOCK_D=_BLOCK_D
    )
    return out


def weighted_rows(
    x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, weight_rows: torch.Tensor
) -> torch.Tensor:
    """``out[r] = weights[weight_rows[r]] * x[rows[r]]`` (the product in fp32, stored in x's
    dtype): ``x [T, D]``, ``rows``/``weight_rows [R]`` int32, ``weights [S]`` -> ``[R, D]``.
    With ``rows`` the token and ``weight_rows`` the slot of each expert-major row, it is the
    combine's gradient of ``src``, laid out as the expert GEMMs read it."""
    R, D = rows.shape[0], x.shape[1]
    out = x.new_empty((R, D))
    if R == 0 or D == 0:
        return out
    _weighted_rows_kernel[(triton.cdiv(R, _BLOCK_T), triton.cdiv(D, _BLOCK_D))](
        x, rows, weights, weight_rows, out, R, D, *x.stride(), BLOCK_T=_BLOCK_T, BLOCK_D=_BLOCK_D
    )
    return out


def weighted_rows_torch(
    x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, weight_rows: torch.Tensor
) -> torch.Tensor:
    """``weighted_rows`` in PyTorch."""
    return (x.index_select(0, rows).float() * weights.float().index_select(0, weight_rows)[:, None]).to(x.dtype)


def _token_of_slot(starts: torch.Tensor, num_slots: int) -> torch.Tensor:
    """``[S]`` int64: the token that owns each slot (no host sync: the output size is known)."""
    tokens = torch.arange(starts.shape[0] - 1, device=starts.device)
    return torch.repeat_interleave(tokens, torch.diff(starts), output_size=num_slots)


def combine_torch(
    src: torch.Tensor,
    weights: torch.Tensor | None,
    slots: Slots,
    num_tokens: int,
    out_dtype: torch.dtype,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``combine`` in PyTorch (differentiable); per-token counts reduce with ``segment_reduce``,
    which sums each segment in order (deterministic, unlike ``index_add``)."""
    src = src if rows is None else src.index_select(0, rows)
    terms = src.float() if weights is None else src.float() * weights.float()[:, None]
    if isinstance(slots, int):
        return terms.view(num_tokens, slots, src.shape[1]).sum(1).to(out_dtype)
    return torch.segment_reduce(terms, "sum", offsets=slots.long(), axis=0, unsafe=True).to(out_dtype)


def combine_weight_grad_torch(grad: torch.Tensor, src: torch.Tensor, slots: Slots) -> torch.Tensor:
    """``combine_weight_grad`` in PyTorch."""
    if isinstance(slots, int):
        rows = grad.float().repeat_interleave(slots, dim=0)
    else:
        rows = grad.float().index_select(0, _token_of_slot(slots, src.shape[0]))
    return (rows * src.float()).sum(1)
