"""The experts op: any dispatch through the two grouped GEMMs and the weighted combine.

One op serves every router: it takes a ``Dispatch`` (``dispatch.py``: each slot's weight, the
slots in expert-major row order, the experts' row ends, and where each token's slots begin).
Triton path, forward (``S`` slots, ``rows`` = the slots in expert-major order):

    first GEMM   x[token_of_row] @ w_in  -> h [S, H]     gather in the A load, activation fused
    second GEMM  h @ w_out               -> out [S, D]   expert-major rows, stored contiguously
    combine      each token gathers and sums its weighted rows -> y [T, D]   deterministic reduce

(``tuning.GATHER_COMBINE`` off, or with the per-slot outputs kept for the backward, the second
GEMM scatters its rows to slot order and the combine reads them there.)

Backward: the pre-activation gradient from one GEMM over the gathered, weight-scaled ``dy`` with
the activation's derivative in its epilogue, which also gives ``d weights`` (each row's unscaled
``dy @ w_out^T`` against h recomputed from the pre-activation, so the forward keeps no ``out``;
or, where ``weights_grad_from_epilogue`` says no, ``<dy, out>`` from the saved ``out``); both
weight gradients as varlen-K grouped GEMMs; ``dx`` from a GEMM whose rows each token gathers and sums.
The PyTorch path takes the same steps with ``torch._grouped_mm`` and indexing.

FP8: with ``w_in_scale``/``w_out_scale`` the weights are stored in FP8 (``quantize_fp8``) and the
op serves inference; with ``quantize`` the high-precision weights are quantized on each call and
the GEMMs of the forward and of the input gradient run in FP8, the weight gradients in the dtype
of x (FP8 training).

Forward and backward are the custom ops ``moe_kernels::experts`` and
``moe_kernels::experts_backward``, so ``torch.compile`` and ``torch.export`` see two opaque ops
with fake (shape-only) implementations; ``experts_apply`` ties them together for autograd and
``torch.func``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import tuning
from .activations import activation_fn, activation_grad, parse_activation
from .combine import combine, combine_torch, combine_weight_grad, combine_weight_grad_torch, weighted_rows
from .dispatch import Dispatch, row_of_slot
from .fp8 import FP8, quantize_blocks
from .grouped_mm import (
    group_of_row,
    group_sums_torch,
    grouped_mm_act,
    grouped_mm_act_grad,
    grouped_mm_fp8_torch,
    grouped_mm_torch,
    grouped_mm_triton,
    grouped_mm_wgrad,
    grouped_mm_wgrad_torch,
)
from .library import custom_op, differentiable, gradients
from .validation import FLOAT_DTYPES, check_dim, check_tensor

Tensor = torch.Tensor


def _forward_triton(x, d: Dispatch, w_in, w_out, b_in, b_out, activation, save_preact, scales, slot_order):
    """The two GEMMs; ``out`` in slot order with ``slot_order``, else expert-major."""
    w_in_scale, w_out_scale = (None, None) if scales is None else scales
    h, preact = grouped_mm_act(
        x, w_in, d.offsets, activation, a_rows=d.token_of_row, save_preact=save_preact, bias=b_in, b_scale=w_in_scale
    )
    c_rows = d.slot_of_row if slot_order else None
    out = grouped_mm_triton(h, w_out, d.offsets, c_rows=c_rows, bias=b_out, b_scale=w_out_scale)
    return out, preact, h


def _matmul_torch(a: Tensor, w: Tensor, offsets: Tensor, scale: Tensor | None) -> Tensor:
    """``grouped_mm_torch``, or with ``scale`` (an e4m3 ``w``'s) the FP8 emulation, kept in fp32
    up to the epilogue (activation, bias, routing weight) as the FP8 kernel keeps it."""
    if scale is None:
        return grouped_mm_torch(a, w, offsets)
    return grouped_mm_fp8_torch(a, w, scale, offsets, out_dtype=torch.float32)


def _forward_torch(x, d: Dispatch, w_in, w_out, b_in, b_out, activation, save_preact, scales, slot_order):
    w_in_scale, w_out_scale = (None, None) if scales is None else scales
    groups = group_of_row(d.offsets, d.slot_of_row.shape[0]) if b_in is not None or b_out is not None else None
    preact = _matmul_torch(x.index_select(0, d.token_of_row), w_in, d.offsets, w_in_scale)
    if b_in is not None:
        preact = preact + b_in.index_select(0, groups)
    h = activation_fn(activation)(preact).to(x.dtype)
    out = _matmul_torch(h, w_out, d.offsets, w_out_scale)
    if b_out is not None:
        out = out + b_out.index_select(0, groups)
    out = out.to(x.dtype)
    # Back to slot order with a gather (deterministic, unlike a scatter-add).
    return out.index_select(0, row_of_slot(d.slot_of_row)) if slot_order else out, preact.to(x.dtype), h


def _quantized(w_in: Tensor, w_out: Tensor, quantize: bool, scales) -> tuple[Tensor, Tensor, tuple | None]:
    """``w_in, w_out`` and their FP8 scales: as given, or with ``quantize`` quantized here (without
    ``quantize_fp8``'s checks: no host sync in a training step; a non-finite weight gives a
    non-finite loss)."""
    if not quantize:
        return w_in, w_out, scales
    (w_in, w_in_scale), (w_out, w_out_scale) = quantize_blocks(w_in), quantize_blocks(w_out)
    return w_in, w_out, (w_in_scale, w_out_scale)


@custom_op("moe_kernels::experts")
def experts_op(
    x: Tensor,
    weights: Tensor,
    slot_of_row: Tensor,
    token_of_row: Tensor,
    offsets: Tensor,
    starts: Tensor | None,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    w_in_scale: Tensor | None,
    w_out_scale: Tensor | None,
    activation: str,
    backend: str,
    save_preact: bool,
    save_h: bool,
    save_out: bool,
    quantize: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``y [T, D]`` and what the backward reads where asked for (else empty along dimension 0):
    the pre-activation ``[S, 2H or H]``, ``h [S, H]`` and the per-slot outputs ``out [S, D]``.
    The dispatch comes as its tensors (``weights`` to ``starts``, see ``Dispatch``)."""
    d = Dispatch(weights, slot_of_row, token_of_row, offsets, starts)
    scales = None if w_in_scale is None else (w_in_scale, w_out_scale)
    w_in, w_out, scales = _quantized(w_in, w_out, quantize, scales)
    forward, reduce = (_forward_triton, combine) if backend == "triton" else (_forward_torch, combine_torch)
    # Per-slot outputs kept for the weights' gradient are in slot order (combine_weight_grad reads them so).
    slot_order = save_out or not tuning.GATHER_COMBINE
    out, preact, h = forward(x, d, w_in, w_out, b_in, b_out, activation, save_preact, scales, slot_order)
    rows = None if slot_order else row_of_slot(d.slot_of_row)
    y = reduce(out, weights.contiguous(), d.slots(x.shape[0]), x.shape[0], x.dtype, rows)
    empty = x.new_empty
    return (
        y,
        preact if save_preact else empty((0, w_in.shape[2])),
        h if save_h else empty((0, w_out.shape[1])),
        out if save_out else empty((0, x.shape[1])),
    )


@experts_op.register_fake
def _(x, weights, slot_of_row, token_of_row, offsets, starts, w_in, w_out, b_in, b_out, w_in_scale, w_out_scale,
      activation, backend, save_preact, save_h, save_out, quantize):  # fmt: skip
    (T, D), S = x.shape, weights.shape[0]
    return (
        x.new_empty((T, D)),
        x.new_empty((S if save_preact else 0, w_in.shape[2])),
        x.new_empty((S if save_h else 0, w_out.shape[1])),
        x.new_empty((S if save_out else 0, D)),
    )


def _transposed(w: Tensor, quantize: bool) -> tuple[Tensor, Tensor | None]:
    """An input-gradient GEMM's operand: ``w^T`` and, with ``quantize``, its block scales, quantized
    as the forward quantized ``w`` (the same blocks, transposed), K-major for this GEMM."""
    if not quantize:
        return w.transpose(1, 2), None
    return quantize_blocks(w.transpose(1, 2))


def _backward_triton(grad_y, x, d: Dispatch, w_in, w_out, preact, h, out, slots, activation, needs, quantize):
    needs_x, needs_weights, needs_w_in, needs_w_out, needs_b_in, needs_b_out = needs
    T = x.shape[0]
    # Per-slot factors, indexed by slot_of_row inside the kernels.
    scale = d.weights.float().contiguous()
    grad_x = grad_weights = grad_w_in = grad_w_out = grad_b_in = grad_b_out = None
    # Without the saved per-slot outputs, the weights' gradient comes from the dh GEMM's epilogue.
    weights_in_epilogue = needs_weights and out.shape[0] != d.weights.shape[0]
    if needs_weights and not weights_in_epilogue:
        grad_weights = combine_weight_grad(grad_y, out, slots).to(d.weights.dtype)
    needs_dh = needs_x or needs_w_in or needs_b_in or weights_in_epilogue
    # The rows of dL/dy each expert-major row reads, and their routing weights.
    dy_rows, dy_scale, dy_scale_rows = d.token_of_row, scale, d.slot_of_row
    prescaled = tuning.PRESCALED_BACKWARD and not weights_in_epilogue
    if prescaled and (needs_w_out or needs_b_out or needs_dh):
        grad_y = weighted_rows(grad_y, d.token_of_row, scale, d.slot_of_row)
        dy_rows = dy_scale = dy_scale_rows = None
    if needs_w_out or needs_b_out:
        # A bias alone needs no weight gradient: zero columns of h leave only the bias sums.
        rows = h if needs_w_out else h.new_empty((d.slot_of_row.shape[0], 0))
        grad_w_out, grad_b_out = grouped_mm_wgrad(
            rows, grad_y, d.offsets, w_out.dtype, b_rows=dy_rows, scale=dy_scale, scale_rows=dy_scale_rows,
            bias_grad=needs_b_out,
        )  # fmt: skip
        grad_w_out = grad_w_out if needs_w_out else None
    if needs_dh:
        w_out_t, w_out_t_scale = _transposed(w_out, quantize)
        grad_preact, grad_row_weights = grouped_mm_act_grad(
            grad_y, w_out_t, d.offsets, preact, activation, a_rows=dy_rows, scale=dy_scale, scale_rows=dy_scale_rows,
            b_scale=w_out_t_scale, scale_grad=weights_in_epilogue,
        )  # fmt: skip
        # One slot per token: slot order is token order, so dx's rows scattered to it are dx itself.
        one_slot = isinstance(slots, int) and slots == 1
        gather = needs_x and tuning.GATHER_COMBINE and not one_slot
        # Where each slot's row is, for what comes out of the GEMMs in expert-major rows.
        slot_rows = row_of_slot(d.slot_of_row) if weights_in_epilogue or gather else None
        if weights_in_epilogue:
            grad_weights = grad_row_weights.index_select(0, slot_rows).to(d.weights.dtype)
        if needs_x:
            w_in_t, w_in_t_scale = _transposed(w_in, quantize)
            c_rows = None if gather else d.slot_of_row
            grad_rows = grouped_mm_triton(grad_preact, w_in_t, d.offsets, c_rows=c_rows, b_scale=w_in_t_scale)
            grad_x = (
                grad_rows if one_slot else combine(grad_rows, None, slots, T, x.dtype, slot_rows if gather else None)
            )
        if needs_w_in or needs_b_in:
            grad_w_in, grad_b_in = grouped_mm_wgrad(
                x if needs_w_in else x.new_empty((T, 0)), grad_preact, d.offsets, w_in.dtype,
                a_rows=d.token_of_row, bias_grad=needs_b_in,
            )  # fmt: skip
            grad_w_in = grad_w_in if needs_w_in else None
    return grad_x, grad_weights, grad_w_in, grad_w_out, grad_b_in, grad_b_out


def _backward_torch(grad_y, x, d: Dispatch, w_in, w_out, preact, h, out, slots, activation, needs, quantize):
    needs_x, needs_weights, needs_w_in, needs_w_out, needs_b_in, needs_b_out = needs
    T = x.shape[0]
    grad_x = grad_weights = grad_w_in = grad_w_out = grad_b_in = grad_b_out = None
    if needs_weights:
        grad_weights = combine_weight_grad_torch(grad_y, out, slots).to(d.weights.dtype)
    # d(expert output) of each row: the token's gradient times its routing weight.
    row_weights = d.weights.float().index_select(0, d.slot_of_row)
    grad_y_rows = grad_y.index_select(0, d.token_of_row)
    grad_rows = (grad_y_rows.float() * row_weights[:, None]).to(x.dtype)
    if needs_w_out:
        grad_w_out = grouped_mm_wgrad_torch(h, grad_rows, d.offsets)
    if needs_b_out:
        grad_b_out = group_sums_torch(grad_rows, d.offsets)
    if needs_x or needs_w_in or needs_b_in:
        w_out_t, w_out_t_scale = _transposed(w_out, quantize)
        if quantize:  # as the kernel: the gathered gradient quantized, the routing weight in the epilogue
            grad_h = _matmul_torch(grad_y_rows, w_out_t, d.offsets, w_out_t_scale) * row_weights[:, None]
            grad_preact = activation_grad(activation, preact.float(), grad_h).to(x.dtype)
        else:
            grad_preact = activation_grad(activation, preact, grouped_mm_torch(grad_rows, w_out_t, d.offsets))
        if needs_b_in:
            grad_b_in = group_sums_torch(grad_preact, d.offsets)
        if needs_x:
            w_in_t, w_in_t_scale = _transposed(w_in, quantize)
            grad_x_rows = _matmul_torch(grad_preact, w_in_t, d.offsets, w_in_t_scale).to(x.dtype)
            grad_x = combine_torch(grad_x_rows, None, slots, T, x.dtype, row_of_slot(d.slot_of_row))
        if needs_w_in:
            grad_w_in = grouped_mm_wgrad_torch(x.index_select(0, d.token_of_row), grad_preact, d.offsets)
    return grad_x, grad_weights, grad_w_in, grad_w_out, grad_b_in, grad_b_out


@custom_op("moe_kernels::experts_backward")
def experts_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weights: Tensor,
    slot_of_row: Tensor,
    token_of_row: Tensor,
    offsets: Tensor,
    starts: Tensor | None,
    w_in: Tensor,
    w_out: Tensor,
    preact: Tensor,
    h: Tensor,
    out: Tensor,
    activation: str,
    backend: str,
    needs_x: bool,
    needs_weights: bool,
    needs_w_in: bool,
    needs_w_out: bool,
    needs_b_in: bool,
    needs_b_out: bool,
    quantize: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of ``x``, ``weights``, ``w_in``, ``w_out``, ``b_in`` and ``b_out`` that
    ``needs_*`` ask for (the others empty), from what ``moe_kernels::experts`` saved. The biases'
    gradients do not read the biases, only their shapes: ``[E, w_in.shape[2]]`` and ``[E, D]``.
    With ``quantize`` (as the forward ran) the input-gradient GEMMs run in FP8 on the experts
    quantized again; the weights' gradients stay in the dtype of x, from the saved inputs."""
    d = Dispatch(weights, slot_of_row, token_of_row, offsets, starts)
    backward = _backward_triton if backend == "triton" else _backward_torch
    needs = (needs_x, needs_weights, needs_w_in, needs_w_out, needs_b_in, needs_b_out)
    slots = d.slots(x.shape[0])
    grads = backward(grad_y, x, d, w_in, w_out, preact, h, out, slots, activation, needs, quantize)
    return tuple(x.new_empty(0) if grad is None else grad for grad in grads)


@experts_backward_op.register_fake
def _(grad_y, x, weights, slot_of_row, token_of_row, offsets, starts, w_in, w_out, preact, h, out, activation,
      backend, needs_x, needs_weights, needs_w_in, needs_w_out, needs_b_in, needs_b_out, quantize):  # fmt: skip
    E = w_in.shape[0]
    shapes = (x.shape, weights.shape, w_in.shape, w_out.shape, (E, w_in.shape[2]), (E, x.shape[1]))
    dtypes = (x.dtype, weights.dtype, w_in.dtype, w_out.dtype, w_in.dtype, x.dtype)
    needs = (needs_x, needs_weights, needs_w_in, needs_w_out, needs_b_in, needs_b_out)
    return tuple(
        x.new_empty(shape, dtype=dtype) if need else x.new_empty(0) for shape, dtype, need in zip(shapes, dtypes, needs)
    )


class ExpertsInputs(NamedTuple):
    """The arguments of ``moe_kernels::experts``, in its schema's order."""

    x: Tensor
    weights: Tensor
    slot_of_row: Tensor
    token_of_row: Tensor
    offsets: Tensor
    starts: Tensor | None
    w_in: Tensor
    w_out: Tensor
    b_in: Tensor | None
    b_out: Tensor | None
    w_in_scale: Tensor | None
    w_out_scale: Tensor | None
    activation: str
    backend: str
    save_preact: bool
    save_h: bool
    save_out: bool
    quantize: bool


# The inputs with gradients, in the order experts_backward takes and returns them.
DIFFERENTIABLE = ("x", "weights", "w_in", "w_out", "b_in", "b_out")


def _check_saved(weights: Tensor, preact: Tensor, h: Tensor, out: Tensor, needs: tuple, in_epilogue: bool) -> None:
    """A caller of ``torch.ops.moe_kernels.experts`` chooses what it saves: refuse a gradient
    whose inputs it did not keep, rather than read past an empty tensor. ``in_epilogue``: the
    weights' gradient may come from the pre-activation instead of the outputs."""
    needs_x, needs_weights, needs_w_in, needs_w_out, needs_b_in, _ = needs
    rows = weights.shape[0]
    weights_saved = out.shape[0] == rows or (in_epilogue and preact.shape[0] == rows)
    for needed, saved, name, flag in (
        (needs_x or needs_w_in or needs_b_in, preact.shape[0] == rows, "x, w_in and b_in", "save_preact"),
        (needs_w_out, h.shape[0] == rows, "w_out", "save_h"),
        (needs_weights, weights_saved, "weights", "save_out"),
    ):
        if needed and not saved:
            raise RuntimeError(
                f"experts: the gradient of {name} needs what {flag}=True keeps, and this call did not keep it"
            )


def _setup_context(ctx, inputs, output):
    args = ExpertsInputs(*inputs)
    _, preact, h, out = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    # save_for_backward takes tensors only: a missing ``starts`` is saved as an empty tensor.
    ctx.has_starts = args.starts is not None
    starts = args.starts if ctx.has_starts else args.offsets.new_empty(0)
    ctx.save_for_backward(
        args.x, args.weights, args.slot_of_row, args.token_of_row, args.offsets, starts, args.w_in, args.w_out,
        preact, h, out,
    )  # fmt: skip
    ctx.activation, ctx.backend, ctx.quantize = args.activation, args.backend, args.quantize
    ctx.in_epilogue = weights_grad_from_epilogue(args.backend, args.b_out, args.quantize)


def _backward(ctx, grad_y, *_):
    needs = tuple(ctx.needs_input_grad[ExpertsInputs._fields.index(name)] for name in DIFFERENTIABLE)
    if grad_y is None or not any(needs):
        return gradients(ExpertsInputs)
    # Unpacked once: activation checkpointing allows no more.
    x, weights, slot_of_row, token_of_row, offsets, starts, w_in, w_out, preact, h, out = ctx.saved_tensors
    _check_saved(weights, preact, h, out, needs, ctx.in_epilogue)
    with torch.no_grad():  # first-order only; no_grad also keeps torch.func from tracing the op
        grads = experts_backward_op(
            grad_y, x, weights, slot_of_row, token_of_row, offsets, starts if ctx.has_starts else None, w_in, w_out,
            preact, h, out, ctx.activation, ctx.backend, *needs, ctx.quantize,
        )  # fmt: skip
    return gradients(ExpertsInputs, **{name: grad for name, grad, need in zip(DIFFERENTIABLE, grads, needs) if need})


experts_apply = differentiable(experts_op, _setup_context, _backward)


def weights_grad_from_epilogue(backend: str, b_out: Tensor | None, quantize: bool) -> bool:
    """Whether the weights' gradient can come from the input-gradient GEMM's epilogue: on the
    Triton path, without an output bias (whose part of the gradient is not in that GEMM), outside
    FP8 training (whose GEMM sees quantized operands)."""
    return backend == "triton" and b_out is None and not quantize


def saves(x, weights, w_in, w_out, b_in, b_out, backend: str, quantize: bool) -> tuple[bool, bool, bool]:
    """``save_preact, save_h, save_out``: what the gradients autograd will ask for read. The
    pre-activation serves x, w_in and b_in, h serves w_out, the per-slot outputs the weights, or
    the pre-activation does (``tuning.WEIGHT_GRAD_IN_EPILOGUE``); b_out's needs only the dispatch."""
    needs_x, needs_weights, needs_w_in, needs_w_out, needs_b_in = (
        torch.is_grad_enabled() and t is not None and t.requires_grad for t in (x, weights, w_in, w_out, b_in)
    )
    in_epilogue = (
        needs_weights
        and tuning.WEIGHT_GRAD_IN_EPILOGUE
        and not tuning.PRESCALED_BACKWARD
        and weights_grad_from_epilogue(backend, b_out, quantize)
    )
    return needs_x or needs_w_in or needs_b_in or in_epilogue, needs_w_out, needs_weights and not in_epilogue


def run_experts(
    x: Tensor,
    dispatch: Dispatch,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
    *,
    activation: str,
    backend: str,
    quantize: bool = False,
    scales: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """The experts on ``dispatch``, inputs already known to be valid, ``backend`` resolved:
    ``y [T, D]``, differentiable. ``quantize``: the GEMMs in FP8 on high-precision weights (FP8
    training); ``scales``: ``w_in``/``w_out`` are stored in FP8 with these block scales (inference)."""
    w_in_scale, w_out_scale = (None, None) if scales is None else scales
    args = ExpertsInputs(
        x, *dispatch[:5], w_in, w_out, b_in, b_out, w_in_scale, w_out_scale, activation, backend,
        *saves(x, dispatch.weights, w_in, w_out, b_in, b_out, backend, quantize), quantize,
    )  # fmt: skip
    return experts_apply(*args)[0]


def check_experts(
    x: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
    weight_dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Check the tokens ``x [T, D]`` and the experts' weights (in ``weight_dtype``, default the
    dtype of x) and biases against each other (``ValueError``/``TypeError`` saying what was
    expected); return the biases given, by name."""
    check_tensor("x", x, 2, FLOAT_DTYPES)
    weight_dtype = weight_dtype or x.dtype
    for name, w in (("w_in", w_in), ("w_out", w_out)):
        check_tensor(name, w, 3, (*FLOAT_DTYPES, FP8))
        if w.dtype != weight_dtype:
            what = "the dtype of x" if weight_dtype == x.dtype else "FP8 experts'"
            raise TypeError(f"{name} must have {what} ({weight_dtype}), got {w.dtype}")
    gated = parse_activation(activation)[1] is not None
    D, E = x.shape[1], w_in.shape[0]
    if E == 0:
        raise ValueError(f"w_in must hold at least one expert, got shape {tuple(w_in.shape)}")
    check_dim("w_in", w_in, 1, D, "D, the width of x")
    hidden = w_in.shape[2]
    if gated:
        if hidden % 2:
            raise ValueError(f"w_in must be [E, D, 2H] for {activation}, got an odd last dimension {hidden}")
        hidden //= 2
    check_dim("w_out", w_out, 0, E, "E, the experts of w_in")
    check_dim("w_out", w_out, 1, hidden, "H, the expert hidden width of w_in")
    check_dim("w_out", w_out, 2, D, "D, the width of x")
    biases = {}
    for name, bias, width, what in (
        ("b_in", b_in, w_in.shape[2], "the last dimension of w_in"),
        ("b_out", b_out, D, "D"),
    ):
        if bias is not None:
            check_tensor(name, bias, 2, FLOAT_DTYPES)
            if bias.dtype != x.dtype:
                raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {bias.dtype}")
            check_dim(name, bias, 0, E, "E, the experts of w_in")
            check_dim(name, bias, 1, width, what)
            biases[name] = bias
    return biases
