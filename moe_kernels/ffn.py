"""``moe_ffn``: routing, the two grouped GEMMs and the weighted k-way combine, as one op.

Triton path, forward (``S = T * k`` slots, ``rows`` = slots sorted by expert):

    routing      experts [T, k]          -> slot_of_row, token_of_row, offsets
    first GEMM   x[token_of_row] @ w_in  -> h [S, H]     gather in the A load, activation fused
    second GEMM  h @ w_out               -> o [T, k, D]  scattered back to slot order
    combine      sum_j weights * o       -> y [T, D]     deterministic reduce

Expert choice (``expert_choice.py``) runs the same steps from its own routing, where a token
owns 0 to E slots rather than k.

Backward: ``d weights`` from ``<dy, o>``; the pre-activation gradient from one GEMM over the
gathered, weight-scaled ``dy`` with the activation's derivative in its epilogue; both weight
gradients as varlen-K grouped GEMMs; ``dx`` from a GEMM scattered to slot order and summed.
The PyTorch path takes the same steps with ``torch._grouped_mm`` and indexing.

Forward and backward are the custom ops ``moe_kernels::moe_ffn`` and
``moe_kernels::moe_ffn_backward``, so ``torch.compile`` and ``torch.export`` see two opaque ops
with fake (shape-only) implementations; ``moe_ffn_apply`` ties them together for autograd and
``torch.func``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .activations import activation_fn, activation_grad, parse_activation
from .backend import resolve_backend
from .combine import Slots, combine, combine_torch, combine_weight_grad, combine_weight_grad_torch, weighted_rows
from .fp8 import (
    BLOCK,
    FP8,
    check_finite,
    check_inference,
    check_quantized,
    fp8_operand,
    grouped_mm_fp8_torch,
    quantize_blocks,
)
from .grouped_mm import (
    group_of_row,
    group_sums_torch,
    grouped_mm_act,
    grouped_mm_act_grad,
    grouped_mm_torch,
    grouped_mm_triton,
    grouped_mm_wgrad,
    grouped_mm_wgrad_torch,
)
from .library import custom_op, differentiable, gradients
from .routing import Routing, route, row_of_slot
from .validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dim,
    check_expert_ids,
    check_k,
    check_same_device,
    check_tensor,
)

Tensor = torch.Tensor


def _experts_triton(x, routing, w_in, w_out, b_in, b_out, activation, save_preact, scales):
    w_in_scale, w_out_scale = (None, None) if scales is None else scales
    h, preact = grouped_mm_act(
        x, w_in, routing.offsets, activation, a_rows=routing.token_of_row, save_preact=save_preact, bias=b_in,
        b_scale=w_in_scale,
    )  # fmt: skip
    out = grouped_mm_triton(h, w_out, routing.offsets, c_rows=routing.slot_of_row, bias=b_out, b_scale=w_out_scale)
    return out, preact, h


def _matmul_torch(a: Tensor, w: Tensor, offsets: Tensor, scale: Tensor | None) -> Tensor:
    """``grouped_mm_torch``, or with ``scale`` (an e4m3 ``w``'s) the FP8 emulation, kept in fp32
    up to the epilogue (activation, bias, routing weight) as the FP8 kernel keeps it."""
    if scale is None:
        return grouped_mm_torch(a, w, offsets)
    return grouped_mm_fp8_torch(a, w, scale, offsets, out_dtype=torch.float32)


def _experts_torch(x, routing, w_in, w_out, b_in, b_out, activation, save_preact, scales):
    w_in_scale, w_out_scale = (None, None) if scales is None else scales
    groups = (
        group_of_row(routing.offsets, routing.slot_of_row.shape[0]) if b_in is not None or b_out is not None else None
    )
    preact = _matmul_torch(x.index_select(0, routing.token_of_row), w_in, routing.offsets, w_in_scale)
    if b_in is not None:
        preact = preact + b_in.index_select(0, groups)
    h = activation_fn(activation)(preact).to(x.dtype)
    out = _matmul_torch(h, w_out, routing.offsets, w_out_scale)
    if b_out is not None:
        out = out + b_out.index_select(0, groups)
    # Back to slot order with a gather (deterministic, unlike a scatter-add).
    return out.to(x.dtype).index_select(0, row_of_slot(routing.slot_of_row)), preact.to(x.dtype), h


def quantized_experts(w_in: Tensor, w_out: Tensor, fp8: bool) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """``w_in, w_out`` and ``scales`` for ``experts_forward``: as given, or with ``fp8`` quantized
    (``quantize_fp8`` without its checks: no host sync in a training step; a non-finite weight
    gives a non-finite loss)."""
    if not fp8:
        return w_in, w_out, None
    (w_in, w_in_scale), (w_out, w_out_scale) = quantize_blocks(w_in), quantize_blocks(w_out)
    return w_in, w_out, (w_in_scale, w_out_scale)


def experts_forward(
    x: Tensor,
    slot_weights: Tensor,
    routing: Routing,
    slots: Slots,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
    backend: str,
    save_preact: bool,
    scales: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """The routed experts and the combine, for any routing: ``y [T, D]``, the pre-activation
    (with ``save_preact`` on the Triton path; always on PyTorch's), ``h [S, H]`` and the per-slot
    outputs ``out [S, D]``. ``slot_weights [S]`` are in slot order; ``slots`` is ``k`` or the
    tokens' slot starts (see ``combine``). With ``scales`` (``w_in``'s and ``w_out``'s), the
    experts are FP8 (``quantize_fp8``) and run ``grouped_mm_fp8``'s GEMMs."""
    experts = _experts_triton if backend == "triton" else _experts_torch
    out, preact, h = experts(x, routing, w_in, w_out, b_in, b_out, activation, save_preact, scales)
    reduce = combine if backend == "triton" else combine_torch
    return reduce(out, slot_weights.flatten().contiguous(), slots, x.shape[0], x.dtype), preact, h, out


@custom_op("moe_kernels::moe_ffn")
def moe_ffn_op(
    x: Tensor,
    weights: Tensor,
    experts: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
    backend: str,
    save_preact: bool,
    save_h: bool,
    save_out: bool,
    fp8: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``y [T, D]`` and what the backward pass reads: the pre-activation ``[S, 2H or H]``, ``h
    [S, H]`` and the per-slot outputs ``out [T, k, D]`` where asked for (else empty along
    dimension 0), and the routing (``slot_of_row``, ``token_of_row``, ``offsets``). With ``fp8``
    the experts' GEMMs run in FP8 on ``w_in``/``w_out`` quantized here (``quantize_fp8``)."""
    (T, D), k = x.shape, experts.shape[1]
    routing = route(experts, w_in.shape[0], backend)
    w_in, w_out, scales = quantized_experts(w_in, w_out, fp8)
    y, preact, h, out = experts_forward(
        x, weights, routing, k, w_in, w_out, b_in, b_out, activation, backend, save_preact, scales
    )
    empty = x.new_empty
    return (
        y,
        preact if save_preact else empty((0, w_in.shape[2])),
        h if save_h else empty((0, w_out.shape[1])),
        out.view(T, k, D) if save_out else empty((0, k, D)),
        *routing,
    )


@moe_ffn_op.register_fake
def _(x, weights, experts, w_in, w_out, b_in, b_out, activation, backend, save_preact, save_h, save_out, fp8=False):
    (T, D), k, E = x.shape, experts.shape[1], w_in.shape[0]
    S = T * k
    index = dict(dtype=torch.int32)
    return (
        x.new_empty((T, D)),
        x.new_empty((S if save_preact else 0, w_in.shape[2])),
        x.new_empty((S if save_h else 0, w_out.shape[1])),
        x.new_empty((T if save_out else 0, k, D)),
        x.new_empty((S,), **index),
        x.new_empty((S,), **index),
        x.new_empty((E,), **index),
    )


def _transposed(w: Tensor, fp8: bool) -> tuple[Tensor, Tensor | None]:
    """An input-gradient GEMM's operand: ``w^T`` and, with ``fp8``, its block scales, quantized
    as the forward quantized ``w`` (the same blocks, transposed), K-major for this GEMM."""
    if not fp8:
        return w.transpose(1, 2), None
    return quantize_blocks(w.transpose(1, 2))


# How the backward reads dL/dy for the second GEMM's gradients (dh and dW_out): False, gathered
# by token and scaled by the routing weight inside the kernels; True, gathered and scaled once
# into expert-major rows (``weighted_rows``, one [S, D] pass) that both GEMMs read plainly. The
# first keeps memory traffic lowest; the second spares the weight-gradient kernel scaling each
# B tile in registers on every K step (twice the K loop's instructions on sm_90a: 379 against
# 179 at 64x128x128). Which is faster is for a GPU to say: ``benchmarks/gpu_check.py`` times both.
PRESCALED_BACKWARD = False


def _backward_triton(grad_y, x, weights, w_in, w_out, preact, h, out, routing, slots, activation, needs, fp8):
    needs_x, needs_weights, needs_w_in, needs_w_out, needs_b_in, needs_b_out = needs
    slot_of_row, token_of_row, offsets = routing
    T, D = x.shape
    # Per-slot factors, indexed by slot_of_row inside the kernels.
    scale = weights.reshape(-1).float().contiguous()
    grad_x = grad_weights = grad_w_in = grad_w_out = grad_b_in = grad_b_out = None
    if needs_weights:
        grad_weights = combine_weight_grad(grad_y, out.reshape(scale.shape[0], D), slots)
        grad_weights = grad_weights.view(weights.shape).to(weights.dtype)
    needs_dh = needs_x or needs_w_in or needs_b_in
    # The rows of dL/dy each expert-major row reads, and their routing weights.
    dy_rows, dy_scale, dy_scale_rows = token_of_row, scale, slot_of_row
    if PRESCALED_BACKWARD and (needs_w_out or needs_b_out or needs_dh):
        grad_y = weighted_rows(grad_y, token_of_row, scale, slot_of_row)
        dy_rows = dy_scale = dy_scale_rows = None
    if needs_w_out or needs_b_out:
        # A bias alone needs no weight gradient: zero columns of h leave only the bias sums.
        rows = h if needs_w_out else h.new_empty((slot_of_row.shape[0], 0))
        grad_w_out, grad_b_out = grouped_mm_wgrad(
            rows,
            grad_y,
            offsets,
            w_out.dtype,
            b_rows=dy_rows,
            scale=dy_scale,
            scale_rows=dy_scale_rows,
            bias_grad=needs_b_out,
        )
        grad_w_out = grad_w_out if needs_w_out else None
    if needs_dh:
        w_out_t, w_out_t_scale = _transposed(w_out, fp8)
        grad_preact = grouped_mm_act_grad(
            grad_y,
            w_out_t,
            offsets,
            preact,
            activation,
            a_rows=dy_rows,
            scale=dy_scale,
            scale_rows=dy_scale_rows,
            b_scale=w_out_t_scale,
        )
        if needs_x:
            w_in_t, w_in_t_scale = _transposed(w_in, fp8)
            grad_slots = grouped_mm_triton(grad_preact, w_in_t, offsets, c_rows=slot_of_row, b_scale=w_in_t_scale)
            grad_x = (
                grad_slots if isinstance(slots, int) and slots == 1 else combine(grad_slots, None, slots, T, x.dtype)
            )
        if needs_w_in or needs_b_in:
            grad_w_in, grad_b_in = grouped_mm_wgrad(
                x if needs_w_in else x.new_empty((T, 0)),
                grad_preact,
                offsets,
                w_in.dtype,
                a_rows=token_of_row,
                bias_grad=needs_b_in,
            )
            grad_w_in = grad_w_in if needs_w_in else None
    return grad_x, grad_weights, grad_w_in, grad_w_out, grad_b_in, grad_b_out


def _backward_torch(grad_y, x, weights, w_in, w_out, preact, h, out, routing, slots, activation, needs, fp8):
    needs_x, needs_weights, needs_w_in, needs_w_out, needs_b_in, needs_b_out = needs
    slot_of_row, token_of_row, offsets = routing
    T, D = x.shape
    grad_x = grad_weights = grad_w_in = grad_w_out = grad_b_in = grad_b_out = None
    if needs_weights:
        grad_weights = combine_weight_grad_torch(grad_y, out.reshape(weights.numel(), D), slots)
        grad_weights = grad_weights.view(weights.shape).to(weights.dtype)
    # d(expert output) of each row: the token's gradient times its routing weight.
    row_weights = weights.reshape(-1).float().index_select(0, slot_of_row)
    grad_y_rows = grad_y.index_select(0, token_of_row)
    grad_rows = (grad_y_rows.float() * row_weights[:, None]).to(x.dtype)
    if needs_w_out:
        grad_w_out = grouped_mm_wgrad_torch(h, grad_rows, offsets)
    if needs_b_out:
        grad_b_out = group_sums_torch(grad_rows, offsets)
    if needs_x or needs_w_in or needs_b_in:
        w_out_t, w_out_t_scale = _transposed(w_out, fp8)
        if fp8:  # as the kernel: the gathered gradient quantized, the routing weight in the epilogue
            grad_h = _matmul_torch(grad_y_rows, w_out_t, offsets, w_out_t_scale) * row_weights[:, None]
            grad_preact = activation_grad(activation, preact.float(), grad_h).to(x.dtype)
        else:
            grad_preact = activation_grad(activation, preact, grouped_mm_torch(grad_rows, w_out_t, offsets))
        if needs_b_in:
            grad_b_in = group_sums_torch(grad_preact, offsets)
        if needs_x:
            w_in_t, w_in_t_scale = _transposed(w_in, fp8)
            grad_x_rows = _matmul_torch(grad_preact, w_in_t, offsets, w_in_t_scale).to(x.dtype)
            grad_x = combine_torch(grad_x_rows.index_select(0, row_of_slot(slot_of_row)), None, slots, T, x.dtype)
        if needs_w_in:
            grad_w_in = grouped_mm_wgrad_torch(x.index_select(0, token_of_row), grad_preact, offsets)
    return grad_x, grad_weights, grad_w_in, grad_w_out, grad_b_in, grad_b_out


@custom_op("moe_kernels::moe_ffn_backward")
def moe_ffn_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weights: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    preact: Tensor,
    h: Tensor,
    out: Tensor,
    slot_of_row: Tensor,
    token_of_row: Tensor,
    offsets: Tensor,
    activation: str,
    backend: str,
    needs_x: bool,
    needs_weights: bool,
    needs_w_in: bool,
    needs_w_out: bool,
    needs_b_in: bool,
    needs_b_out: bool,
    slot_starts: Tensor | None = None,
    fp8: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of ``x``, ``weights``, ``w_in``, ``w_out``, ``b_in`` and ``b_out`` that
    ``needs_*`` ask for (the others empty), from what ``moe_ffn`` saved. The biases' gradients
    do not read the biases, only their shapes: ``[E, w_in.shape[2]]`` and ``[E, D]``.

    With ``slot_starts [T + 1]`` (expert choice), tokens own varying numbers of slots:
    ``weights`` are then the ``[S]`` slot weights, ``out`` is ``[S, D]``, and the weights'
    gradient comes back as ``[S]``. With ``fp8`` (as the forward ran) the input-gradient GEMMs
    run in FP8 on the experts quantized again; the weights' gradients stay in the dtype of x,
    from the saved high-precision inputs."""
    backward = _backward_triton if backend == "triton" else _backward_torch
    routing = Routing(slot_of_row, token_of_row, offsets)
    slots = weights.shape[1] if slot_starts is None else slot_starts
    needs = (needs_x, needs_weights, needs_w_in, needs_w_out, needs_b_in, needs_b_out)
    grads = backward(grad_y, x, weights, w_in, w_out, preact, h, out, routing, slots, activation, needs, fp8)
    return tuple(x.new_empty(0) if grad is None else grad for grad in grads)


@moe_ffn_backward_op.register_fake
def _(
    grad_y,
    x,
    weights,
    w_in,
    w_out,
    preact,
    h,
    out,
    slot_of_row,
    token_of_row,
    offsets,
    activation,
    backend,
    needs_x,
    needs_weights,
    needs_w_in,
    needs_w_out,
    needs_b_in,
    needs_b_out,
    slot_starts=None,
    fp8=False,
):
    shapes = (
        x.shape,
        weights.shape,
        w_in.shape,
        w_out.shape,
        (w_in.shape[0], w_in.shape[2]),
        (w_in.shape[0], x.shape[1]),
    )
    dtypes = (x.dtype, weights.dtype, w_in.dtype, w_out.dtype, w_in.dtype, x.dtype)
    needs = (needs_x, needs_weights, needs_w_in, needs_w_out, needs_b_in, needs_b_out)
    return tuple(
        x.new_empty(shape, dtype=dtype) if need else x.new_empty(0) for shape, dtype, need in zip(shapes, dtypes, needs)
    )


def check_saved(saved: tuple, needs: tuple) -> None:
    """A caller of ``torch.ops.moe_kernels.moe_ffn`` chooses what it saves: refuse a gradient
    whose inputs it did not keep, rather than read past an empty tensor."""
    needs_x, needs_weights, needs_w_in, needs_w_out, needs_b_in, _ = needs
    x, weights, _, _, preact, h, out, *_ = saved
    rows = weights.numel()
    for needed, saved, name, flag in (
        (needs_x or needs_w_in or needs_b_in, preact.shape[0] == rows, "x, w_in and b_in", "save_preact"),
        (needs_w_out, h.shape[0] == rows, "w_out", "save_h"),
        (needs_weights, math.prod(out.shape[:-1]) == rows, "weights", "save_out"),
    ):
        if needed and not saved:
            raise RuntimeError(
                f"moe_ffn: the gradient of {name} needs what {flag}=True keeps, and this call did not keep it"
            )


class FfnInputs(NamedTuple):
    """The arguments of ``moe_kernels::moe_ffn``, in its schema's order."""

    x: Tensor
    weights: Tensor
    experts: Tensor
    w_in: Tensor
    w_out: Tensor
    b_in: Tensor | None
    b_out: Tensor | None
    activation: str
    backend: str
    save_preact: bool
    save_h: bool
    save_out: bool
    fp8: bool = False


# The inputs with gradients, in the order moe_ffn_backward takes and returns them.
DIFFERENTIABLE = ("x", "weights", "w_in", "w_out", "b_in", "b_out")


def _setup_context(ctx, inputs, output):
    args = FfnInputs(*inputs)
    _, preact, h, out, *routing = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(args.x, args.weights, args.w_in, args.w_out, preact, h, out, *routing)
    ctx.activation, ctx.backend, ctx.fp8 = args.activation, args.backend, args.fp8


def _backward(ctx, grad_y, *_):
    needs = tuple(ctx.needs_input_grad[FfnInputs._fields.index(name)] for name in DIFFERENTIABLE)
    if grad_y is None or not any(needs):
        return gradients(FfnInputs)
    saved = ctx.saved_tensors  # unpacked once: activation checkpointing allows no more
    check_saved(saved, needs)
    with torch.no_grad():  # first-order only; no_grad also keeps torch.func from tracing the op
        grads = moe_ffn_backward_op(grad_y, *saved, ctx.activation, ctx.backend, *needs, None, ctx.fp8)
    return gradients(FfnInputs, **{name: grad for name, grad, need in zip(DIFFERENTIABLE, grads, needs) if need})


moe_ffn_apply = differentiable(moe_ffn_op, _setup_context, _backward)


def moe_ffn_unchecked(
    x, weights, experts, w_in, w_out, b_in=None, b_out=None, *, activation: str, backend: str, fp8: bool = False
) -> torch.Tensor:
    """``moe_ffn`` for inputs already known to be valid, with ``backend`` already resolved
    (``fp8``: the GEMMs in FP8 on high-precision weights, differentiable)."""
    args = FfnInputs(
        x, weights, experts, w_in, w_out, b_in, b_out, activation, backend, *saves(x, weights, w_in, w_out, b_in), fp8
    )  # fmt: skip
    return moe_ffn_apply(*args)[0]


def saves(x, weights, w_in, w_out, b_in) -> tuple[bool, bool, bool]:
    """``save_preact, save_h, save_out``: what the gradients autograd will ask for read. The
    pre-activation serves x, w_in and b_in, h serves w_out, the per-slot outputs the weights
    (b_out's needs only the routing)."""
    needs_x, needs_weights, needs_w_in, needs_w_out, needs_b_in = (
        torch.is_grad_enabled() and t is not None and t.requires_grad for t in (x, weights, w_in, w_out, b_in)
    )
    return needs_x or needs_w_in or needs_b_in, needs_w_out, needs_weights


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


def moe_ffn(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: str = "swiglu",
    backend: str | None = None,
    *,
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
    precision: str | None = None,
    w_in_scale: torch.Tensor | None = None,
    w_out_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed expert MLPs with a weighted combine; no token is ever dropped.

    ``y[t] = sum_j weights[t, j] * (act(x[t] @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e])`` with
    ``e = experts[t, j]``; for ``"swiglu"``, ``act(a) = silu(a[:, :H]) * a[:, H:]`` (``"geglu"``
    and ``"geglu_tanh"`` gate with GELU and its tanh form; ``swiglu_activation(limit, alpha,
    up_offset)`` names SwiGLU with clamped inputs, GPT-OSS's); ``"relu2"`` is ``relu(a) ** 2``.

    Args:
        x: ``[T, D]`` (fp16, bf16 or fp32).
        weights: ``[T, k]`` routing weights (any float dtype).
        experts: ``[T, k]`` expert ids in ``[0, E)`` (int32 or int64).
        w_in: ``[E, D, 2H]`` for the gated ``"swiglu"``, ``"geglu"``, ``"geglu_tanh"``; ``[E, D, H]``
            for ``"gelu"``, ``"gelu_tanh"``, ``"silu"``, ``"relu"``, ``"relu2"``; dtype of ``x``.
        w_out: ``[E, H, D]``, dtype of ``x``.
        backend: ``None``/``"auto"``, ``"triton"`` or ``"torch"``.
        b_in: optional expert biases of the first projection, ``[E, 2H]`` for a gated activation
            (gate, then up) else ``[E, H]``; b_out: optional ``[E, D]``; both in the dtype of ``x``.
        precision: ``None`` (the dtype of x) or ``"fp8"``: the experts' GEMMs in FP8
            (``grouped_mm_fp8``'s recipe). ``w_in``/``w_out`` in the dtype of x are quantized on
            each call and train: the forward and input-gradient GEMMs run in FP8, the weights'
            gradients in the dtype of x from the saved inputs. ``float8_e4m3fn`` weights from
            ``quantize_fp8``, with their scales in ``w_in_scale``/``w_out_scale``, serve
            inference only.
    Returns:
        ``y [T, D]`` in ``x.dtype``, differentiable in ``x``, ``weights``, ``w_in``, ``w_out``
        and the biases (not with FP8-stored weights).
    """
    if precision not in (None, "fp8"):
        raise ValueError(f"precision must be None or 'fp8', got {precision!r}")
    stored = precision == "fp8" and FP8 in (w_in.dtype, w_out.dtype)  # pre-quantized: inference
    if stored:
        (w_in, w_in_scale), (w_out, w_out_scale) = (
            fp8_operand("w_in", w_in, w_in_scale),
            fp8_operand("w_out", w_out, w_out_scale),
        )
    elif w_in_scale is not None or w_out_scale is not None:
        raise ValueError("w_in_scale and w_out_scale go with precision='fp8' and FP8 w_in, w_out (quantize_fp8)")
    biases = check_experts(x, w_in, w_out, b_in, b_out, activation, FP8 if stored else None)
    check_tensor("weights", weights, 2, FLOAT_DTYPES)
    check_tensor("experts", experts, 2, INDEX_DTYPES)
    E = w_in.shape[0]
    check_dim("experts", experts, 0, x.shape[0], "T, the tokens of x")
    if weights.shape != experts.shape:
        raise ValueError(f"weights must have the shape of experts {tuple(experts.shape)}, got {tuple(weights.shape)}")
    check_k(experts.shape[1], E, name="experts.shape[1]")
    device = check_same_device(x=x, weights=weights, experts=experts, w_in=w_in, w_out=w_out, **biases)
    check_expert_ids("experts", experts, E)
    backend = resolve_backend(backend, device)
    if stored:
        check_quantized("w_in", w_in, w_in_scale, BLOCK)
        check_quantized("w_out", w_out, w_out_scale, BLOCK)
        check_same_device(x=x, w_in_scale=w_in_scale, w_out_scale=w_out_scale)
        check_inference(x, weights, *biases.values())
        routing = route(experts, E, backend)
        return experts_forward(
            x, weights, routing, experts.shape[1], w_in, w_out, b_in, b_out, activation, backend,
            save_preact=False, scales=(w_in_scale, w_out_scale),
        )[0]  # fmt: skip
    if precision == "fp8":
        check_finite("w_in", w_in)
        check_finite("w_out", w_out)
    return moe_ffn_unchecked(
        x, weights, experts, w_in, w_out, b_in, b_out, activation=activation, backend=backend, fp8=precision == "fp8"
    )
