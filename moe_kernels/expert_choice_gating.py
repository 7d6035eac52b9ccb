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

``ExpertChoice`` (``routers/expert_choice.py``) turns the choice into a dispatch for the experts op.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .backend import resolve_backend
from .dispatch import Dispatch, by_expert
from .library import custom_op, differentiable, gradients
from .rules import POSITIVE_INT
from .topk_gating import _gating_triton, topk_gating_backward_op
from .validation import FLOAT_DTYPES, check_tensor

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


def choice_dispatch(weights: Tensor, tokens: Tensor, num_tokens: int) -> Dispatch:
    """The dispatch of an expert choice (``weights, tokens [G, E, C]``) over ``num_tokens``
    tokens: expert ``e``'s ``G * C`` tokens are its rows, consecutive, so the row ends follow
    from the shapes (no host sync) and every expert owns ``G * C`` rows."""
    G, E, C = tokens.shape
    offsets = torch.arange(1, E + 1, device=tokens.device, dtype=torch.int32) * (G * C)
    rows = (t.transpose(0, 1).reshape(-1) for t in (tokens, weights))
    return by_expert(*rows, offsets, num_tokens, rows_per_expert=G * C)
