"""Expert-choice gating (EC-DiT): each expert takes its ``C`` best tokens of each group.

Scores are the softmax over experts of each token's logits, as for top-k gating; then, within
each group of ``S`` consecutive tokens (one image's, in a DiT), every expert keeps the ``C``
tokens of highest score, ties to the lower token index. So each expert serves exactly ``G * C``
tokens (balanced by construction, no balance loss), while a token may be served by 0 to ``E``
experts.

Triton path: the scores come from the top-k gating kernel's softmax; one program per (group,
expert) sorts the group's scores, packed with their token index into one 64-bit key (a
non-negative float sorts as its bits; the index breaks ties), and keeps the first ``C``. The
backward scatters the weights' gradients into the scores' (each (token, expert) is chosen at most
once, so plain stores, no atomics) and runs the gating kernel's softmax backward.

``expert_choice_ffn`` runs the chosen tokens through ``moe_ffn``'s grouped GEMMs and combine
(forward and backward), from a routing in which a token owns one slot per expert that chose it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .backend import resolve_backend
from .ffn import (
    DIFFERENTIABLE,
    check_experts,
    check_saved,
    experts_forward,
    moe_ffn_backward_op,
    quantized_experts,
    saves,
)
from .gating import _gating_triton, topk_gating_backward_op
from .library import custom_op, differentiable, gradients
from .routing import chosen_routing
from .validation import FLOAT_DTYPES, POSITIVE_INT, check_dim, check_same_device, check_tensor

Tensor = torch.Tensor
# The most tokens one Triton program sorts (a group): its keys live in registers.
MAX_GROUP = 4096


@triton.jit
def _select_kernel(
    probs_ptr, weights_ptr, tokens_ptr, S, C, stride_t, stride_e, BLOCK_S: tl.constexpr
):  # fmt: skip
    """Program (g, e): the ``C`` highest scores of expert ``e`` among group ``g``'s ``S`` tokens."""
    g, e, E = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    s = tl.arange(0, BLOCK_S)
    ok = s < S
    p = tl.load(probs_ptr + (g * S + s).to(tl.int64) * stride_t + e * stride_e, mask=ok, other=0.0)
    bits = p.to(tl.int32, bitcast=True)
    bits = tl.where(p != p, 0x7FC00000, bits)  # any NaN as the positive quiet NaN: above every score
    # Descending keys: the score's bits, then the lower index first; padding below everything.
    keys = tl.where(ok, (bits.to(tl.int64) << 32) | (BLOCK_S - 1 - s).to(tl.int64), -1)
    keys = tl.sort(keys, descending=True)
    chosen = BLOCK_S - 1 - (keys & 0xFFFFFFFF).to(tl.int32)
    values = (keys >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    out = (g * E + e).to(tl.int64) * C + s
    tl.store(weights_ptr + out, values, mask=s < C)
    tl.store(tokens_ptr + out, (g * S + chosen).to(tl.int64), mask=s < C)


@triton.jit
def _scatter_grad_kernel(grad_ptr, tokens_ptr, grad_probs_ptr, C, stride_t, stride_e, BLOCK_C: tl.constexpr):
    """Program (g, e): ``d probs[token, e] += d weights[g, e, c]`` for its ``C`` chosen tokens."""
    g, e, E = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    c = tl.arange(0, BLOCK_C)
    ok = c < C
    row = (g * E + e).to(tl.int64) * C + c
    tokens = tl.load(tokens_ptr + row, mask=ok, other=0)
    target = grad_probs_ptr + tokens * stride_t + e * stride_e
    tl.store(target, tl.load(target, mask=ok, other=0.0) + tl.load(grad_ptr + row, mask=ok, other=0.0), mask=ok)


def _select_triton(logits: Tensor, capacity: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    T, E = logits.shape
    G = T // group_size
    probs = _gating_triton(logits, 1, False, "softmax", None, 1, 1, 1.0)[2]
    weights = logits.new_empty((G, E, capacity), dtype=torch.float32)
    tokens = logits.new_empty((G, E, capacity), dtype=torch.int64)
    if G > 0:
        _select_kernel[(G, E)](
            probs, weights, tokens, group_size, capacity, probs.stride(0), probs.stride(1),
            BLOCK_S=triton.next_power_of_2(group_size),
        )  # fmt: skip
    return weights, tokens, probs


def _select_torch(logits: Tensor, capacity: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    T, E = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)
    scores = probs.view(T // group_size, group_size, E).transpose(1, 2)  # [G, E, S]
    # A stable descending sort keeps equal scores in index order; NaN ranks first, as in the kernel.
    values, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    first = torch.arange(0, T, group_size, device=logits.device).view(-1, 1, 1)
    return values[..., :capacity].contiguous(), (order[..., :capacity] + first).contiguous(), probs


@custom_op("moe_kernels::expert_choice_gating")
def expert_choice_gating_op(
    logits: Tensor, capacity: int, group_size: int, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """``weights [G, E, C]`` fp32, ``tokens [G, E, C]`` int64 (flat token indices), ``probs [T, E]``."""
    if logits.shape[0] == 0:
        return _empty(logits, capacity, group_size)
    select = _select_triton if backend == "triton" else _select_torch
    return select(logits, capacity, group_size)


@expert_choice_gating_op.register_fake
def _empty(logits, capacity, group_size, backend=None):
    T, E = logits.shape
    shape = (T // group_size, E, capacity)
    return (
        logits.new_empty(shape, dtype=torch.float32),
        logits.new_empty(shape, dtype=torch.int64),
        logits.new_empty((T, E), dtype=torch.float32),
    )


def _scatter_triton(grad_probs: Tensor, tokens: Tensor, grad_weights: Tensor) -> Tensor:
    G, E, C = tokens.shape
    if G > 0 and C > 0:
        _scatter_grad_kernel[(G, E)](
            grad_weights.contiguous(), tokens, grad_probs, C, grad_probs.stride(0), grad_probs.stride(1),
            BLOCK_C=triton.next_power_of_2(C),
        )  # fmt: skip
    return grad_probs


def _scatter_torch(grad_probs: Tensor, tokens: Tensor, grad_weights: Tensor) -> Tensor:
    experts = torch.arange(tokens.shape[1], device=tokens.device).view(1, -1, 1).expand_as(tokens)
    return grad_probs.index_put(
        (tokens.reshape(-1), experts.reshape(-1)), grad_weights.float().reshape(-1), accumulate=True
    )


@custom_op("moe_kernels::expert_choice_gating_backward")
def expert_choice_gating_backward_op(
    probs: Tensor,
    tokens: Tensor,
    grad_weights: Tensor | None,
    grad_probs: Tensor | None,
    dtype: torch.dtype,
    backend: str,
) -> Tensor:
    """``d logits [T, E]`` (in ``dtype``) from the gradients of the weights and of the scores."""
    grad = torch.zeros_like(probs) if grad_probs is None else grad_probs.float().clone()
    if grad_weights is not None:
        grad = (_scatter_triton if backend == "triton" else _scatter_torch)(grad, tokens, grad_weights)
    dummy = tokens.new_empty((probs.shape[0], 0))
    return topk_gating_backward_op(probs, dummy, dummy, None, grad, None, False, dtype, backend, "softmax", 1.0)


@expert_choice_gating_backward_op.register_fake
def _(probs, tokens, grad_weights, grad_probs, dtype, backend):
    return probs.new_empty(probs.shape, dtype=dtype)


class ExpertChoiceInputs(NamedTuple):
    """The arguments of ``moe_kernels::expert_choice_gating``, in its schema's order."""

    logits: Tensor
    capacity: int
    group_size: int
    backend: str


def _setup_context(ctx, inputs, output):
    args = ExpertChoiceInputs(*inputs)
    weights, tokens, probs = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(tokens)
    ctx.save_for_backward(probs, tokens)
    ctx.dtype, ctx.backend = args.logits.dtype, args.backend


def _backward(ctx, grad_weights, _grad_tokens, grad_probs):
    probs, tokens = ctx.saved_tensors
    if grad_weights is None and grad_probs is None:
        return gradients(ExpertChoiceInputs)
    with torch.no_grad():  # first-order only; no_grad also keeps torch.func from tracing the op
        grad_logits = expert_choice_gating_backward_op(probs, tokens, grad_weights, grad_probs, ctx.dtype, ctx.backend)
    return gradients(ExpertChoiceInputs, logits=grad_logits)


expert_choice_gating_apply = differentiable(expert_choice_gating_op, _setup_context, _backward)


def check_groups(tokens: int, capacity: int, group_size: int | None, backend: str | None = None) -> int:
    """The group size ``group_size`` means for ``tokens`` tokens (``None``: all of them), after
    checking that groups tile the tokens and hold ``capacity`` tokens; ``ValueError`` otherwise."""
    size = tokens if group_size is None else POSITIVE_INT.check("group_size", group_size)
    if tokens == 0:  # no tokens: no groups, nothing to choose
        return max(size, 1)
    if tokens % size:
        raise ValueError(f"group_size ({size}) must divide the number of tokens ({tokens})")
    if capacity > size:
        raise ValueError(f"capacity ({capacity}) cannot exceed the tokens of a group ({size})")
    if backend == "triton" and size > MAX_GROUP:
        raise ValueError(
            f"the Triton kernel sorts groups of up to {MAX_GROUP} tokens, got {size}: pass a smaller "
            "group_size or backend='torch'"
        )
    return max(size, 1)


def expert_choice_gating(
    logits: Tensor, capacity: int, group_size: int | None = None, backend: str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Expert choice: every expert takes the ``capacity`` highest-scoring tokens of each group.

    Args:
        logits: ``[T, E]`` router logits (fp16, bf16 or fp32).
        capacity: ``C``, the tokens each expert takes per group, ``1 <= C <= group_size``.
        group_size: ``S``, consecutive tokens that form a group (a DiT image's tokens); it must
            divide ``T``. ``None``: all ``T`` tokens are one group.
        backend: ``None``/``"auto"``, ``"triton"`` or ``"torch"``.
    Returns:
        ``weights [G, E, C]`` fp32, the chosen tokens' scores in descending order (ties: the
        lower token first), ``tokens [G, E, C]`` int64, their indices in ``logits``' rows, and
        ``probs [T, E]`` fp32, the softmax over experts. Differentiable in ``logits`` through
        ``weights`` and ``probs``.
    """
    check_tensor("logits", logits, 2, FLOAT_DTYPES)
    capacity = POSITIVE_INT.check("capacity", capacity)
    if logits.shape[1] == 0:
        raise ValueError(f"logits must have at least one expert column, got shape {tuple(logits.shape)}")
    backend = resolve_backend(backend, logits.device)
    size = check_groups(logits.shape[0], capacity, group_size, backend)
    return expert_choice_gating_apply(logits, capacity, size, backend)


def slot_weights(weights: Tensor, slot_of_row: Tensor) -> Tensor:
    """The rows' ``weights [S]`` in slot order (each slot is one row: plain stores)."""
    return torch.empty_like(weights).index_copy_(0, slot_of_row.long(), weights)


@custom_op("moe_kernels::expert_choice_ffn")
def expert_choice_ffn_op(
    x: Tensor,
    weights: Tensor,
    tokens: Tensor,
    offsets: Tensor,
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
    """Experts that chose their tokens: expert ``e`` takes ``tokens[offsets[e-1]:offsets[e]]``
    (int64 ``[S]``, distinct within an expert) with ``weights [S]``.

    Returns ``y [T, D]``, what the backward reads where asked for (the pre-activation and ``h``,
    ``[S, *]``, the per-slot outputs ``[S, D]``; else empty along dimension 0), ``slot_of_row``
    and ``token_of_row`` (int32 ``[S]``) and the tokens' slot ``starts [T + 1]``. ``fp8`` as for
    ``moe_kernels::moe_ffn``."""
    routing, starts = chosen_routing(tokens, offsets, x.shape[0])
    w_in, w_out, scales = quantized_experts(w_in, w_out, fp8)
    y, preact, h, out = experts_forward(
        x, slot_weights(weights, routing.slot_of_row), routing, starts, w_in, w_out, b_in, b_out,
        activation, backend, save_preact, scales,
    )  # fmt: skip
    empty = x.new_empty
    return (
        y,
        preact if save_preact else empty((0, w_in.shape[2])),
        h if save_h else empty((0, w_out.shape[1])),
        out if save_out else empty((0, x.shape[1])),
        routing.slot_of_row,
        routing.token_of_row,
        starts,
    )


@expert_choice_ffn_op.register_fake
def _(
    x, weights, tokens, offsets, w_in, w_out, b_in, b_out, activation, backend, save_preact, save_h, save_out, fp8=False
):
    (T, D), S = x.shape, tokens.shape[0]
    index = dict(dtype=torch.int32)
    return (
        x.new_empty((T, D)),
        x.new_empty((S if save_preact else 0, w_in.shape[2])),
        x.new_empty((S if save_h else 0, w_out.shape[1])),
        x.new_empty((S if save_out else 0, D)),
        x.new_empty((S,), **index),
        x.new_empty((S,), **index),
        x.new_empty((T + 1,), **index),
    )


class EcFfnInputs(NamedTuple):
    """The arguments of ``moe_kernels::expert_choice_ffn``, in its schema's order."""

    x: Tensor
    weights: Tensor
    tokens: Tensor
    offsets: Tensor
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


def _ffn_setup_context(ctx, inputs, output):
    args = EcFfnInputs(*inputs)
    _, preact, h, out, slot_of_row, token_of_row, starts = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(
        args.x, args.weights, args.w_in, args.w_out, preact, h, out, slot_of_row, token_of_row, args.offsets, starts
    )
    ctx.activation, ctx.backend, ctx.fp8 = args.activation, args.backend, args.fp8


def _ffn_backward(ctx, grad_y, *_):
    needs = tuple(ctx.needs_input_grad[EcFfnInputs._fields.index(name)] for name in DIFFERENTIABLE)
    if grad_y is None or not any(needs):
        return gradients(EcFfnInputs)
    x, weights, w_in, w_out, preact, h, out, slot_of_row, token_of_row, offsets, starts = ctx.saved_tensors
    check_saved((x, weights, w_in, w_out, preact, h, out), needs)
    with torch.no_grad():  # first-order only; no_grad also keeps torch.func from tracing the op
        grads = list(moe_ffn_backward_op(
            grad_y, x, slot_weights(weights, slot_of_row), w_in, w_out, preact, h, out,
            slot_of_row, token_of_row, offsets, ctx.activation, ctx.backend, *needs, starts, ctx.fp8,
        ))  # fmt: skip
        if needs[1]:  # the weights' gradient, from slot order back to the rows'
            grads[1] = grads[1].index_select(0, slot_of_row)
    return gradients(EcFfnInputs, **{name: grad for name, grad, need in zip(DIFFERENTIABLE, grads, needs) if need})


expert_choice_ffn_apply = differentiable(expert_choice_ffn_op, _ffn_setup_context, _ffn_backward)


def chosen_rows_ffn(
    x, weights, tokens, offsets, w_in, w_out, b_in=None, b_out=None, *, activation: str, backend: str, fp8: bool = False
) -> Tensor:
    """The experts on the tokens they chose, given as expert-major rows (``tokens [S]`` int64,
    ``weights [S]``, ``offsets [E]`` int32 row ends), inputs known to be valid; ``fp8``: the
    GEMMs in FP8 (differentiable)."""
    args = EcFfnInputs(
        x, weights, tokens, offsets, w_in, w_out, b_in, b_out, activation, backend,
        *saves(x, weights, w_in, w_out, b_in), fp8,
    )  # fmt: skip
    return expert_choice_ffn_apply(*args)[0]


def expert_choice_ffn_unchecked(
    x, weights, tokens, w_in, w_out, b_in=None, b_out=None, *, activation: str, backend: str
) -> Tensor:
    """``expert_choice_ffn`` for inputs already known to be valid, with ``backend`` resolved."""
    rows = expert_rows(weights, tokens)
    return chosen_rows_ffn(x, *rows, w_in, w_out, b_in, b_out, activation=activation, backend=backend)


def expert_rows(weights: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``weights, tokens [G, E, C]`` as expert-major rows: ``weights [S]``, ``tokens [S]`` and the
    row ends ``offsets [E]`` (int32), expert ``e``'s ``G * C`` rows ending at ``(e + 1) * G * C``."""
    G, E, C = tokens.shape
    offsets = torch.arange(1, E + 1, device=tokens.device, dtype=torch.int32) * (G * C)
    return weights.transpose(0, 1).reshape(-1), tokens.transpose(0, 1).reshape(-1), offsets


def check_token_ids(tokens: Tensor, num_tokens: int) -> None:
    """``ValueError`` unless every expert's chosen tokens are distinct indices in ``[0, T)``
    (one host sync: for the public API only; the layer makes them itself)."""
    if tokens.numel() == 0:
        return
    low, high = tokens.min().item(), tokens.max().item()
    if low < 0 or high >= num_tokens:
        raise ValueError(f"tokens must be indices in [0, {num_tokens}), got values in [{low}, {high}]")
    per_expert = tokens.transpose(0, 1).reshape(tokens.shape[1], -1).sort(dim=1).values
    if (per_expert[:, 1:] == per_expert[:, :-1]).any():
        raise ValueError("an expert's tokens must be distinct: each (token, expert) pair is chosen at most once")


def expert_choice_ffn(
    x: Tensor,
    weights: Tensor,
    tokens: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    activation: str = "swiglu",
    backend: str | None = None,
    *,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
) -> Tensor:
    """The routed experts under expert choice, with a weighted combine.

    ``y[t] = sum over the (g, e, c) with tokens[g, e, c] = t of weights[g, e, c] * FFN_e(x[t])``:
    0 for a token no expert chose. Expert ``e``'s ``G * C`` tokens are consecutive rows of one
    grouped GEMM (its offsets follow from the shapes: no host sync, no padding), and the combine
    reads each token's 0 to ``E`` slots in expert order (deterministic, no atomics).

    Args:
        x: ``[T, D]`` (fp16, bf16 or fp32).
        weights: ``[G, E, C]`` the chosen tokens' weights (any float dtype), as from
            ``expert_choice_gating``.
        tokens: ``[G, E, C]`` int64 row indices of ``x``; one expert's tokens are distinct.
        w_in, w_out, activation, backend, b_in, b_out: as for ``moe_ffn``.
    Returns:
        ``y [T, D]`` in ``x.dtype``, differentiable in ``x``, ``weights``, the experts' weights
        and their biases.
    """
    biases = check_experts(x, w_in, w_out, b_in, b_out, activation)
    check_tensor("weights", weights, 3, FLOAT_DTYPES)
    check_tensor("tokens", tokens, 3, (torch.int64,))
    if tokens.shape != weights.shape:
        raise ValueError(f"tokens must have the shape of weights {tuple(weights.shape)}, got {tuple(tokens.shape)}")
    check_dim("tokens", tokens, 1, w_in.shape[0], "E, the experts of w_in")
    device = check_same_device(x=x, weights=weights, tokens=tokens, w_in=w_in, w_out=w_out, **biases)
    check_token_ids(tokens, x.shape[0])
    return expert_choice_ffn_unchecked(
        x, weights, tokens, w_in, w_out, b_in, b_out, activation=activation, backend=resolve_backend(backend, device)
    )
