"""The k-way combine: ``y[t] = sum_j weights[t, j] * src[t, j]``, and its weight gradient.

The second GEMM writes each slot's output to its own row of ``src [T, k, D]`` (slot order), so
this reduce is deterministic: no atomics, a fixed summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_T = 16
_BLOCK_D = 128


@triton.jit
def _combine_kernel(
    src_ptr,
    weights_ptr,
    out_ptr,
    T,
    D,
    stride_wt,
    stride_wk,
    K: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < T
    mask = row_ok[:, None] & (cols < D)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in range(K):
        src = tl.load(src_ptr + (rows.to(tl.int64) * K + j)[:, None] * D + cols[None, :], mask=mask, other=0.0)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + rows * stride_wt + j * stride_wk, mask=row_ok, other=0.0).to(tl.float32)
            acc += w[:, None] * src.to(tl.float32)
        else:
            acc += src.to(tl.float32)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_weight_grad_kernel(
    grad_ptr,
    src_ptr,
    out_ptr,
    T,
    D,
    stride_gt,
    stride_gd,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slots = tl.arange(0, BLOCK_K)
    row_ok = rows < T
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        grad = tl.load(
            grad_ptr + rows.to(tl.int64)[:, None] * stride_gt + cols[None, :] * stride_gd, mask=mask, other=0.0
        )
        for j in range(K):
            src = tl.load(src_ptr + (rows.to(tl.int64) * K + j)[:, None] * D + cols[None, :], mask=mask, other=0.0)
            dot = tl.sum(grad.to(tl.float32) * src.to(tl.float32), axis=1)
            acc += tl.where(slots[None, :] == j, dot[:, None], 0.0)
    tl.store(out_ptr + rows[:, None] * K + slots[None, :], acc, mask=row_ok[:, None] & (slots < K)[None, :])


def combine(src: torch.Tensor, weights: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``src [T, k, D]`` (contiguous), ``weights [T, k]`` or ``None`` (plain sum) -> ``[T, D]``, fp32 accumulation."""
    T, k, D = src.shape
    out = src.new_empty((T, D), dtype=out_dtype)
    if T == 0 or D == 0:
        return out
    grid = (triton.cdiv(T, _BLOCK_T), triton.cdiv(D, _BLOCK_D))
    _combine_kernel[grid](
        src,
        src if weights is None else weights,
        out,
        T,
        D,
        *(weights.stride() if weights is not None else (0, 0)),
        K=k,
        HAS_WEIGHTS=weights is not None,
        BLOCK_T=_BLOCK_T,
        BLOCK_D=_BLOCK_D,
    )
    return out


def combine_torch(src: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``combine`` in PyTorch (differentiable): ``src [T, k, D]``, ``weights [T, k]`` -> ``[T, D]``."""
    return torch.bmm(weights.float().unsqueeze(1), src.float()).squeeze(1).to(out_dtype)


def combine_weight_grad(grad: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``d weights[t, j] = <grad[t], src[t, j]>``: ``grad [T, D]``, ``src [T, k, D]`` -> fp32 ``[T, k]``."""
    T, k, D = src.shape
    out = src.new_empty((T, k), dtype=torch.float32)
    if T == 0:
        return out
    _combine_weight_grad_kernel[(triton.cdiv(T, _BLOCK_T),)](
        grad,
        src,
        out,
        T,
        D,
        *grad.stride(),
        K=k,
        BLOCK_T=_BLOCK_T,
        BLOCK_D=_BLOCK_D,
        BLOCK_K=triton.next_power_of_2(k),
    )
    return out
