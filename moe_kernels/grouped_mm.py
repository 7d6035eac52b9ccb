"""Grouped GEMM over variable-size groups of rows: ``y[rows of e] = x[rows of e] @ w[e]``.

Triton kernels serve every matrix product of the MoE layer, forward and backward:

* ``_grouped_mm_kernel`` tiles each group's rows into ``BLOCK_M`` tiles. The tile-to-group map
  is computed inside the kernel from ``offsets``, and the grid is sized from the host-known bound
  ``cdiv(M, BLOCK_M) + E`` tiles, so nothing is read back to the host and an empty group costs
  nothing but idle programs. Options fuse the MoE data movement into the GEMM: a row gather in
  the A load (no permuted copy of the tokens), a per-row scale, the activation (and the store of
  its input for the backward pass) or the activation's gradient in the epilogue, and a row
  scatter in the store. ``_grouped_mm_fp8_kernel`` is its FP8 form (e4m3 weights with block
  scales, the activations quantized per row as they are loaded; see ``fp8.py``): the same tiles
  and options, another K loop, chosen by passing ``b_scale``.
* ``_grouped_wgrad_kernel`` computes ``dw[e] = a[rows of e]^T @ b[rows of e]``: a grouped GEMM
  whose reduction length varies per group, with the same gather and scale options.

Rows are never padded in memory: partial tiles are masked.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .activations import Glu, act, act_grad, glu, glu_grad, split_activation
from .backend import INTERPRET, resolve_backend
from .library import custom_op, differentiable
from .tuning import (
    FP8_CONFIGS,
    FP8_KEYS,
    ROW_CONFIGS,
    ROW_KEYS,
    WGRAD_CONFIGS,
    WGRAD_KEYS,
    fp8_candidates,
    row_candidates,
    tabled,
    wgrad_candidates,
)
from .validation import FLOAT_DTYPES, INDEX_DTYPES, check_dim, check_offsets, check_same_device, check_tensor


@triton.jit
def _group_of_tile(offsets_ptr, tile, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Map a row tile to ``(group, first row, row end)``; ``group >= E`` past the last tile."""
    groups = tl.arange(0, BLOCK_E)
    ends = tl.load(offsets_ptr + groups, mask=groups < E, other=0).to(tl.int32)
    starts = tl.load(offsets_ptr + groups - 1, mask=(groups > 0) & (groups < E), other=0).to(tl.int32)
    tiles = tl.cdiv(ends - starts, BLOCK_M)
    tile_ends = tl.cumsum(tiles, axis=0)
    group = tl.sum((tile_ends <= tile).to(tl.int32), axis=0)
    this = groups == group
    first_tile = tl.sum(tl.where(this, tile_ends - tiles, 0), axis=0)
    row_start = tl.sum(tl.where(this, starts, 0), axis=0) + (tile - first_tile) * BLOCK_M
    return group, row_start, tl.sum(tl.where(this, ends, 0), axis=0)


@triton.jit
def _rows(rows_ptr, rm, row_ok, INDEXED: tl.constexpr):
    """The memory rows of tile rows ``rm``: ``rows[rm]`` (a gather or scatter) or ``rm`` itself."""
    if INDEXED:
        rows = tl.load(rows_ptr + rm, mask=row_ok, other=0).to(tl.int64)
    else:
        rows = rm.to(tl.int64)
    return rows


@triton.jit
def _row_tile(offsets_ptr, a_rows_ptr, N, E, GATHER_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_E: tl.constexpr):  # fmt: skip
    """This program's output tile: its group (``>= E`` past the last tile), rows, columns, their
    masks, and the rows of ``a`` it reads."""
    num_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    group, row_start, row_end = _group_of_tile(offsets_ptr, pid // num_n, E, BLOCK_M, BLOCK_E)
    rm = row_start + tl.arange(0, BLOCK_M)
    rn = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rm < row_end
    return group, rm, rn, row_ok, rn < N, _rows(a_rows_ptr, rm, row_ok, GATHER_A)


@triton.jit
def _epilogue(acc, acc_up, group, rm, rn, row_ok, col_ok, N, c_ptr, c_rows_ptr, stride_cm, stride_cn,
              preact_ptr, stride_pm, stride_pn, scale_ptr, scale_rows_ptr, bias_ptr, stride_bias_e, stride_bias_n,
              EPILOGUE: tl.constexpr, ACTIVATION: tl.constexpr, GLU: tl.constexpr, CLAMP: tl.constexpr,
              LIMIT: tl.constexpr, ALPHA: tl.constexpr, UP_OFFSET: tl.constexpr, GATE_CAP: tl.constexpr,
              UP_CAP: tl.constexpr, STORE_PREACT: tl.constexpr,
              SCATTER_C: tl.constexpr, SCALE: tl.constexpr, BIAS: tl.constexpr):  # fmt: skip
    """A row tile's fp32 product (``acc``, and ``acc_up`` for a GLU's up projection) through the
    bias, the row scale and the epilogue of ``_grouped_mm_kernel``, stored: shared by its bf16 and
    FP8 forms, which differ only in their K loops."""
    if BIAS:
        bias_ptrs = bias_ptr + group.to(tl.int64) * stride_bias_e + rn * stride_bias_n
        acc += tl.load(bias_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GLU and EPILOGUE == "act":
            acc_up += tl.load(bias_ptrs + N * stride_bias_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SCALE:
        slots = tl.load(scale_rows_ptr + rm, mask=row_ok, other=0)
        acc *= tl.load(scale_ptr + slots, mask=row_ok, other=0.0)[:, None]
    c_rows = _rows(c_rows_ptr, rm, row_ok, SCATTER_C)
    mask = row_ok[:, None] & col_ok[None, :]
    c_ptrs = c_ptr + c_rows[:, None] * stride_cm + rn[None, :] * stride_cn
    preact_ptrs = preact_ptr + rm.to(tl.int64)[:, None] * stride_pm + rn[None, :] * stride_pn
    if EPILOGUE == "act":
        if STORE_PREACT:
            tl.store(preact_ptrs, acc.to(preact_ptr.dtype.element_ty), mask=mask)
            if GLU:
                tl.store(preact_ptrs + N * stride_pn, acc_up.to(preact_ptr.dtype.element_ty), mask=mask)
        if GLU:
            out = glu(acc, acc_up, ACTIVATION, CLAMP, LIMIT, ALPHA, UP_OFFSET, GATE_CAP, UP_CAP)
        else:
            out = act(acc, ACTIVATION)
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == "act_grad":
        pre = tl.load(preact_ptrs, mask=mask, other=0.0).to(tl.float32)
        if GLU:
            up = tl.load(preact_ptrs + N * stride_pn, mask=mask, other=0.0).to(tl.float32)
            d_gate, d_up = glu_grad(acc, pre, up, ACTIVATION, CLAMP, LIMIT, ALPHA, UP_OFFSET, GATE_CAP, UP_CAP)
            tl.store(c_ptrs, d_gate.to(c_ptr.dtype.element_ty), mask=mask)
            tl.store(c_ptrs + N * stride_cn, d_up.to(c_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(c_ptrs, (acc * act_grad(pre, ACTIVATION)).to(c_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=ROW_CONFIGS,
    key=ROW_KEYS,
    prune_configs_by={"early_config_prune": tabled("grouped_mm", ROW_KEYS, row_candidates)},
)
@triton.jit
def _grouped_mm_kernel(
    # Pointers: operands, group ends, gather/scatter rows, per-slot scales, the pre-activation
    a_ptr,
    b_ptr,
    c_ptr,
    offsets_ptr,
    a_rows_ptr,
    c_rows_ptr,
    scale_ptr,
    scale_rows_ptr,
    preact_ptr,
    bias_ptr,
    # Sizes (rows come from offsets; M_BUCKET only keys the autotuner)
    M_BUCKET,
    N,
    K,
    E,
    # Strides
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    stride_pm,
    stride_pn,
    stride_bias_e,
    stride_bias_n,
    # Options
    EPILOGUE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GLU: tl.constexpr,
    CLAMP: tl.constexpr,
    LIMIT: tl.constexpr,
    ALPHA: tl.constexpr,
    UP_OFFSET: tl.constexpr,
    GATE_CAP: tl.constexpr,
    UP_CAP: tl.constexpr,
    STORE_PREACT: tl.constexpr,
    GATHER_A: tl.constexpr,
    SCATTER_C: tl.constexpr,
    SCALE: tl.constexpr,
    BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    # Tiles
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """``c[rows] = epilogue(a[rows] @ b[group] + bias[group])`` for one ``BLOCK_M x BLOCK_N`` tile.

    BIAS adds the group's bias row (``2N`` wide with GLU and EPILOGUE "act") to the product.
    EPILOGUE "none": c = acc (times the row scale if SCALE).
    EPILOGUE "act": c = act(acc), or with GLU ``glu(acc, acc_up)`` (SwiGLU's options CLAMP,
    LIMIT, ALPHA, UP_OFFSET, GATE_CAP, UP_CAP; see ``activations``), where acc_up multiplies b's columns N:2N; with
    STORE_PREACT the pre-activation (both halves) is written to preact.
    EPILOGUE "act_grad": acc is dL/d(act output) (times the row scale); preact holds the saved
    pre-activation; c = dL/d(pre-activation), 2N columns wide with GLU.
    """
    group, rm, rn, row_ok, col_ok, a_rows = _row_tile(
        offsets_ptr, a_rows_ptr, N, E, GATHER_A, BLOCK_M, BLOCK_N, BLOCK_E
    )
    if group >= E:
        return
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + group.to(tl.int64) * stride_be + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if GLU and EPILOGUE == "act":
            b_up = tl.load(b_ptrs + N * stride_bn, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    _epilogue(acc, acc_up, group, rm, rn, row_ok, col_ok, N, c_ptr, c_rows_ptr, stride_cm, stride_cn,
              preact_ptr, stride_pm, stride_pn, scale_ptr, scale_rows_ptr, bias_ptr, stride_bias_e, stride_bias_n,
              EPILOGUE, ACTIVATION, GLU, CLAMP, LIMIT, ALPHA, UP_OFFSET, GATE_CAP, UP_CAP, STORE_PREACT,
              SCATTER_C, SCALE, BIAS)  # fmt: skip


@triton.jit
def _round_to_e4m3(v):
    """fp32 ``v`` rounded to the nearest e4m3 value (ties to even), still fp32: dropping 20 of
    fp32's 23 mantissa bits for normal values, steps of 2**-9 below 2**-6 (e4m3's subnormals)."""
    bits = v.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    subnormal = ((v * 512.0 + 12582912.0) - 12582912.0) / 512.0  # 1.5 * 2**23 rounds to an integer
    return tl.where(tl.abs(v) < 0.015625, subnormal, normal)


@triton.jit
def _quantize_rows(a, EXACT_CAST: tl.constexpr):
    """A ``[BLOCK_M, BLOCK_K]`` fp32 tile -> its e4m3 tile and per-row scales ``[BLOCK_M]``."""
    amax = tl.max(tl.abs(a), axis=1)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
    q = tl.clamp(tl.math.div_rn(a, scale[:, None]), -448.0, 448.0)
    if EXACT_CAST:
        q = _round_to_e4m3(q)
    return q.to(tl.float8e4nv), scale


@triton.autotune(
    configs=FP8_CONFIGS,
    key=FP8_KEYS,
    prune_configs_by={"early_config_prune": tabled("grouped_mm_fp8", FP8_KEYS, fp8_candidates)},
)
@triton.jit
def _grouped_mm_fp8_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    offsets_ptr,
    a_rows_ptr,
    c_rows_ptr,
    scale_ptr,
    scale_rows_ptr,
    preact_ptr,
    bias_ptr,
    b_scale_ptr,
    M_BUCKET,
    N,
    K,
    E,
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    stride_pm,
    stride_pn,
    stride_bias_e,
    stride_bias_n,
    stride_se,
    stride_sk,
    stride_sn,
    EPILOGUE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GLU: tl.constexpr,
    CLAMP: tl.constexpr,
    LIMIT: tl.constexpr,
    ALPHA: tl.constexpr,
    UP_OFFSET: tl.constexpr,
    GATE_CAP: tl.constexpr,
    UP_CAP: tl.constexpr,
    STORE_PREACT: tl.constexpr,
    GATHER_A: tl.constexpr,
    SCATTER_C: tl.constexpr,
    SCALE: tl.constexpr,
    BIAS: tl.constexpr,
    EXACT_CAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """``_grouped_mm_kernel`` with b in e4m3 (``float8_e4m3fn``, one fp32 scale per 128x128
    block, ``b_scale [E, K/128, N/128]``, any strides) and a quantized per row as it is loaded,
    in groups of 128 along K (``BLOCK_K`` = 128 in every config): each K step multiplies two e4m3
    tiles on FP8 tensor cores and adds the product times its row and column scales to an fp32
    accumulator. With EXACT_CAST (the interpreter) the e4m3 rounding is done in fp32 first."""
    group, rm, rn, row_ok, col_ok, a_rows = _row_tile(
        offsets_ptr, a_rows_ptr, N, E, GATHER_A, BLOCK_M, BLOCK_N, BLOCK_E
    )
    if group >= E:
        return
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + group.to(tl.int64) * stride_be + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    # Each column's scale block; a tile may straddle two (the up half of a GLU starts mid-block).
    s_ptrs = b_scale_ptr + group.to(tl.int64) * stride_se + (rn // BLOCK_K) * stride_sn
    s_up_ptrs = b_scale_ptr + group.to(tl.int64) * stride_se + ((rn + N) // BLOCK_K) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        a_q, a_scale = _quantize_rows(a, EXACT_CAST)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        b_scale = tl.load(s_ptrs, mask=col_ok, other=0.0)
        acc += tl.dot(a_q, b) * (a_scale[:, None] * b_scale[None, :])
        if GLU and EPILOGUE == "act":
            b_up = tl.load(b_ptrs + N * stride_bn, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            b_up_scale = tl.load(s_up_ptrs, mask=col_ok, other=0.0)
            acc_up += tl.dot(a_q, b_up) * (a_scale[:, None] * b_up_scale[None, :])
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
        s_ptrs += stride_sk
        s_up_ptrs += stride_sk

    _epilogue(acc, acc_up, group, rm, rn, row_ok, col_ok, N, c_ptr, c_rows_ptr, stride_cm, stride_cn,
              preact_ptr, stride_pm, stride_pn, scale_ptr, scale_rows_ptr, bias_ptr, stride_bias_e, stride_bias_n,
              EPILOGUE, ACTIVATION, GLU, CLAMP, LIMIT, ALPHA, UP_OFFSET, GATE_CAP, UP_CAP, STORE_PREACT,
              SCATTER_C, SCALE, BIAS)  # fmt: skip


@triton.jit
def _wgrad_rows(
    rm,
    row_end,
    a_rows_ptr,
    b_rows_ptr,
    scale_ptr,
    scale_rows_ptr,
    GATHER_A: tl.constexpr,
    GATHER_B: tl.constexpr,
    SCALE: tl.constexpr,
):
    """For reduction rows ``rm``: the rows of a and of b to read and the scale of each (1 unless SCALE)."""
    row_ok = rm < row_end
    a_rows = _rows(a_rows_ptr, rm, row_ok, GATHER_A)
    b_rows = _rows(b_rows_ptr, rm, row_ok, GATHER_B)
    scales = tl.full(rm.shape, 1.0, tl.float32)
    if SCALE:
        slots = tl.load(scale_rows_ptr + rm, mask=row_ok, other=0)
        scales = tl.load(scale_ptr + slots, mask=row_ok, other=0.0)
    return a_rows, b_rows, scales


@triton.autotune(
    configs=WGRAD_CONFIGS,
    key=WGRAD_KEYS,
    prune_configs_by={"early_config_prune": tabled("grouped_wgrad", WGRAD_KEYS, wgrad_candidates)},
)
@triton.jit
def _grouped_wgrad_kernel(
    # Pointers: operands, group ends, gather rows, per-slot scales
    a_ptr,
    b_ptr,
    c_ptr,
    offsets_ptr,
    a_rows_ptr,
    b_rows_ptr,
    scale_ptr,
    scale_rows_ptr,
    bias_grad_ptr,
    # Sizes (rows come from offsets; M_BUCKET only keys the autotuner)
    M_BUCKET,
    N,
    K,
    E,
    # Strides
    stride_am,
    stride_ak,
    stride_bm,
    stride_bn,
    stride_ce,
    stride_ck,
    stride_cn,
    stride_db_e,
    # Options
    GATHER_A: tl.constexpr,
    GATHER_B: tl.constexpr,
    SCALE: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    PRECISION: tl.constexpr,
    # Tiles: BLOCK_K x BLOCK_N of the output, BLOCK_M rows of reduction per step
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``c[e] = (scale * a[rows of e])^T @ b[rows of e]`` for one ``BLOCK_K x BLOCK_N`` tile of ``c[e]``.

    With BIAS_GRAD, the programs of the first K tile also write ``bias_grad[e] = sum over the
    rows of e of scale * b`` (fp32), the gradient of a per-group bias: no second pass over b.

    The gather rows and scales of each step are loaded one step ahead. Loaded in the step that
    uses them, they make Triton's software pipeliner give the gathered tiles one buffer fewer
    and wait for every copy at the top of each step, so a step's loads overlap only the previous
    step's MMA (Triton 3.6 and 3.9; ``benchmarks/results/sm_90a_compile/`` shows the buffers).
    The scale multiplies the A tile, which Hopper's MMA reads from registers: scaled there, it
    needs no trip back through shared memory, as a scaled B tile does.
    """
    num_k = tl.cdiv(tl.maximum(K, 1), BLOCK_K)  # one K tile when K == 0, to sum the bias gradient
    num_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    group = pid // (num_k * num_n)
    pid_k = pid // num_n % num_k
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = rk < K
    n_ok = rn < N
    row_end = tl.load(offsets_ptr + group).to(tl.int32)
    row_start = tl.load(offsets_ptr + group - 1, mask=group > 0, other=0).to(tl.int32)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sums_bias = BIAS_GRAD and pid_k == 0  # one K tile's programs sum the bias gradient, once
    rm = row_start + tl.arange(0, BLOCK_M)
    a_rows, b_rows, scales = _wgrad_rows(
        rm, row_end, a_rows_ptr, b_rows_ptr, scale_ptr, scale_rows_ptr, GATHER_A, GATHER_B, SCALE
    )
    for m0 in range(row_start, row_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        row_ok = rm < row_end
        a = tl.load(
            a_ptr + a_rows[None, :] * stride_am + rk[:, None] * stride_ak,
            mask=k_ok[:, None] & row_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + b_rows[:, None] * stride_bm + rn[None, :] * stride_bn,
            mask=row_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        if sums_bias:
            if SCALE:
                bias_acc += tl.sum(b.to(tl.float32) * scales[:, None], axis=0)
            else:
                bias_acc += tl.sum(b.to(tl.float32), axis=0)
        if SCALE:
            a = (a * scales[None, :]).to(b.dtype)
        a_rows, b_rows, scales = _wgrad_rows(
            rm + BLOCK_M, row_end, a_rows_ptr, b_rows_ptr, scale_ptr, scale_rows_ptr, GATHER_A, GATHER_B, SCALE
        )
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    c_ptrs = c_ptr + group.to(tl.int64) * stride_ce + rk[:, None] * stride_ck + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])
    if sums_bias:
        tl.store(bias_grad_ptr + group.to(tl.int64) * stride_db_e + rn, bias_acc, mask=n_ok)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul setting, so both backends round alike.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# The autotuned kernels by the names their tables of tuned configs use (``tuning.tabled``).
TUNED_KERNELS = {
    "grouped_mm": _grouped_mm_kernel,
    "grouped_mm_fp8": _grouped_mm_fp8_kernel,
    "grouped_wgrad": _grouped_wgrad_kernel,
}


def _annotated(kernel: str, flops: int, **sizes: int) -> contextlib.AbstractContextManager:
    """A profiler range around one launch, named with its sizes and FLOPs, so that a trace says
    which GEMM of the layer each kernel time belongs to and at what rate (``benchmarks/gpu_check.py``'s
    ``profile`` part reads them); nothing at all when no profiler is running."""
    if not torch.autograd._profiler_enabled():
        return contextlib.nullcontext()
    named = " ".join(f"{key}={value}" for key, value in sizes.items())
    return torch.profiler.record_function(f"moe_kernels.{kernel} {named} flops={flops}")


def _launch_rows(
    a,
    b,
    offsets,
    c,
    num_rows,
    num_cols,
    *,
    epilogue="none",
    activation="silu",
    gate: Glu | None = None,
    preact=None,
    store_preact=False,
    a_rows=None,
    c_rows=None,
    scale=None,
    scale_rows=None,
    bias=None,
    b_scale=None,
):
    E, K = b.shape[0], b.shape[1]
    if num_rows == 0 or num_cols == 0:
        return c
    if K == 0 and bias is None:
        return c.zero_()
    # Pointers of disabled options are never read; any tensor stands in for them.
    unused = offsets
    preact = c if preact is None else preact
    pointers = (
        a, b, c, offsets, unused if a_rows is None else a_rows, unused if c_rows is None else c_rows,
        c if scale is None else scale, unused if scale_rows is None else scale_rows, preact,
        unused if bias is None else bias,
    )  # fmt: skip
    sizes = (triton.next_power_of_2(num_rows), num_cols, K, E)
    strides = (
        a.stride(0), a.stride(1), *b.stride(), c.stride(0), c.stride(1), preact.stride(0), preact.stride(1),
        *((0, 0) if bias is None else bias.stride()),
    )  # fmt: skip
    options = dict(
        EPILOGUE=epilogue, ACTIVATION=activation, GLU=gate is not None, STORE_PREACT=store_preact,
        CLAMP=gate is not None and gate.limit is not None, LIMIT=float((gate and gate.limit) or 0.0),
        ALPHA=float(gate.alpha if gate else 1.0), UP_OFFSET=float(gate.up_offset if gate else 0.0),
        GATE_CAP=float((gate and gate.gate_softcap) or 0.0), UP_CAP=float((gate and gate.up_softcap) or 0.0),
        GATHER_A=a_rows is not None,
        SCATTER_C=c_rows is not None, SCALE=scale is not None, BIAS=bias is not None,
        BLOCK_E=triton.next_power_of_2(E),
    )  # fmt: skip

    def grid(meta):
        return ((triton.cdiv(num_rows, meta["BLOCK_M"]) + E) * triton.cdiv(num_cols, meta["BLOCK_N"]),)

    products = 2 if gate is not None and epilogue == "act" else 1  # a GLU's gate and up projections
    kernel = f"grouped_mm{'_fp8' if b_scale is not None else ''}[{epilogue}]"
    with _annotated(kernel, 2 * num_rows * num_cols * K * products, rows=num_rows, N=num_cols * products, K=K):
        if b_scale is None:
            _grouped_mm_kernel[grid](*pointers, *sizes, *strides, **options, PRECISION=_precision(a.dtype))
        else:
            _grouped_mm_fp8_kernel[grid](
                *pointers, b_scale, *sizes, *strides, *b_scale.stride(), **options, EXACT_CAST=INTERPRET
            )
    return c


def grouped_mm_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    *,
    a_rows: torch.Tensor | None = None,
    c_rows: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``c[c_rows[r]] = a[a_rows[r]] @ b[group of r] + bias[group of r]`` for the rows ``r``
    that ``offsets`` groups.

    Args:
        a: ``[*, K]``; b: ``[E, K, N]`` (any strides); offsets: ``[E]`` cumulative row ends.
        a_rows, c_rows: ``[M]`` int32 gather / scatter indices, identity when ``None``.
        bias: ``[E, N]`` or ``None``.
        b_scale: with an e4m3 ``b``, its 128x128 block scales ``[E, cdiv(K, 128), cdiv(N, 128)]``
            (any strides: a transposed ``quantize_fp8`` pair is one too): the FP8 kernel.
    Returns:
        ``c [M, N]`` in ``a.dtype``.
    """
    num_rows = a.shape[0] if a_rows is None else a_rows.shape[0]
    c = a.new_empty((num_rows, b.shape[2]))
    return _launch_rows(
        a, b, offsets, c, num_rows, b.shape[2], a_rows=a_rows, c_rows=c_rows, bias=bias, b_scale=b_scale
    )


def grouped_mm_act(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    activation: str,
    *,
    a_rows: torch.Tensor | None = None,
    save_preact: bool = False,
    bias: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``h = act(a[a_rows] @ b[group] + bias[group])``, the MoE's first GEMM with its
    activation fused.

    Args:
        a: ``[*, K]``; b: ``[E, K, 2H]`` for swiglu (gate columns, then up columns), else ``[E, K, H]``.
        bias: ``[E, 2H]`` (or ``[E, H]``) or ``None``; the saved pre-activation includes it.
        b_scale: block scales of an e4m3 ``b`` (see ``grouped_mm_triton``).
    Returns:
        ``h [M, H]`` and, with ``save_preact``, the pre-activation ``[M, 2H]`` (or ``[M, H]``).
    """
    name, gate = split_activation(activation)
    num_rows = a.shape[0] if a_rows is None else a_rows.shape[0]
    hidden = b.shape[2] if gate is None else b.shape[2] // 2
    h = a.new_empty((num_rows, hidden))
    preact = a.new_empty((num_rows, b.shape[2])) if save_preact else None
    _launch_rows(
        a,
        b,
        offsets,
        h,
        num_rows,
        hidden,
        epilogue="act",
        activation=name,
        gate=gate,
        preact=preact,
        store_preact=save_preact,
        a_rows=a_rows,
        bias=bias,
        b_scale=b_scale,
    )
    return h, preact


def grouped_mm_act_grad(
    grad: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    preact: torch.Tensor,
    activation: str,
    *,
    a_rows: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    scale_rows: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of the pre-activation from ``dh = scale * grad[a_rows] @ b[group]``.

    Args:
        grad: ``[*, K]``; b: ``[E, K, H]`` (the transposed second-GEMM weights);
        preact: ``[M, 2H]`` for swiglu, else ``[M, H]``; scale: flat per-slot factors indexed by ``scale_rows``.
        b_scale: block scales of an e4m3 ``b`` (see ``grouped_mm_triton``).
    Returns:
        ``[M, 2H]`` (swiglu) or ``[M, H]``, in ``preact.dtype``.
    """
    name, gate = split_activation(activation)
    num_rows = preact.shape[0]
    out = torch.empty_like(preact)
    _launch_rows(
        grad,
        b,
        offsets,
        out,
        num_rows,
        b.shape[2],
        epilogue="act_grad",
        activation=name,
        gate=gate,
        preact=preact,
        a_rows=a_rows,
        scale=scale,
        scale_rows=scale_rows,
        b_scale=b_scale,
    )
    return out


def grouped_mm_wgrad(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    out_dtype: torch.dtype,
    *,
    a_rows: torch.Tensor | None = None,
    b_rows: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    scale_rows: torch.Tensor | None = None,
    bias_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``c[e] = (scale * a[a_rows of e])^T @ b[b_rows of e]``: a weight gradient (the scale per row).

    Args:
        a: ``[*, K]``; b: ``[*, N]``; offsets: ``[E]``.
        bias_grad: also return ``sum over the rows of e of scale * b[b_rows]``, the gradient
            of a per-group bias, computed from the same loads of b.
    Returns:
        ``c [E, K, N]`` in ``out_dtype`` (an empty group's slice is zero) and the bias gradient
        ``[E, N]`` in ``out_dtype`` with ``bias_grad``, else ``None``.
    """
    E, K, N = offsets.shape[0], a.shape[1], b.shape[1]
    c = a.new_empty((E, K, N), dtype=out_dtype)
    summed = a.new_empty((E, N), dtype=torch.float32) if bias_grad else None
    if N == 0 or (K == 0 and not bias_grad):
        return c, None if summed is None else summed.to(out_dtype)

    def grid(meta):
        return (E * triton.cdiv(max(K, 1), meta["BLOCK_K"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    rows = a.shape[0] if a_rows is None else a_rows.shape[0]
    unused = offsets
    with _annotated("grouped_wgrad", 2 * rows * K * N, rows=rows, N=N, K=K):
        _grouped_wgrad_kernel[grid](
            a,
            b,
            c,
            offsets,
            unused if a_rows is None else a_rows,
            unused if b_rows is None else b_rows,
            c if scale is None else scale,
            unused if scale_rows is None else scale_rows,
            c if summed is None else summed,
            triton.next_power_of_2(rows),
            N,
            K,
            E,
            a.stride(0),
            a.stride(1),
            b.stride(0),
            b.stride(1),
            c.stride(0),
            c.stride(1),
            c.stride(2),
            0 if summed is None else summed.stride(0),
            GATHER_A=a_rows is not None,
            GATHER_B=b_rows is not None,
            SCALE=scale is not None,
            BIAS_GRAD=bias_grad,
            PRECISION=_precision(a.dtype),
        )
    return c, None if summed is None else summed.to(out_dtype)


def _aligned(t: torch.Tensor) -> bool:
    # torch._grouped_mm wants one of the last two dims contiguous (the last, or the one before
    # for a transposed matrix), 16-byte aligned data and every other stride a multiple of 16
    # bytes (so no broadcast, stride-0 dims). A width of 1 makes the row stride 1 element.
    size, strides = t.element_size(), t.stride()
    inner = t.dim() - 1 if strides[-1] == 1 else t.dim() - 2
    others = (s for d, s in enumerate(strides) if d != inner)
    return t.data_ptr() % 16 == 0 and strides[inner] == 1 and all(s != 0 and s * size % 16 == 0 for s in others)


def _pad_last(t: torch.Tensor, multiple: int) -> torch.Tensor:
    return F.pad(t, (0, -t.shape[-1] % multiple))


def grouped_mm_torch(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm(a [M, K], b [E, K, N])``, padding K and N where its alignment rules demand."""
    if a.shape[1] == 0 or b.shape[2] == 0:  # an empty product, which torch._grouped_mm rejects
        return a.new_zeros((a.shape[0], b.shape[2]))
    if not (_aligned(a) and _aligned(b)):
        multiple = 16 // a.element_size()
        N = b.shape[2]
        a = _pad_last(a, multiple).contiguous()
        b = _pad_last(F.pad(b, (0, 0, 0, a.shape[1] - b.shape[1])), multiple).contiguous()
        return torch._grouped_mm(a, b, offs=offsets)[:, :N].contiguous()
    return torch._grouped_mm(a, b, offs=offsets)


def group_of_row(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``[num_rows]`` int64: the group each row belongs to, from the cumulative ends ``offsets [E]``."""
    rows = torch.arange(num_rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets, rows, right=True)


def group_sums_torch(rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[E, N]``: the sum of each group's rows of ``rows [M, N]`` (a per-group bias's gradient),
    as a grouped product with a column of ones, so the order of the sum is fixed."""
    ones = rows.new_ones((rows.shape[0], 1))
    return grouped_mm_wgrad_torch(ones, rows, offsets)[:, 0]


def grouped_mm_wgrad_torch(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``c[e] = a[rows of e]^T @ b[rows of e]`` through ``torch._grouped_mm``: ``[E, K, N]``."""
    K, N = a.shape[1], b.shape[1]
    if K == 0 or N == 0:
        return a.new_zeros((offsets.shape[0], K, N))
    if not (_aligned(a.t()) and _aligned(b)):
        multiple = 16 // a.element_size()
        a, b = _pad_last(a, multiple).contiguous(), _pad_last(b, multiple).contiguous()
        return torch._grouped_mm(a.t(), b, offs=offsets)[:, :K, :N].contiguous()
    return torch._grouped_mm(a.t(), b, offs=offsets)


# The op and its pieces as torch.library custom ops, so that torch.compile and torch.export see
# one opaque op with a fake (shape-only) implementation instead of tracing into Triton's launcher
# or torch._grouped_mm's alignment checks. Inputs are already checked; ``backend`` is resolved.


@custom_op("moe_kernels::grouped_mm")
def grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str) -> torch.Tensor:
    """``x [M, K], w [E, K, N], offsets [E] int32 -> y [M, N]``."""
    if backend == "triton":
        return grouped_mm_triton(x, w, offsets)
    return grouped_mm_torch(x, w, offsets)


@grouped_mm_op.register_fake
def _(x, w, offsets, backend):
    return x.new_empty((x.shape[0], w.shape[2]))


@custom_op("moe_kernels::grouped_mm_wgrad")
def grouped_mm_wgrad_op(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor, backend: str) -> torch.Tensor:
    """The weight gradient of ``grouped_mm``: ``x [M, K], grad [M, N] -> dw [E, K, N]`` in ``x.dtype``."""
    if backend == "triton":
        return grouped_mm_wgrad(x, grad, offsets, x.dtype)[0]
    return grouped_mm_wgrad_torch(x, grad, offsets)


@grouped_mm_wgrad_op.register_fake
def _(x, grad, offsets, backend):
    return x.new_empty((offsets.shape[0], x.shape[1], grad.shape[1]))


def _setup_context(ctx, inputs, output):
    x, w, offsets, backend = inputs
    ctx.save_for_backward(x, w, offsets)
    ctx.backend = backend


def _backward(ctx, grad):
    x, w, offsets = ctx.saved_tensors
    grad_x = grad_w = None
    with torch.no_grad():  # first-order only; no_grad also keeps torch.func from tracing the ops
        if ctx.needs_input_grad[0]:
            grad_x = grouped_mm_op(grad, w.transpose(1, 2), offsets, ctx.backend)
        if ctx.needs_input_grad[1]:
            grad_w = grouped_mm_wgrad_op(x, grad, offsets, ctx.backend)
    return grad_x, grad_w, None, None


grouped_mm_apply = differentiable(grouped_mm_op, _setup_context, _backward)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Multiply consecutive groups of rows of ``x`` by their own matrix.

    Args:
        x: ``[M, K]`` (fp16, bf16 or fp32, any strides).
        w: ``[E, K, N]``, same dtype.
        offsets: ``[E]`` int32 (or int64) cumulative row ends, non-decreasing, ``offsets[-1] == M``;
            rows ``offsets[e-1]:offsets[e]`` are multiplied by ``w[e]``. Empty groups are allowed.
        backend: ``None``/``"auto"``, ``"triton"`` or ``"torch"``.
    Returns:
        ``y [M, N]`` in ``x.dtype``, differentiable in ``x`` and ``w``.
    """
    check_tensor("x", x, 2, FLOAT_DTYPES)
    check_tensor("w", w, 3, FLOAT_DTYPES)
    check_tensor("offsets", offsets, 1, INDEX_DTYPES)
    if w.dtype != x.dtype:
        raise TypeError(f"w must have the dtype of x ({x.dtype}), got {w.dtype}")
    check_dim("w", w, 1, x.shape[1], "K, the columns of x")
    check_dim("offsets", offsets, 0, w.shape[0], "E, the groups of w")
    if w.shape[0] == 0:
        raise ValueError("w must hold at least one group, got shape " + str(tuple(w.shape)))
    device = check_same_device(x=x, w=w, offsets=offsets)
    check_offsets(offsets, x.shape[0])
    offsets = offsets.to(torch.int32)
    return grouped_mm_apply(x, w, offsets, resolve_backend(backend, device))
