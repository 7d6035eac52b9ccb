"""Grouped GEMM over variable-size groups of rows, ``y[rows of e] = x[rows of e] @ w[e]``: the
host side of every matrix product of the MoE layer, forward and backward, and the public
``grouped_mm`` and ``grouped_mm_fp8``.

The Triton kernels are in ``grouped_mm_kernels.py``; the launchers here choose their options:
``grouped_mm_triton`` (a row gather in the A load, a row scatter in the store, a bias, FP8
weights), ``grouped_mm_act`` (the activation fused in the epilogue, its input stored for the
backward), ``grouped_mm_act_grad`` (the activation's gradient in the epilogue) and
``grouped_mm_wgrad`` (a weight gradient, and a bias gradient from the same loads). The PyTorch
path is ``torch._grouped_mm`` with the padding its alignment rules ask for, and the FP8 recipe's
emulation (``grouped_mm_fp8_torch``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import triton

from . import tuning
from .activations import Glu, split_activation
from .backend import INTERPRET, resolve_backend
from .fp8 import BLOCK, FP8, check_fp8_tensor_cores, check_quantized, dequantize_fp8, quantize_rows_fp8
from .grouped_mm_kernels import grouped_mm_fp8_kernel, grouped_mm_kernel, grouped_wgrad_kernel
from .library import custom_op, differentiable
from .tuning import NARROWEST_BLOCK_N, has_tma, has_tma_gather, persistent_programs, tma_ready
from .validation import FLOAT_DTYPES, INDEX_DTYPES, check_dim, check_offsets, check_same_device, check_tensor


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul setting, so both backends round alike.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _annotated(kernel: str, flops: int, **sizes: int) -> contextlib.AbstractContextManager:
    """A profiler range around one launch, named with its sizes and FLOPs, so that a trace says
    which GEMM of the layer each kernel time belongs to and at what rate (``benchmarks/gpu_check.py``'s
    ``profile`` part reads them); nothing at all when no profiler is running."""
    if not torch.autograd._profiler_enabled():
        return contextlib.nullcontext()
    named = " ".join(f"{key}={value}" for key, value in sizes.items())
    return torch.profiler.record_function(f"moe_kernels.{kernel} {named} flops={flops}")


def _descriptor_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _allow_descriptors() -> None:
    """Give Triton the allocator its on-device TMA descriptors need (the persistent design builds
    them in global scratch memory), unless the caller set one. Triton keeps it per thread, and
    the backward runs on autograd's threads: set it before each launch."""
    if isinstance(triton.runtime._allocation._allocator.get(), triton.runtime._allocation.NullAllocator):
        triton.set_allocator(_descriptor_scratch)


def _rows_tma_ready(t: torch.Tensor) -> bool:
    """Whether a TMA descriptor over the rows of the 2-D ``t`` can read it, on its device."""
    return t.stride(1) == 1 and tma_ready(t) and has_tma(t.device)


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
    scale_grad=None,
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
        unused if bias is None else bias, c if scale_grad is None else scale_grad,
    )  # fmt: skip
    sizes = (triton.next_power_of_2(num_rows), num_cols, K, E)
    strides = (
        a.stride(0), a.stride(1), *b.stride(), c.stride(0), c.stride(1), preact.stride(0), preact.stride(1),
        *((0, 0) if bias is None else bias.stride()), 0 if scale_grad is None else scale_grad.stride(0),
    )  # fmt: skip
    options = dict(
        EPILOGUE=epilogue, ACTIVATION=activation, GLU=gate is not None, STORE_PREACT=store_preact,
        CLAMP=gate is not None and gate.limit is not None, LIMIT=float((gate and gate.limit) or 0.0),
        ALPHA=float(gate.alpha if gate else 1.0), UP_OFFSET=float(gate.up_offset if gate else 0.0),
        GATE_CAP=float((gate and gate.gate_softcap) or 0.0), UP_CAP=float((gate and gate.up_softcap) or 0.0),
        GATHER_A=a_rows is not None,
        SCATTER_C=c_rows is not None, SCALE=scale is not None, BIAS=bias is not None,
        SCALE_GRAD=scale_grad is not None,
        BLOCK_E=triton.next_power_of_2(E),
    )  # fmt: skip

    def grid(meta):
        tiles = (triton.cdiv(num_rows, meta["BLOCK_M"]) + E) * triton.cdiv(num_cols, meta["BLOCK_N"])
        return (min(tiles, persistent_programs(a.device)) if meta.get("TMA") else tiles,)

    if b_scale is not None:
        check_fp8_tensor_cores(a.device)
    products = 2 if gate is not None and epilogue == "act" else 1  # a GLU's gate and up projections
    kernel = f"grouped_mm{'_fp8' if b_scale is not None else ''}[{epilogue}]"
    # Which operands the TMA design may read by TMA (gathered rows by TMA gathers, on Blackwell). A
    # TMA box starts 16-byte aligned along the contiguous dim: a GLU's up half, at column N, too.
    up_aligned = products == 1 or num_cols * b.element_size() % 16 == 0
    # It stores c (and the pre-activation) by TMA where their rows are not scattered and TMA can
    # write them (tuning.TMA_STORE): a GLU's up half, at column N, 16-byte aligned too. Not the
    # activation's gradient: its epilogue holds three fp32 tiles at 255 registers, and the TMA
    # store's staging made the K loop spill (1-2 instructions per step at five configs, sm_90a).
    stored = [c, preact] if store_preact else [c]
    halves_aligned = gate is None or all(num_cols * t.element_size() % 16 == 0 for t in stored)
    c_tma = epilogue != "act_grad" and c_rows is None and halves_aligned and all(_rows_tma_ready(t) for t in stored)
    options |= dict(
        A_TMA=_rows_tma_ready(a) and (a_rows is None or (tuning.TMA_GATHER and has_tma_gather(a.device))),
        B_TMA=tma_ready(b) and has_tma(b.device) and up_aligned, B_TRANSPOSED=b.stride(2) != 1,
        C_TMA=tuning.TMA_STORE and c_tma,
    )  # fmt: skip
    _allow_descriptors()
    with _annotated(kernel, 2 * num_rows * num_cols * K * products, rows=num_rows, N=num_cols * products, K=K):
        if b_scale is None:
            grouped_mm_kernel[grid](*pointers, *sizes, *strides, a.shape[0], **options, PRECISION=_precision(a.dtype))
        else:
            grouped_mm_fp8_kernel[grid](
                *pointers, b_scale, *sizes, *strides, *b_scale.stride(), a.shape[0], **options, EXACT_CAST=INTERPRET
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
    scale_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradient of the pre-activation from ``dh = scale * grad[a_rows] @ b[group]``, and with
    ``scale_grad`` the gradient of each row's scale, ``<grad[a_rows] @ b[group], act(preact)>``,
    from the same tiles.

    Args:
        grad: ``[*, K]``; b: ``[E, K, H]`` (the transposed second-GEMM weights);
        preact: ``[M, 2H]`` for swiglu, else ``[M, H]``; scale: flat per-slot factors indexed by ``scale_rows``.
        b_scale: block scales of an e4m3 ``b`` (see ``grouped_mm_triton``).
    Returns:
        ``[M, 2H]`` (swiglu) or ``[M, H]``, in ``preact.dtype``; the scales' gradient ``[M]`` in
        fp32 (``None`` without ``scale_grad``).
    """
    name, gate = split_activation(activation)
    num_rows = preact.shape[0]
    out = torch.empty_like(preact)
    # One plane per column tile; the autotuner picks the tile, so there are room and zeros for the narrowest.
    planes = (
        torch.zeros(triton.cdiv(b.shape[2], NARROWEST_BLOCK_N), num_rows, device=grad.device, dtype=torch.float32)
        if scale_grad
        else None
    )
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
        scale_grad=planes,
    )
    return out, None if planes is None else planes.sum(0)


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
    _allow_descriptors()
    with _annotated("grouped_wgrad", 2 * rows * K * N, rows=rows, N=N, K=K):
        grouped_wgrad_kernel[grid](
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
            a.shape[0],
            b.shape[0],
            GATHER_A=a_rows is not None,
            GATHER_B=b_rows is not None,
            SCALE=scale is not None,
            BIAS_GRAD=bias_grad,
            PRECISION=_precision(a.dtype),
            A_TMA=K > 0 and a_rows is None and _rows_tma_ready(a),
            B_TMA=b_rows is None and _rows_tma_ready(b),
            C_TMA=tuning.TMA_STORE and K > 0 and c.stride(2) == 1 and tma_ready(c) and has_tma(c.device),
        )
    return c, None if summed is None else summed.to(out_dtype)


def _pad_last(t: torch.Tensor, multiple: int) -> torch.Tensor:
    return F.pad(t, (0, -t.shape[-1] % multiple))


def grouped_mm_torch(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm(a [M, K], b [E, K, N])``, padding K and N where its alignment rules demand."""
    if a.shape[1] == 0 or b.shape[2] == 0:  # an empty product, which torch._grouped_mm rejects
        return a.new_zeros((a.shape[0], b.shape[2]))
    if not (tma_ready(a) and tma_ready(b)):
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
    if not (tma_ready(a.t()) and tma_ready(b)):
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
    return grouped_mm_fp8_op(x, w_fp8, scale, offsets, resolve_backend(backend, device))


@custom_op("moe_kernels::grouped_mm_fp8")
def grouped_mm_fp8_op(
    x: torch.Tensor, w_fp8: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor, backend: str
) -> torch.Tensor:
    """``x [M, K], w_fp8 [E, K, N] e4m3, scale [E, K/128, N/128], offsets [E] int32 -> y [M, N]``."""
    if backend == "triton":
        return grouped_mm_triton(x, w_fp8, offsets, b_scale=scale)
    return grouped_mm_fp8_torch(x, w_fp8, scale, offsets)


@grouped_mm_fp8_op.register_fake
def _(x, w_fp8, scale, offsets, backend):
    return x.new_empty((x.shape[0], w_fp8.shape[2]))
