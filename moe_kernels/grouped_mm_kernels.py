"""The grouped GEMM's Triton kernels; their host code (launchers, the PyTorch path, the ops) is
``grouped_mm.py``.

* ``grouped_mm_kernel`` tiles each group's rows into ``BLOCK_M`` tiles. The tile-to-group map
  is computed inside the kernel from ``offsets``, and the grid is sized from the host-known bound
  ``cdiv(M, BLOCK_M) + E`` tiles, so nothing is read back to the host and an empty group costs
  nothing but idle programs; or, in its TMA design, one program per SM walks the same
  schedule, loading the weights (and expert-major rows) by TMA. Options fuse the MoE data movement into the GEMM: a row gather in
  the A load (no permuted copy of the tokens), a per-row scale, the activation (and the store of
  its input for the backward pass) or the activation's gradient in the epilogue, and a row
  scatter in the store.
* ``grouped_mm_fp8_kernel`` is its FP8 form (e4m3 weights with block scales, the activations
  quantized per row as they are loaded, by ``fp8.quantize_tile``): the same tiles, designs,
  epilogue and options, another K loop.
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
def _tile_schedule(offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Each group's first row, row end and last row tile + 1 (``[BLOCK_E]``, zero rows past E):
    the grouped tile schedule, built on the device from ``offsets``."""
    groups = tl.arange(0, BLOCK_E)
    ends = tl.load(offsets_ptr + groups, mask=groups < E, other=0).to(tl.int32)
    starts = tl.load(offsets_ptr + groups - 1, mask=(groups > 0) & (groups < E), other=0).to(tl.int32)
    return starts, ends, tl.cumsum(tl.cdiv(ends - starts, BLOCK_M), axis=0)


@triton.jit
def _locate_tile(tile, starts, ends, tile_ends, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Row tile ``tile`` of a schedule: ``(group, first row, row end)``; ``group >= E`` past the last tile."""
    group = tl.sum((tile_ends <= tile).to(tl.int32), axis=0)
    this = tl.arange(0, BLOCK_E) == group
    first_tile = tl.sum(tl.where(this, tile_ends - tl.cdiv(ends - starts, BLOCK_M), 0), axis=0)
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
    starts, ends, tile_ends = _tile_schedule(offsets_ptr, E, BLOCK_M, BLOCK_E)
    group, row_start, row_end = _locate_tile(pid // num_n, starts, ends, tile_ends, BLOCK_M, BLOCK_E)
    rm = row_start + tl.arange(0, BLOCK_M)
    rn = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rm < row_end
    return group, rm, rn, row_ok, rn < N, _rows(a_rows_ptr, rm, row_ok, GATHER_A)


@triton.jit
def _store_rows(ptr, value, rm, rn, row_ok, col_ok, width, stride_m, stride_n, TMA_STORE: tl.constexpr):
    """Store a row tile's ``value`` at rows ``rm``, columns ``rn`` of ``ptr`` (``width`` columns):
    by pointers, or with TMA_STORE (rows contiguous per group, the columns unit-stride) through a
    TMA descriptor whose rows end at the tile's group's end, so that the rows past it, the next
    group's, are left as they are."""
    if TMA_STORE:
        row_start = tl.min(rm, axis=0).to(tl.int32)
        row_end = row_start + tl.sum(row_ok.to(tl.int32), axis=0)
        desc = tl.make_tensor_descriptor(
            ptr, shape=[row_end, width], strides=[stride_m, 1], block_shape=[value.shape[0], value.shape[1]]
        )
        desc.store([row_start, tl.min(rn, axis=0).to(tl.int32)], value)
    else:
        tl.store(ptr + rm.to(tl.int64)[:, None] * stride_m + rn[None, :] * stride_n, value,
                 mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip


@triton.jit
def _epilogue(acc, acc_up, group, rm, rn, row_ok, col_ok, N, c_ptr, c_rows_ptr, stride_cm, stride_cn,
              preact_ptr, stride_pm, stride_pn, scale_ptr, scale_rows_ptr, bias_ptr, stride_bias_e, stride_bias_n,
              scale_grad_ptr, stride_sg,
              EPILOGUE: tl.constexpr, ACTIVATION: tl.constexpr, GLU: tl.constexpr, CLAMP: tl.constexpr,
              LIMIT: tl.constexpr, ALPHA: tl.constexpr, UP_OFFSET: tl.constexpr, GATE_CAP: tl.constexpr,
              UP_CAP: tl.constexpr, STORE_PREACT: tl.constexpr,
              SCATTER_C: tl.constexpr, SCALE: tl.constexpr, BIAS: tl.constexpr, SCALE_GRAD: tl.constexpr,
              TMA_STORE: tl.constexpr):  # fmt: skip
    """A row tile's fp32 product (``acc``, and ``acc_up`` for a GLU's up projection) through the
    bias, the row scale and the epilogue of ``grouped_mm_kernel``, stored (with TMA_STORE, c and
    the pre-activation through TMA descriptors: ``_store_rows``): shared by its bf16 and FP8
    forms, which differ only in their K loops."""
    tl.static_assert(not (TMA_STORE and SCATTER_C), "scattered rows are stored by pointers")
    mask = row_ok[:, None] & col_ok[None, :]
    preact_ptrs = preact_ptr + rm.to(tl.int64)[:, None] * stride_pm + rn[None, :] * stride_pn
    if EPILOGUE == "act_grad":
        pre = tl.load(preact_ptrs, mask=mask, other=0.0).to(tl.float32)
        if GLU:
            up = tl.load(preact_ptrs + N * stride_pn, mask=mask, other=0.0).to(tl.float32)
        if SCALE_GRAD:
            # The routing weight's gradient, from this tile before the weight scales it: the row's
            # dL/d(act output) against the act output, recomputed from the pre-activation
            # (SonicMoE's dS = <dA', A>), over this tile's columns; a plane per column tile.
            if GLU:
                h = glu(pre, up, ACTIVATION, CLAMP, LIMIT, ALPHA, UP_OFFSET, GATE_CAP, UP_CAP)
            else:
                h = act(pre, ACTIVATION)
            plane = tl.min(rn, axis=0) // acc.shape[1]
            tl.store(scale_grad_ptr + plane.to(tl.int64) * stride_sg + rm, tl.sum(acc * h, axis=1), mask=row_ok)
    if BIAS:
        bias_ptrs = bias_ptr + group.to(tl.int64) * stride_bias_e + rn * stride_bias_n
        acc += tl.load(bias_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GLU and EPILOGUE == "act":
            acc_up += tl.load(bias_ptrs + N * stride_bias_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SCALE:
        slots = tl.load(scale_rows_ptr + rm, mask=row_ok, other=0)
        acc *= tl.load(scale_ptr + slots, mask=row_ok, other=0.0)[:, None]
    c_rows = _rows(c_rows_ptr, rm, row_ok, SCATTER_C)
    c_ty = c_ptr.dtype.element_ty
    if EPILOGUE == "act":
        if STORE_PREACT:
            p_ty = preact_ptr.dtype.element_ty
            _store_rows(preact_ptr, acc.to(p_ty), rm, rn, row_ok, col_ok, N, stride_pm, stride_pn, TMA_STORE)
            if GLU:
                _store_rows(preact_ptr + N * stride_pn, acc_up.to(p_ty), rm, rn, row_ok, col_ok, N, stride_pm,
                            stride_pn, TMA_STORE)  # fmt: skip
        if GLU:
            out = glu(acc, acc_up, ACTIVATION, CLAMP, LIMIT, ALPHA, UP_OFFSET, GATE_CAP, UP_CAP)
        else:
            out = act(acc, ACTIVATION)
        _store_rows(c_ptr, out.to(c_ty), c_rows, rn, row_ok, col_ok, N, stride_cm, stride_cn, TMA_STORE)
    elif EPILOGUE == "act_grad":
        if GLU:
            d_gate, d_up = glu_grad(acc, pre, up, ACTIVATION, CLAMP, LIMIT, ALPHA, UP_OFFSET, GATE_CAP, UP_CAP)
            _store_rows(c_ptr, d_gate.to(c_ty), c_rows, rn, row_ok, col_ok, N, stride_cm, stride_cn, TMA_STORE)
            _store_rows(c_ptr + N * stride_cn, d_up.to(c_ty), c_rows, rn, row_ok, col_ok, N, stride_cm, stride_cn,
                        TMA_STORE)  # fmt: skip
        else:
            d_pre = (acc * act_grad(pre, ACTIVATION)).to(c_ty)
            _store_rows(c_ptr, d_pre, c_rows, rn, row_ok, col_ok, N, stride_cm, stride_cn, TMA_STORE)
    else:
        _store_rows(c_ptr, acc.to(c_ty), c_rows, rn, row_ok, col_ok, N, stride_cm, stride_cn, TMA_STORE)


@triton.jit
def _persistent_tile(tile, num_n, N, starts, ends, tile_ends, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_E: tl.constexpr):  # fmt: skip
    """Output tile ``tile`` of the schedule, for a persistent program: its group, first row, rows,
    columns and their masks."""
    group, row_start, row_end = _locate_tile(tile // num_n, starts, ends, tile_ends, BLOCK_M, BLOCK_E)
    rm = row_start + tl.arange(0, BLOCK_M)
    rn = (tile % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return group, row_start, rm, rn, rm < row_end, rn < N


@triton.jit
def _persistent_schedule(offsets_ptr, a_ptr, b_ptr, E, N, K, A_ROWS, stride_am, stride_be, stride_bk, stride_bn,
                         EPILOGUE: tl.constexpr, GLU: tl.constexpr, GATHER_A: tl.constexpr, A_TMA: tl.constexpr,
                         B_TRANSPOSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):  # fmt: skip
    """What a persistent program of a row kernel's TMA design sets up once: the tile schedule
    (each group's starts, ends and tile ends), the column tiles and tiles in all, b's descriptor,
    and a's (with A_TMA: tiles of its rows, or with GATHER_A single rows for TMA gathers; else
    ``a_ptr`` itself)."""
    starts, ends, tile_ends = _tile_schedule(offsets_ptr, E, BLOCK_M, BLOCK_E)
    num_n = tl.cdiv(N, BLOCK_N)
    width = N * 2 if GLU and EPILOGUE == "act" else N
    b_desc = _b_descriptor(b_ptr, E, K, width, stride_be, stride_bk, stride_bn, BLOCK_K, BLOCK_N, B_TRANSPOSED)
    a_src = a_ptr
    if A_TMA:
        a_src = tl.make_tensor_descriptor(
            a_ptr, shape=[A_ROWS, K], strides=[stride_am, 1], block_shape=[1 if GATHER_A else BLOCK_M, BLOCK_K]
        )
    return starts, ends, tile_ends, num_n, tl.max(tile_ends, axis=0) * num_n, a_src, b_desc


@triton.jit
def _load_a(a_desc, row_start, a_rows, k0, GATHER_A: tl.constexpr):
    """The A tile at ``k0`` through a's TMA descriptor: the tile of rows from ``row_start`` or,
    with GATHER_A, the rows ``a_rows`` gathered (Blackwell's TMA gather)."""
    if GATHER_A:
        a = a_desc.gather(a_rows.to(tl.int32), k0)
    else:
        a = a_desc.load([row_start, k0])
    return a


@triton.jit
def _b_descriptor(b_ptr, E, K, width, stride_be, stride_bk, stride_bn, BLOCK_K: tl.constexpr,
                  BLOCK_N: tl.constexpr, B_TRANSPOSED: tl.constexpr):  # fmt: skip
    """A TMA descriptor over ``b [E, K, width]``, or with B_TRANSPOSED over its K-contiguous
    ``[E, width, K]`` view; its bounds zero what lies past K and past the width."""
    if B_TRANSPOSED:
        desc = tl.make_tensor_descriptor(
            b_ptr, shape=[E, width, K], strides=[stride_be, stride_bn, 1], block_shape=[1, BLOCK_N, BLOCK_K]
        )
    else:
        desc = tl.make_tensor_descriptor(
            b_ptr, shape=[E, K, width], strides=[stride_be, stride_bk, 1], block_shape=[1, BLOCK_K, BLOCK_N]
        )
    return desc


@triton.jit
def _load_b(b_desc, group, k0, n0, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, B_TRANSPOSED: tl.constexpr):
    """The ``BLOCK_K x BLOCK_N`` tile of ``b[group]`` at ``(k0, n0)`` through its TMA descriptor;
    a K-contiguous b (the transposed weights of the input gradient) is loaded as its
    ``BLOCK_N x BLOCK_K`` tile and read transposed, as the MMA reads shared memory either way."""
    if B_TRANSPOSED:
        return b_desc.load([group, n0, k0]).reshape(BLOCK_N, BLOCK_K).T
    return b_desc.load([group, k0, n0]).reshape(BLOCK_K, BLOCK_N)


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
    scale_grad_ptr,
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
    stride_sg,
    A_ROWS,
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
    SCALE_GRAD: tl.constexpr,
    PRECISION: tl.constexpr,
    A_TMA: tl.constexpr,
    B_TMA: tl.constexpr,
    B_TRANSPOSED: tl.constexpr,
    C_TMA: tl.constexpr,
    # Tiles, and the design (``tuning.DESIGNS``): tiled, or TMA (persistent, with TMA loads)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    TMA: tl.constexpr,
):
    """``c[rows] = epilogue(a[rows] @ b[group] + bias[group])`` for one ``BLOCK_M x BLOCK_N`` tile.

    BIAS adds the group's bias row (``2N`` wide with GLU and EPILOGUE "act") to the product.
    EPILOGUE "none": c = acc (times the row scale if SCALE).
    EPILOGUE "act": c = act(acc), or with GLU ``glu(acc, acc_up)`` (SwiGLU's options CLAMP,
    LIMIT, ALPHA, UP_OFFSET, GATE_CAP, UP_CAP; see ``activations``), where acc_up multiplies b's columns N:2N; with
    STORE_PREACT the pre-activation (both halves) is written to preact.
    EPILOGUE "act_grad": acc is dL/d(act output) (times the row scale); preact holds the saved
    pre-activation; c = dL/d(pre-activation), 2N columns wide with GLU. With SCALE_GRAD, each row's
    unscaled acc dotted with the act output over the tile's columns is stored to scale_grad, the
    plane of the tile's column index (planes ``stride_sg`` apart): their sum over planes is the
    gradient of the row's scale.

    Two designs, a config's choice (``tuning``), so that the autotuner times them side by side:
    one program per tile of the host-known bound, with pointer loads; or TMA: one program
    per SM walking the grouped tile schedule from tile ``program_id`` in steps of the grid (no
    program idles on an empty group's slots, and the tile count needs no host sync), b read
    through a TMA descriptor over ``[E, K, width]`` (with B_TRANSPOSED, a K-contiguous b such as
    the input gradient's transposed weights, over ``[E, width, K]``, each tile read transposed),
    whose bounds zero what lies past K and past the width. B_TMA says the launcher found b
    readable by TMA. With A_TMA (rows 16-byte aligned) a is read through a descriptor over its
    ``[A_ROWS, K]`` rows too: a tile's rows past its group are the next group's, and the
    epilogue's row mask drops them; gathered rows (GATHER_A) by TMA gathers, which only Blackwell
    has (the launcher sets A_TMA for them there alone: elsewhere they keep pointer loads). With
    C_TMA (rows not scattered, c and the pre-activation TMA-ready; not the act_grad epilogue) the
    TMA design stores them by TMA too, each tile through a descriptor that ends at its group's
    last row.
    """
    if TMA:
        tl.static_assert(B_TMA, "the TMA design reads b by TMA: its pruning keeps it from other launches")
        starts, ends, tile_ends, num_n, num_tiles, a_src, b_desc = _persistent_schedule(
            offsets_ptr, a_ptr, b_ptr, E, N, K, A_ROWS, stride_am, stride_be, stride_bk, stride_bn, EPILOGUE, GLU,
            GATHER_A, A_TMA, B_TRANSPOSED, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_E,
        )  # fmt: skip
        rk = tl.arange(0, BLOCK_K)
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            group, row_start, rm, rn, row_ok, col_ok = _persistent_tile(
                tile, num_n, N, starts, ends, tile_ends, BLOCK_M, BLOCK_N, BLOCK_E
            )
            n0 = (tile % num_n) * BLOCK_N
            a_rows = _rows(a_rows_ptr, rm, row_ok, GATHER_A)
            a_ptrs = a_ptr + a_rows[:, None] * stride_am + rk[None, :] * stride_ak
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                if A_TMA:
                    a = _load_a(a_src, row_start, a_rows, k0, GATHER_A)
                else:
                    a = tl.load(a_ptrs, mask=row_ok[:, None] & (rk < K - k0)[None, :], other=0.0)
                    a_ptrs += BLOCK_K * stride_ak
                acc = tl.dot(a, _load_b(b_desc, group, k0, n0, BLOCK_K, BLOCK_N, B_TRANSPOSED), acc,
                             input_precision=PRECISION)  # fmt: skip
                if GLU and EPILOGUE == "act":
                    b_up = _load_b(b_desc, group, k0, n0 + N, BLOCK_K, BLOCK_N, B_TRANSPOSED)
                    acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
            _epilogue(acc, acc_up, group, rm, rn, row_ok, col_ok, N, c_ptr, c_rows_ptr, stride_cm, stride_cn,
                      preact_ptr, stride_pm, stride_pn, scale_ptr, scale_rows_ptr, bias_ptr, stride_bias_e,
                      stride_bias_n, scale_grad_ptr, stride_sg, EPILOGUE, ACTIVATION, GLU, CLAMP, LIMIT, ALPHA,
                      UP_OFFSET, GATE_CAP, UP_CAP, STORE_PREACT, SCATTER_C, SCALE, BIAS, SCALE_GRAD,
                      C_TMA)  # fmt: skip
    else:
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
                  scale_grad_ptr, stride_sg, EPILOGUE, ACTIVATION, GLU, CLAMP, LIMIT, ALPHA, UP_OFFSET, GATE_CAP,
                  UP_CAP, STORE_PREACT, SCATTER_C, SCALE, BIAS, SCALE_GRAD,
                  False)  # fmt: skip


@triton.jit
def _fp8_k_loop(a_src, b_src, b_scale_ptr, a_rows, group, row_start, rn, row_ok, col_ok, N, K, stride_am, stride_ak,
                stride_be, stride_bk, stride_bn, stride_se, stride_sk, stride_sn, EPILOGUE: tl.constexpr,
                GLU: tl.constexpr, EXACT_CAST: tl.constexpr, GATHER_A: tl.constexpr, A_TMA: tl.constexpr,
                B_TMA: tl.constexpr, B_TRANSPOSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):  # fmt: skip
    """One output tile's K loop of ``grouped_mm_fp8_kernel``: ``acc`` (and a GLU forward's
    ``acc_up``) in fp32. a's ``a_rows`` (by pointers, or with A_TMA through the descriptor
    ``a_src``: from ``row_start``, or gathered with GATHER_A) are quantized per row as they are
    loaded; b is read by pointers or, with B_TMA, through the descriptor ``b_src``."""
    rk = tl.arange(0, BLOCK_K)
    if not A_TMA:
        a_ptrs = a_src + a_rows[:, None] * stride_am + rk[None, :] * stride_ak
    if not B_TMA:
        b_ptrs = b_src + group.to(tl.int64) * stride_be + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    n0 = tl.min(rn, axis=0)
    # Each column's scale block; a tile may straddle two (the up half of a GLU starts mid-block).
    s_ptrs = b_scale_ptr + group.to(tl.int64) * stride_se + (rn // BLOCK_K) * stride_sn
    s_up_ptrs = b_scale_ptr + group.to(tl.int64) * stride_se + ((rn + N) // BLOCK_K) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        if A_TMA:
            a = _load_a(a_src, row_start, a_rows, k0, GATHER_A).to(tl.float32)
        else:
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            a_ptrs += BLOCK_K * stride_ak
        a_q, a_scale = quantize_tile(a, EXACT_CAST)
        if B_TMA:
            b = _load_b(b_src, group, k0, n0, BLOCK_K, BLOCK_N, B_TRANSPOSED)
        else:
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            b_up_ptrs = b_ptrs + N * stride_bn
            b_ptrs += BLOCK_K * stride_bk
        b_scale = tl.load(s_ptrs, mask=col_ok, other=0.0)
        acc += tl.dot(a_q, b) * (a_scale[:, None] * b_scale[None, :])
        if GLU and EPILOGUE == "act":
            if B_TMA:
                b_up = _load_b(b_src, group, k0, n0 + N, BLOCK_K, BLOCK_N, B_TRANSPOSED)
            else:
                b_up = tl.load(b_up_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            b_up_scale = tl.load(s_up_ptrs, mask=col_ok, other=0.0)
            acc_up += tl.dot(a_q, b_up) * (a_scale[:, None] * b_up_scale[None, :])
        s_ptrs += stride_sk
        s_up_ptrs += stride_sk
    return acc, acc_up


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
    scale_grad_ptr,
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
    stride_sg,
    stride_se,
    stride_sk,
    stride_sn,
    A_ROWS,
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
    SCALE_GRAD: tl.constexpr,
    EXACT_CAST: tl.constexpr,
    A_TMA: tl.constexpr,
    B_TMA: tl.constexpr,
    B_TRANSPOSED: tl.constexpr,
    C_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    TMA: tl.constexpr,
):
    """``grouped_mm_kernel`` with b in e4m3 (``float8_e4m3fn``, one fp32 scale per 128x128
    block, ``b_scale [E, K/128, N/128]``, any strides) and a quantized per row as it is loaded,
    in groups of 128 along K (``BLOCK_K`` = 128 in every config): each K step multiplies two e4m3
    tiles on FP8 tensor cores and adds the product times its row and column scales to an fp32
    accumulator. With EXACT_CAST (the interpreter) the e4m3 rounding is done in fp32 first.

    Its TMA design is ``grouped_mm_kernel``'s: one program per SM walking the tile schedule, b (and
    a, with A_TMA) read by TMA, c (with C_TMA) stored by TMA; the scales keep pointer loads."""
    if TMA:
        tl.static_assert(B_TMA, "the TMA design reads b by TMA: its pruning keeps it from other launches")
        starts, ends, tile_ends, num_n, num_tiles, a_src, b_src = _persistent_schedule(
            offsets_ptr, a_ptr, b_ptr, E, N, K, A_ROWS, stride_am, stride_be, stride_bk, stride_bn, EPILOGUE, GLU,
            GATHER_A, A_TMA, B_TRANSPOSED, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_E,
        )  # fmt: skip
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            group, row_start, rm, rn, row_ok, col_ok = _persistent_tile(
                tile, num_n, N, starts, ends, tile_ends, BLOCK_M, BLOCK_N, BLOCK_E
            )
            acc, acc_up = _fp8_k_loop(
                a_src, b_src, b_scale_ptr, _rows(a_rows_ptr, rm, row_ok, GATHER_A), group, row_start, rn, row_ok,
                col_ok, N, K, stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_se, stride_sk, stride_sn,
                EPILOGUE, GLU, EXACT_CAST, GATHER_A, A_TMA, True, B_TRANSPOSED, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
            _epilogue(acc, acc_up, group, rm, rn, row_ok, col_ok, N, c_ptr, c_rows_ptr, stride_cm, stride_cn,
                      preact_ptr, stride_pm, stride_pn, scale_ptr, scale_rows_ptr, bias_ptr, stride_bias_e,
                      stride_bias_n, scale_grad_ptr, stride_sg, EPILOGUE, ACTIVATION, GLU, CLAMP, LIMIT, ALPHA,
                      UP_OFFSET, GATE_CAP, UP_CAP, STORE_PREACT, SCATTER_C, SCALE, BIAS, SCALE_GRAD,
                      C_TMA)  # fmt: skip
        return
    group, rm, rn, row_ok, col_ok, a_rows = _row_tile(
        offsets_ptr, a_rows_ptr, N, E, GATHER_A, BLOCK_M, BLOCK_N, BLOCK_E
    )
    if group >= E:
        return
    acc, acc_up = _fp8_k_loop(
        a_ptr, b_ptr, b_scale_ptr, a_rows, group, 0, rn, row_ok, col_ok, N, K, stride_am, stride_ak, stride_be,
        stride_bk, stride_bn, stride_se, stride_sk, stride_sn, EPILOGUE, GLU, EXACT_CAST, GATHER_A, False, False,
        B_TRANSPOSED,
        BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    _epilogue(acc, acc_up, group, rm, rn, row_ok, col_ok, N, c_ptr, c_rows_ptr, stride_cm, stride_cn,
              preact_ptr, stride_pm, stride_pn, scale_ptr, scale_rows_ptr, bias_ptr, stride_bias_e, stride_bias_n,
              scale_grad_ptr, stride_sg, EPILOGUE, ACTIVATION, GLU, CLAMP, LIMIT, ALPHA, UP_OFFSET, GATE_CAP, UP_CAP,
              STORE_PREACT, SCATTER_C, SCALE, BIAS, SCALE_GRAD,
              False)  # fmt: skip


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


@triton.jit
def _wgrad_tma_step(acc, bias_acc, m0, row_end, k0, n0, a_src, b_src, a_rows_ptr, b_rows_ptr, scale_ptr,
                    scale_rows_ptr, rk, rn, k_ok, n_ok, stride_am, stride_ak, stride_bm, stride_bn, sums_bias,
                    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, A_TMA: tl.constexpr, B_TMA: tl.constexpr,
                    SCALE: tl.constexpr, TAIL: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr):  # fmt: skip
    """One reduction step of ``grouped_wgrad_kernel``'s TMA design: rows ``m0 + [0, BLOCK_M)``,
    each operand read by TMA (``a_src``/``b_src`` a descriptor) or by pointer loads (a pointer,
    rows gathered or not). A TMA tile runs past the group into the next group's rows; the TAIL
    step (the group's last, partial tile) zeroes those rows of a, which drops their products."""
    rm = m0 + tl.arange(0, BLOCK_M)
    row_ok = rm < row_end
    if A_TMA:
        a = a_src.load([m0, k0])
        if TAIL:
            a = tl.where(row_ok[:, None], a, tl.zeros_like(a))
    else:
        a_rows = _rows(a_rows_ptr, rm, row_ok, GATHER_A)
        a_ptrs = a_src + a_rows[:, None] * stride_am + rk[None, :] * stride_ak
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    if B_TMA:
        b = b_src.load([m0, n0])
    else:
        b_rows = _rows(b_rows_ptr, rm, row_ok, GATHER_B)
        b = tl.load(
            b_src + b_rows[:, None] * stride_bm + rn[None, :] * stride_bn,
            mask=row_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
    if SCALE:
        slots = tl.load(scale_rows_ptr + rm, mask=row_ok, other=0)
        scales = tl.load(scale_ptr + slots, mask=row_ok, other=0.0)
    if sums_bias:
        summed = tl.where(row_ok[:, None], b.to(tl.float32), 0.0)
        if SCALE:
            summed = summed * scales[:, None]
        bias_acc += tl.sum(summed, axis=0)
    if SCALE:
        a = (a * scales[:, None]).to(b.dtype)
    return tl.dot(tl.trans(a), b, acc, input_precision=PRECISION), bias_acc


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
    A_ROWS,
    B_ROWS,
    # Options
    GATHER_A: tl.constexpr,
    GATHER_B: tl.constexpr,
    SCALE: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    PRECISION: tl.constexpr,
    A_TMA: tl.constexpr,
    B_TMA: tl.constexpr,
    C_TMA: tl.constexpr,
    # Tiles: BLOCK_K x BLOCK_N of the output, BLOCK_M rows of reduction per step; the design
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TMA: tl.constexpr,
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

    The TMA design (``tuning.DESIGNS``) reads a (with A_TMA) and b (with B_TMA: each not
    gathered, rows 16-byte aligned, on a GPU with TMA) through TMA descriptors over their rows
    instead, and stores the output tile through a descriptor over ``c [E, K, N]`` (with C_TMA);
    a gathered operand keeps pointer loads. Its loop runs over the group's full row
    tiles unmasked, then one masked step for the partial tile (``_wgrad_tma_step``). A tile by
    TMA past the group reads the next group's rows, whose products a's zeroed rows drop: where
    only b is read by TMA, a non-finite value in those rows of b would still make this group's
    gradient NaN (0 x inf), which only a step whose gradients already overflowed can hold.
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
    if TMA:
        tl.static_assert(
            A_TMA or B_TMA, "the TMA design reads an operand by TMA: its pruning keeps it from other launches"
        )
        a_src = a_ptr
        b_src = b_ptr
        if A_TMA:
            a_src = tl.make_tensor_descriptor(
                a_ptr, shape=[A_ROWS, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K]
            )
        if B_TMA:
            b_src = tl.make_tensor_descriptor(
                b_ptr, shape=[B_ROWS, N], strides=[stride_bm, 1], block_shape=[BLOCK_M, BLOCK_N]
            )
        k0 = pid_k * BLOCK_K
        n0 = (pid % num_n) * BLOCK_N
        full_end = row_start + (row_end - row_start) // BLOCK_M * BLOCK_M
        for m0 in range(row_start, full_end, BLOCK_M):
            acc, bias_acc = _wgrad_tma_step(
                acc, bias_acc, m0, row_end, k0, n0, a_src, b_src, a_rows_ptr, b_rows_ptr, scale_ptr, scale_rows_ptr,
                rk, rn, k_ok, n_ok, stride_am, stride_ak, stride_bm, stride_bn, sums_bias, GATHER_A, GATHER_B,
                A_TMA, B_TMA, SCALE, False, PRECISION, BLOCK_M,
            )  # fmt: skip
        if full_end < row_end:
            acc, bias_acc = _wgrad_tma_step(
                acc, bias_acc, full_end, row_end, k0, n0, a_src, b_src, a_rows_ptr, b_rows_ptr, scale_ptr,
                scale_rows_ptr, rk, rn, k_ok, n_ok, stride_am, stride_ak, stride_bm, stride_bn, sums_bias, GATHER_A,
                GATHER_B, A_TMA, B_TMA, SCALE, True, PRECISION, BLOCK_M,
            )  # fmt: skip
    else:
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
    if TMA and C_TMA:
        c_desc = tl.make_tensor_descriptor(
            c_ptr, shape=[E, K, N], strides=[stride_ce, stride_ck, 1], block_shape=[1, BLOCK_K, BLOCK_N]
        )
        c_desc.store([group, pid_k * BLOCK_K, (pid % num_n) * BLOCK_N], acc.to(c_ptr.dtype.element_ty)[None, :, :])
    else:
        c_ptrs = c_ptr + group.to(tl.int64) * stride_ce + rk[:, None] * stride_ck + rn[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])
    if sums_bias:
        tl.store(bias_grad_ptr + group.to(tl.int64) * stride_db_e + rn, bias_acc, mask=n_ok)
