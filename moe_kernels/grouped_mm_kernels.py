"""The grouped GEMM's Triton kernels; their host code (launchers, the PyTorch path, the ops) is
``grouped_mm.py``.

* ``grouped_mm_kernel`` tiles each group's rows into ``BLOCK_M`` tiles. The tile-to-group map
  is computed inside the kernel from ``offsets``, and the grid is sized from the host-known bound
  ``cdiv(M, BLOCK_M) + E`` tiles, so nothing is read back to the host and an empty group costs
  nothing but idle programs. Options fuse the MoE data movement into the GEMM: a row gather in
  the A load (no permuted copy of the tokens), a per-row scale, the activation (and the store of
  its input for the backward pass) or the activation's gradient in the epilogue, and a row
  scatter in the store.
* ``grouped_mm_fp8_kernel`` is its FP8 form (e4m3 weights with block scales, the activations
  quantized per row as they are loaded, by ``fp8.quantize_tile``): the same tiles, epilogue and
  options, another K loop.
* ``grouped_wgrad_kernel`` computes ``dw[e] = a[rows of e]^T @ b[rows of e]``: a grouped GEMM
  whose reduction length varies per group, with the same gather and scale options.

Rows are never padded in memory: partial tiles are masked. Each kernel's candidate configs, its
pruning and its table entries are ``tuning``'s.
"""

import triton
import triton.language as tl

from .activations import act, act_grad, glu, glu_grad
from .fp8 import quantize_tile
from .tuning import (
    FP8_CONFIGS,
    FP8_KEYS,
    ROW_CONFIGS,
    ROW_KEYS,
    WGRAD_CONFIGS,
    WGRAD_KEYS,
    autotuned,
    fp8_candidates,
    row_candidates,
    wgrad_candidates,
)


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
    bias, the row scale and the epilogue of ``grouped_mm_kernel``, stored: shared by its bf16 and
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


@autotuned("grouped_mm", ROW_CONFIGS, ROW_KEYS, row_candidates)
@triton.jit
def grouped_mm_kernel(
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


@autotuned("grouped_mm_fp8", FP8_CONFIGS, FP8_KEYS, fp8_candidates)
@triton.jit
def grouped_mm_fp8_kernel(
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
    """``grouped_mm_kernel`` with b in e4m3 (``float8_e4m3fn``, one fp32 scale per 128x128
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
        a_q, a_scale = quantize_tile(a, EXACT_CAST)
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


@autotuned("grouped_wgrad", WGRAD_CONFIGS, WGRAD_KEYS, wgrad_candidates)
@triton.jit
def grouped_wgrad_kernel(
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
