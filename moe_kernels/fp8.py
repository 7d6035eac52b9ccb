"""FP8 (e4m3) experts with DeepSeek-V3's fine-grained scales: block-quantized weights, per-token
quantized activations, and the grouped GEMM that multiplies them.

Weights are ``float8_e4m3fn`` with one fp32 scale per ``block x block`` tile of the last two
dimensions (an expert's ``[K, N]`` matrix); activations are quantized per row in groups of
``block`` along K. A scale is the tile's (group's) largest magnitude over 448, e4m3's largest
finite value, so the largest element maps to 448 and nothing saturates; an all-zero tile gets
scale 1. Rounding is to nearest, ties to even.

``grouped_mm_fp8`` computes ``c[rows of e] = a[rows of e] @ dequantize(w[e])`` the FP8 way:

    for each block-wide step of K:   quantize a's tile per row (in registers, as it is loaded)
                                     acc += (a_q @ w_q) * a_scale[row] * w_scale[column]

so the products run on FP8 tensor cores (``tl.dot`` of two e4m3 tiles), the sums stay fp32, and
every scale is applied once per K step: the error does not grow with K. The activations are
quantized inside the kernel that loads (and gathers) them, with no pass of their own; the second
GEMM quantizes the SwiGLU output the same way as it loads it (the recipe writes it in FP8 from
the first GEMM's epilogue instead: that saves half of ``h``'s bytes, at the price of a second
layout of the kernel; not yet). The PyTorch path emulates the recipe exactly: quantize,
dequantize, fp32 products.

The Triton interpreter rounds some fp32 to e4m3 conversions wrongly (one binade off where
rounding carries into the exponent); under it the kernel rounds in fp32 first, so that the
conversion is exact. The GPU's conversion rounds the same way on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .activations import act
from .backend import INTERPRET, resolve_backend
from .grouped_mm import _add_bias, _row_tile, _rows, grouped_mm_torch
from .tuning import FP8_CONFIGS
from .validation import FLOAT_DTYPES, INDEX_DTYPES, check_dim, check_offsets, check_same_device, check_tensor

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128
# Block sizes a scale may cover: a power of two, at least a tensor core's K step.
BLOCKS = (16, 32, 64, 128, 256)


def check_block(block: object) -> int:
    """``block`` as an int, or ``ValueError``: a power of two from 16 to 256."""
    if isinstance(block, bool) or not isinstance(block, int) or block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
    return block


def _expand(scale: torch.Tensor, block: int, rows: int, cols: int) -> torch.Tensor:
    """Per-tile scales ``[..., ceil(rows/block), ceil(cols/block)]`` as ``[..., rows, cols]``."""
    return scale.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :rows, :cols]


def _scales(amax: torch.Tensor) -> torch.Tensor:
    """A block's scale from its largest magnitude: that value maps to 448; an all-zero block gets 1."""
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def _to_e4m3(values: torch.Tensor) -> torch.Tensor:
    """fp32 values already divided by their scales -> e4m3 (saturating at +-448)."""
    return values.clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def quantize_fp8(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize ``w [..., K, N]`` (expert weights ``[E, K, N]``, say) to e4m3.

    Returns ``w_fp8`` (``float8_e4m3fn``, the shape of ``w``) and ``scale`` (fp32,
    ``[..., ceil(K/block), ceil(N/block)]``) with ``w ~= w_fp8 * scale`` tile by tile. A
    non-finite weight raises ``ValueError`` (its tile could have no meaningful scale).
    """
    check_tensor("w", w, None, FLOAT_DTYPES)
    if w.dim() < 2:
        raise ValueError(f"w must have at least 2 dimensions ([..., K, N]), got shape {tuple(w.shape)}")
    block = check_block(block)
    if not torch.isfinite(w).all():
        raise ValueError("w holds a non-finite value (inf or NaN): an FP8 scale cannot represent it")
    K, N = w.shape[-2:]
    tiles = F.pad(w.float().abs(), (0, -N % block, 0, -K % block))
    tiles = tiles.unflatten(-1, (-1, block)).unflatten(-3, (-1, block))  # [..., Kb, block, Nb, block]
    scale = _scales(tiles.amax(dim=(-3, -1)))
    return _to_e4m3(w.float() / _expand(scale, block, K, N)), scale


def check_quantized(name: str, w_fp8: torch.Tensor, scale: torch.Tensor, block: int) -> None:
    """``TypeError``/``ValueError`` unless ``w_fp8`` is e4m3 and ``scale`` its fp32 block scales."""
    check_tensor(name, w_fp8, None, (FP8,))
    check_tensor(f"{name} scale", scale, None, (torch.float32,))
    K, N = w_fp8.shape[-2:]
    expected = (*w_fp8.shape[:-2], -(-K // block), -(-N // block))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"{name} scale must have shape {expected} (blocks of {block} over {tuple(w_fp8.shape)}), "
            f"got {tuple(scale.shape)}"
        )


def fp8_operand(name: str, w: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 GEMM's weight and its scales: ``w`` as given if it is e4m3 (``scale`` required),
    else quantized here (``scale`` must then be ``None``)."""
    check_tensor(name, w, None, (*FLOAT_DTYPES, FP8))
    if w.dtype == FP8:
        if scale is None:
            raise ValueError(f"{name} is FP8: pass {name}_scale, its block scales from quantize_fp8")
        return w, scale
    if scale is not None:
        raise ValueError(f"{name}_scale goes with an FP8 {name}; this {name} is {w.dtype} (it is quantized here)")
    return quantize_fp8(w)


def dequantize_fp8(
    w_fp8: torch.Tensor, scale: torch.Tensor, block: int = BLOCK, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``w_fp8 * scale``, tile by tile: the inverse of ``quantize_fp8`` up to e4m3's rounding."""
    block = check_block(block)
    check_quantized("w_fp8", w_fp8, scale, block)
    K, N = w_fp8.shape[-2:]
    return (w_fp8.float() * _expand(scale, block, K, N)).to(dtype)


def quantize_rows_fp8(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations ``x [M, K]`` quantized per row in groups of ``block`` along K: ``x_fp8 [M, K]``
    and fp32 ``scale [M, ceil(K/block)]``, as the kernel does while loading them."""
    M, K = x.shape
    groups = F.pad(x.float(), (0, -K % block)).unflatten(-1, (-1, block))
    scale = _scales(groups.abs().amax(dim=-1))
    return _to_e4m3(x.float() / scale.repeat_interleave(block, -1)[:, :K]), scale


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


@triton.autotune(configs=FP8_CONFIGS, key=["M_BUCKET", "N", "K", "EPILOGUE", "GLU", "GATHER_A", "SCATTER_C"])
@triton.jit
def _grouped_mm_fp8_kernel(
    a_ptr,
    b_ptr,
    b_scale_ptr,
    c_ptr,
    offsets_ptr,
    a_rows_ptr,
    c_rows_ptr,
    bias_ptr,
    M_BUCKET,
    N,
    K,
    E,
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_se,
    stride_sk,
    stride_sn,
    stride_cm,
    stride_cn,
    stride_bias_e,
    stride_bias_n,
    EPILOGUE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GLU: tl.constexpr,
    GATHER_A: tl.constexpr,
    SCATTER_C: tl.constexpr,
    BIAS: tl.constexpr,
    EXACT_CAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """``c[rows] = epilogue(a[rows] @ dequantize(b[group]) + bias[group])`` for one tile, the
    K step one scale block (``BLOCK_K`` = 128 in every config); EPILOGUE "none" or "act" (GLU:
    b's columns N:2N are the up projection), as ``_grouped_mm_kernel``'s."""
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

    if BIAS:
        acc, acc_up = _add_bias(
            acc, acc_up, bias_ptr, group, rn, col_ok, N, stride_bias_e, stride_bias_n, GLU and EPILOGUE == "act"
        )
    c_rows = _rows(c_rows_ptr, rm, row_ok, SCATTER_C)
    if EPILOGUE == "act":
        acc = act(acc, ACTIVATION)
        if GLU:
            acc = acc * acc_up
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(c_ptr + c_rows[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=mask)


def grouped_mm_fp8_triton(
    a: torch.Tensor,
    w_fp8: torch.Tensor,
    scale: torch.Tensor,
    offsets: torch.Tensor,
    *,
    activation: str | None = None,
    a_rows: torch.Tensor | None = None,
    c_rows: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``grouped_mm_fp8`` on the Triton kernel (inputs valid, scales over blocks of 128), with
    the MoE options: an activation epilogue (``"swiglu"``: ``w``'s last dimension is ``2H``), a
    gather of a's rows, a scatter of c's rows and a bias per group."""
    glu = activation == "swiglu"
    N = w_fp8.shape[2] // 2 if glu else w_fp8.shape[2]
    num_rows = a.shape[0] if a_rows is None else a_rows.shape[0]
    c = a.new_empty((num_rows, N))
    E, K = w_fp8.shape[0], w_fp8.shape[1]
    if num_rows == 0 or N == 0:
        return c
    unused = offsets

    def grid(meta):
        return ((triton.cdiv(num_rows, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"]),)

    _grouped_mm_fp8_kernel[grid](
        a, w_fp8, scale, c, offsets,
        unused if a_rows is None else a_rows, unused if c_rows is None else c_rows, unused if bias is None else bias,
        triton.next_power_of_2(num_rows), N, K, E,
        a.stride(0), a.stride(1), *w_fp8.stride(), *scale.stride(), c.stride(0), c.stride(1),
        *((0, 0) if bias is None else bias.stride()),
        EPILOGUE="none" if activation is None else "act",
        ACTIVATION="silu" if glu else (activation or "silu"),
        GLU=glu, GATHER_A=a_rows is not None, SCATTER_C=c_rows is not None, BIAS=bias is not None,
        EXACT_CAST=INTERPRET, BLOCK_E=triton.next_power_of_2(E),
    )  # fmt: skip
    return c


def grouped_mm_fp8_torch(
    a: torch.Tensor,
    w_fp8: torch.Tensor,
    scale: torch.Tensor,
    offsets: torch.Tensor,
    block: int = BLOCK,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The recipe emulated: ``a``'s rows quantized per group of ``block``, both operands
    dequantized, fp32 products; ``[M, N]`` in ``out_dtype`` (default ``a.dtype``)."""
    a_fp8, a_scale = quantize_rows_fp8(a, block)
    rows = a_fp8.float() * a_scale.repeat_interleave(block, -1)[:, : a.shape[1]]
    return grouped_mm_torch(rows, dequantize_fp8(w_fp8, scale, block), offsets).to(out_dtype or a.dtype)


def grouped_mm_fp8(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    scale: torch.Tensor,
    offsets: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] @ dequantize_fp8(w_fp8[e], scale[e])``, the rows of ``x``
    quantized per token in groups of 128 along K, products in FP8, sums in fp32 (inference:
    not differentiable).

    Args:
        x: ``[M, K]`` (fp16, bf16 or fp32); w_fp8, scale: ``quantize_fp8(w)`` of ``w [E, K, N]``
            (blocks of 128); offsets: ``[E]`` int32 cumulative row ends.
    Returns:
        ``y [M, N]`` in ``x.dtype``.
    """
    check_tensor("x", x, 2, FLOAT_DTYPES)
    check_tensor("w_fp8", w_fp8, 3, (FP8,))
    check_quantized("w_fp8", w_fp8, scale, BLOCK)
    check_tensor("offsets", offsets, 1, INDEX_DTYPES)
    check_dim("w_fp8", w_fp8, 1, x.shape[1], "K, the width of x")
    check_dim("offsets", offsets, 0, w_fp8.shape[0], "E, the groups of w_fp8")
    if w_fp8.shape[0] == 0:
        raise ValueError(f"w_fp8 must hold at least one group, got shape {tuple(w_fp8.shape)}")
    device = check_same_device(x=x, w_fp8=w_fp8, scale=scale, offsets=offsets)
    check_offsets(offsets, x.shape[0])
    offsets = offsets.to(torch.int32)
    if torch.is_grad_enabled() and x.requires_grad:
        raise ValueError("grouped_mm_fp8 serves inference: it has no backward (x requires grad)")
    if resolve_backend(backend, device) == "triton":
        return grouped_mm_fp8_triton(x, w_fp8, scale, offsets)
    return grouped_mm_fp8_torch(x, w_fp8, scale, offsets)
