"""FP8 (e4m3) with DeepSeek-V3's fine-grained scales: the format, its scale rule, and the
quantization of weights (in PyTorch) and of activation tiles (in the Triton kernels).

The one home of FP8's numbers: ``E4M3_MAX`` (448, e4m3's largest finite value) and ``BLOCK`` (128)
are read by the PyTorch emulation and by the kernels alike (``quantize_tile``). Weights are
``float8_e4m3fn`` with one fp32 scale per ``block x block`` tile of the last two dimensions (an
expert's ``[K, N]`` matrix); activations are quantized per row in groups of ``block`` along K.
The scale rule: a scale is the tile's (group's) largest magnitude over ``E4M3_MAX``, so the
largest element maps to 448 and nothing saturates; an all-zero tile gets scale 1. Rounding is to
nearest, ties to even.

The FP8 GEMM (``grouped_mm_fp8``, and the experts' GEMMs with FP8 weights) computes
``c[rows of e] = a[rows of e] @ dequantize(w[e])`` the FP8 way:

    for each block-wide step of K:   quantize a's tile per row (in registers, as it is loaded)
                                     acc += (a_q @ w_q) * a_scale[row] * w_scale[column]

so the products run on FP8 tensor cores (``tl.dot`` of two e4m3 tiles), the sums stay fp32, and
every scale is applied once per K step: the error does not grow with K. The activations are
quantized inside the kernel that loads (and gathers) them, with no pass of their own; the second
GEMM quantizes the SwiGLU output the same way as it loads it (the recipe writes it in FP8 from
the first GEMM's epilogue instead: that saves half of ``h``'s bytes, at the price of a second
layout of the kernel; not yet). The kernel is the grouped GEMM's FP8 form
(``grouped_mm_kernels.py``); the PyTorch path emulates the recipe exactly (``grouped_mm.py``:
quantize, dequantize, fp32 products).

The Triton interpreter rounds some fp32 to e4m3 conversions wrongly (one binade off where
rounding carries into the exponent); under it the kernel rounds in fp32 first, so that the
conversion is exact. The GPU's conversion rounds the same way on its own.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .validation import FLOAT_DTYPES, check_tensor, values_checkable

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128
# Block sizes a scale may cover: a power of two, at least a tensor core's K step.
BLOCKS = (16, 32, 64, 128, 256)
# E4M3_MAX for the kernels, which read globals only as compile-time constants.
_E4M3_MAX = tl.constexpr(E4M3_MAX)


# The first GPUs with e4m3 tensor cores: Ada (8.9), then Hopper (9.0) and Blackwell (10.0).
FP8_CAPABILITY = (8, 9)


@functools.cache
def check_fp8_tensor_cores(device: torch.device) -> None:
    """``ValueError`` naming the GPU unless ``device`` has FP8 tensor cores (an A100, 8.0, has
    none: Triton cannot compile e4m3 products for it). The PyTorch path (``backend="torch"``)
    emulates FP8 on any device."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < FP8_CAPABILITY:
        name, (major, minor) = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
        raise ValueError(
            f"FP8 GEMMs need FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, Blackwell); {name} is "
            f"{major}.{minor}: train and sample in bf16 on it, or emulate FP8 with backend='torch'"
        )


def check_block(block: object) -> int:
    """``block`` as an int, or ``ValueError``: a power of two from 16 to 256."""
    if isinstance(block, bool) or not isinstance(block, int) or block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
    return block


def _expand(scale: torch.Tensor, block: int, rows: int, cols: int) -> torch.Tensor:
    """Per-tile scales ``[..., ceil(rows/block), ceil(cols/block)]`` as ``[..., rows, cols]``."""
    return scale.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :rows, :cols]


def _scales(amax: torch.Tensor) -> torch.Tensor:
    """The scale rule: a block's largest magnitude maps to ``E4M3_MAX``; an all-zero block gets 1."""
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def _to_e4m3(values: torch.Tensor) -> torch.Tensor:
    """fp32 values already divided by their scales -> e4m3 (saturating at +-E4M3_MAX)."""
    return values.clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def quantize_fp8(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize ``w [..., K, N]`` (expert weights ``[E, K, N]``, say) to e4m3.

    Returns ``w_fp8`` (``float8_e4m3fn``, the shape of ``w``, laid out K-major: ``w_fp8.mT`` is
    contiguous) and ``scale`` (fp32, ``[..., ceil(K/block), ceil(N/block)]``) with ``w ~= w_fp8 *
    scale`` tile by tile. A non-finite weight raises ``ValueError`` (its tile could have no
    meaningful scale). K-major is the layout Hopper's FP8 tensor cores read a GEMM's second
    operand in: from an N-major one, the kernel transposes every tile through registers
    (synchronous loads instead of asynchronous copies, about 130 more shared-memory stores per K
    step at 128x128, from the sm_90a machine code). Save it with ``.contiguous()`` where a format
    wants contiguous tensors (safetensors); ``copy_`` into a K-major tensor restores the layout.
    """
    check_tensor("w", w, None, FLOAT_DTYPES)
    if w.dim() < 2:
        raise ValueError(f"w must have at least 2 dimensions ([..., K, N]), got shape {tuple(w.shape)}")
    check_finite("w", w)
    return quantize_blocks(w, check_block(block))


def quantize_blocks(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_fp8`` of inputs known to be valid, without the finiteness check's host sync
    (FP8 training quantizes its weights on every step)."""
    K, N = w.shape[-2:]
    # One fp32 copy, divided tile by tile (no full-size copy of the scales), written straight into
    # the K-major e4m3 tensor: FP8 training runs this on every step.
    tiles = F.pad(w.float(), (0, -N % block, 0, -K % block))
    tiles = tiles.unflatten(-1, (-1, block)).unflatten(-3, (-1, block))  # [..., Kb, block, Nb, block]
    scale = _scales(tiles.abs().amax(dim=(-3, -1)))
    scaled = (tiles / scale[..., :, None, :, None]).flatten(-2).flatten(-3, -2)[..., :K, :N]
    w_fp8 = torch.empty((*w.shape[:-2], N, K), dtype=FP8, device=w.device).mT  # K-major (see quantize_fp8)
    return w_fp8.copy_(scaled.clamp_(-E4M3_MAX, E4M3_MAX)), scale


def check_finite(name: str, w: torch.Tensor) -> None:
    """``ValueError`` if ``w`` holds inf or NaN, which no FP8 scale can represent (one host sync;
    none on meta tensors or while compiling, which hold no values to read)."""
    if values_checkable(w) and not torch.isfinite(w).all():
        raise ValueError(f"{name} holds a non-finite value (inf or NaN): an FP8 scale cannot represent it")


def check_inference(*tensors: torch.Tensor | None) -> None:
    """``ValueError`` if autograd would need a gradient through FP8-stored experts."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError(
            "FP8-stored experts (float8_e4m3fn weights) serve inference: run them under torch.no_grad(), or train "
            "in FP8 from high-precision weights (moe_ffn(..., precision='fp8'), MoE(precision='fp8'))"
        )


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
    if values_checkable(scale) and not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise ValueError("scale must hold finite, positive block scales (quantize_fp8 gives no other)")
    K, N = w_fp8.shape[-2:]
    return (w_fp8.float() * _expand(scale, block, K, N)).to(dtype)


def quantize_rows_fp8(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations ``x [M, K]`` quantized per row in groups of ``block`` along K: ``x_fp8 [M, K]``
    and fp32 ``scale [M, ceil(K/block)]``, as the kernel does while loading them."""
    M, K = x.shape
    groups = F.pad(x.float(), (0, -K % block)).unflatten(-1, (-1, block))
    scale = _scales(groups.abs().amax(dim=-1))
    return _to_e4m3((groups / scale[..., None]).flatten(-2)[:, :K]), scale


@triton.jit
def _round_to_e4m3(v):
    """fp32 ``v`` rounded to the nearest e4m3 value (ties to even), still fp32: dropping 20 of
    fp32's 23 mantissa bits for normal values, steps of 2**-9 below 2**-6 (e4m3's subnormals)."""
    bits = v.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    subnormal = ((v * 512.0 + 12582912.0) - 12582912.0) / 512.0  # 1.5 * 2**23 rounds to an integer
    return tl.where(tl.abs(v) < 0.015625, subnormal, normal)


@triton.jit
def quantize_tile(a, EXACT_CAST: tl.constexpr):
    """A ``[BLOCK_M, BLOCK_K]`` fp32 tile -> its e4m3 tile and per-row scales ``[BLOCK_M]``, by the
    scale rule (``quantize_rows_fp8`` in PyTorch). EXACT_CAST (the interpreter) rounds in fp32 first."""
    amax = tl.max(tl.abs(a), axis=1)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, _E4M3_MAX), 1.0)
    q = tl.clamp(tl.math.div_rn(a, scale[:, None]), -_E4M3_MAX, _E4M3_MAX)
    if EXACT_CAST:
        q = _round_to_e4m3(q)
    return q.to(tl.float8e4nv), scale
