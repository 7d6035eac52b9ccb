"""``moe_ffn``: routing, the two grouped GEMMs and the weighted k-way combine, as one op.

Triton path, forward (``S = T * k`` slots, ``rows`` = slots sorted by expert):

    routing      experts [T, k]          -> slot_of_row, token_of_row, offsets
    first GEMM   x[token_of_row] @ w_in  -> h [S, H]     gather in the A load, activation fused
    second GEMM  h @ w_out               -> o [T, k, D]  scattered back to slot order
    combine      sum_j weights * o       -> y [T, D]     deterministic reduce

Backward: ``d weights`` from ``<dy, o>``; the pre-activation gradient from one GEMM over the
gathered, weight-scaled ``dy`` with the activation's derivative in its epilogue; both weight
gradients as varlen-K grouped GEMMs; ``dx`` from a GEMM scattered to slot order and summed.
"""

from __future__ import annotations

import torch

from .activations import ACTIVATIONS, activation_fn
from .backend import resolve_backend
from .combine import combine, combine_weight_grad
from .grouped_mm import GroupedMMFunction, grouped_mm_triton, grouped_mm_act, grouped_mm_act_grad, grouped_mm_wgrad
from .routing import route
from .validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dim,
    check_expert_ids,
    check_k,
    check_same_device,
    check_tensor,
)


class MoEFFNFunction(torch.autograd.Function):
    """Triton ``moe_ffn``; see the module docstring for the kernels it runs."""

    @staticmethod
    def forward(ctx, x, weights, experts, w_in, w_out, activation):
        T, D = x.shape
        k = experts.shape[1]
        routing = route(experts, w_in.shape[0], "triton")
        needs_x, needs_weights, _, needs_w_in, needs_w_out, _ = ctx.needs_input_grad
        # The pre-activation feeds only the gradients of x and w_in.
        h, preact = grouped_mm_act(
            x, w_in, routing.offsets, activation, a_rows=routing.token_of_row, save_preact=needs_x or needs_w_in
        )
        out = grouped_mm_triton(h, w_out, routing.offsets, c_rows=routing.slot_of_row).view(T, k, D)
        y = combine(out, weights, x.dtype)
        if needs_x or needs_weights or needs_w_in or needs_w_out:
            # Keep only what the requested gradients read: out for d weights, h for d w_out.
            keep_out = out if needs_weights else None
            keep_h = h if needs_w_out else None
            ctx.save_for_backward(x, weights, w_in, w_out, preact, keep_h, keep_out, *routing)
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weights, w_in, w_out, preact, h, out, slot_of_row, token_of_row, offsets = ctx.saved_tensors
        needs_x, needs_weights, _, needs_w_in, needs_w_out, _ = ctx.needs_input_grad
        (T, D), k = x.shape, weights.shape[1]
        # Per-slot factors, indexed by slot_of_row inside the kernels.
        scale = weights.reshape(-1).float().contiguous()
        grad_x = grad_weights = grad_w_in = grad_w_out = None
        if needs_weights:
            grad_weights = combine_weight_grad(grad_y, out).to(weights.dtype)
        if needs_w_out:
            grad_w_out = grouped_mm_wgrad(
                h, grad_y, offsets, w_out.dtype, b_rows=token_of_row, scale=scale, scale_rows=slot_of_row
            )
        if needs_x or needs_w_in:
            grad_preact = grouped_mm_act_grad(
                grad_y, w_out.transpose(1, 2), offsets, preact, ctx.activation,
                a_rows=token_of_row, scale=scale, scale_rows=slot_of_row,
            )
            if needs_x:
                grad_slots = grouped_mm_triton(grad_preact, w_in.transpose(1, 2), offsets, c_rows=slot_of_row)
                grad_x = grad_slots if k == 1 else combine(grad_slots.view(T, k, D), None, x.dtype)
            if needs_w_in:
                grad_w_in = grouped_mm_wgrad(x, grad_preact, offsets, w_in.dtype, a_rows=token_of_row)
        return grad_x, grad_weights, None, grad_w_in, grad_w_out, None


def _moe_ffn_torch(x, weights, experts, w_in, w_out, activation):
    T, k = experts.shape
    slot_of_row, token_of_row, offsets = route(experts, w_in.shape[0], "torch")
    h = activation_fn(activation)(GroupedMMFunction.apply(x.index_select(0, token_of_row), w_in, offsets, "torch"))
    out = GroupedMMFunction.apply(h, w_out, offsets, "torch")
    # Back to slot order through the inverse permutation: a gather, whose backward scatters
    # each row once, so it stays deterministic.
    row_of_slot = torch.empty_like(slot_of_row).scatter_(0, slot_of_row.long(), torch.arange(T * k, dtype=slot_of_row.dtype, device=x.device))
    out = out.index_select(0, row_of_slot).view(T, k, x.shape[1])
    return torch.bmm(weights.float().unsqueeze(1), out.float()).squeeze(1).to(x.dtype)


def moe_ffn_unchecked(x, weights, experts, w_in, w_out, activation: str, backend: str) -> torch.Tensor:
    """``moe_ffn`` for inputs already known to be valid, with ``backend`` already resolved."""
    if backend == "triton":
        return MoEFFNFunction.apply(x, weights, experts, w_in, w_out, activation)
    return _moe_ffn_torch(x, weights, experts, w_in, w_out, activation)


def moe_ffn(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: str = "swiglu",
    backend: str | None = None,
) -> torch.Tensor:
    """Routed expert MLPs with a weighted combine; no token is ever dropped.

    ``y[t] = sum_j weights[t, j] * act(x[t] @ w_in[e]) @ w_out[e]`` with ``e = experts[t, j]``;
    for ``"swiglu"``, ``act(a) = silu(a[:, :H]) * a[:, H:]``.

    Args:
        x: ``[T, D]`` (fp16, bf16 or fp32).
        weights: ``[T, k]`` routing weights (any float dtype).
        experts: ``[T, k]`` expert ids in ``[0, E)`` (int32 or int64).
        w_in: ``[E, D, 2H]`` for ``"swiglu"``, ``[E, D, H]`` for ``"gelu"``, ``"gelu_tanh"``,
            ``"silu"``, ``"relu"``; dtype of ``x``.
        w_out: ``[E, H, D]``, dtype of ``x``.
        backend: ``None``/``"auto"``, ``"triton"`` or ``"torch"``.
    Returns:
        ``y [T, D]`` in ``x.dtype``, differentiable in ``x``, ``weights``, ``w_in`` and ``w_out``.
    """
    check_tensor("x", x, 2, FLOAT_DTYPES)
    check_tensor("weights", weights, 2, FLOAT_DTYPES)
    check_tensor("experts", experts, 2, INDEX_DTYPES)
    check_tensor("w_in", w_in, 3, FLOAT_DTYPES)
    check_tensor("w_out", w_out, 3, FLOAT_DTYPES)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    for name, w in (("w_in", w_in), ("w_out", w_out)):
        if w.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {w.dtype}")
    T, D = x.shape
    E = w_in.shape[0]
    if E == 0:
        raise ValueError(f"w_in must hold at least one expert, got shape {tuple(w_in.shape)}")
    check_dim("experts", experts, 0, T, "T, the tokens of x")
    if weights.shape != experts.shape:
        raise ValueError(f"weights must have the shape of experts {tuple(experts.shape)}, got {tuple(weights.shape)}")
    check_k(experts.shape[1], E, name="experts.shape[1]")
    check_dim("w_in", w_in, 1, D, "D, the width of x")
    hidden = w_in.shape[2]
    if activation == "swiglu":
        if hidden % 2:
            raise ValueError(f"w_in must be [E, D, 2H] for swiglu, got an odd last dimension {hidden}")
        hidden //= 2
    check_dim("w_out", w_out, 0, E, "E, the experts of w_in")
    check_dim("w_out", w_out, 1, hidden, "H, the expert hidden width of w_in")
    check_dim("w_out", w_out, 2, D, "D, the width of x")
    device = check_same_device(x=x, weights=weights, experts=experts, w_in=w_in, w_out=w_out)
    check_expert_ids("experts", experts, E)
    return moe_ffn_unchecked(x, weights, experts, w_in, w_out, activation, resolve_backend(backend, device))
