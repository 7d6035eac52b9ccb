"""The dispatch: which rows each expert computes, in which order, and how their outputs combine.

A router's decision in the one form the experts op (``experts.py``) runs. Each (token, expert)
pair a router chooses is a *slot*. A token's slots are consecutive, so the combine sums each
token's slots in a fixed order (deterministic, no atomics); the experts read the slots in
expert-major *row* order, an expert's rows one segment of each grouped GEMM:

    weights       [S]        each slot's routing weight, in slot order (differentiable)
    slot_of_row   [S] int32  the slot at each row
    token_of_row  [S] int32  the token of each row's slot
    offsets       [E] int32  cumulative row ends: expert e owns rows offsets[e-1]:offsets[e]
    starts        [T+1] int32 where each token's slots begin; None when every token owns S/T slots

Two builders serve every router:

* ``by_token(experts [T, k], weights [T, k])``: each token chose ``k`` experts (token choice).
  Slot ``t * k + j`` is token ``t``'s ``j``-th choice. The rows are the slots sorted stably by
  expert, by ``moe_kernels::sort_by_expert``; its Triton path is a counting sort in three kernels:
  each block of slots ranks its slots within their experts and counts them (histogram), one
  program scans the block counts into each block's first row per expert (prefix sum), each block
  writes its slots to their rows (scatter). No host sync.
* ``by_expert(tokens [S], weights [S], offsets [E], T)``: each expert chose its tokens, given as
  expert-major rows (expert choice, DiffMoE; any top-K over (token, expert) pairs). A token
  owns one slot per expert that chose it, 0 to E, numbered token-major and in expert order
  within a token by one exclusive scan of the ``[T, E]`` chosen mask. Plain tensor ops with
  static shapes: no host sync.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .library import custom_op

Tensor = torch.Tensor


class Dispatch(NamedTuple):
    """Which rows each expert computes, in which order, and each slot's weight (see the module).

    ``rows_per_expert``: where every expert owns the same number of rows whatever the data
    (expert choice: ``G * C``), that number, so that expert parallelism knows its exchange sizes
    without reading them back; else ``None``.
    """

    weights: Tensor
    slot_of_row: Tensor
    token_of_row: Tensor
    offsets: Tensor
    starts: Tensor | None = None
    rows_per_expert: int | None = None

    def slots(self, num_tokens: int) -> int | Tensor:
        """How the combine finds each of ``num_tokens`` tokens' slots: ``starts``, or the number
        of slots every token owns."""
        if self.starts is not None:
            return self.starts
        return self.weights.shape[0] // num_tokens if num_tokens else 1

    @property
    def counts(self) -> Tensor:
        """``[E]`` int32: each expert's rows."""
        return torch.diff(self.offsets, prepend=self.offsets.new_zeros(1))


# A block ranks its slots through a [BLOCK_S, BLOCK_E] one-hot cumsum; this bounds its size.
_ONE_HOT_ELEMENTS = 8192
_SCAN_BLOCKS = 64


@triton.jit
def _rank_kernel(
    experts_ptr,
    ranks_ptr,
    block_counts_ptr,
    S,
    E,
    K,
    stride_t,
    stride_k,
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    slots = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = slots < S
    experts = tl.load(experts_ptr + (slots // K) * stride_t + (slots % K) * stride_k, mask=ok, other=-1)
    one_hot = (experts[:, None] == tl.arange(0, BLOCK_E)[None, :]).to(tl.int32)
    # An inclusive cumsum down the one-hot columns counts, for each slot, the earlier slots of
    # its block that chose the same expert.
    ranks = tl.sum(tl.cumsum(one_hot, axis=0) * one_hot, axis=1) - 1
    tl.store(ranks_ptr + slots, ranks, mask=ok)
    cols = tl.arange(0, BLOCK_E)
    tl.store(block_counts_ptr + pid * E + cols, tl.sum(one_hot, axis=0), mask=cols < E)


@triton.jit
def _scan_kernel(
    block_counts_ptr,
    block_starts_ptr,
    offsets_ptr,
    num_blocks,
    E,
    BLOCK_B: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    totals = tl.zeros([BLOCK_E], dtype=tl.int32)
    for b0 in range(0, num_blocks, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        mask = (blocks < num_blocks)[:, None] & col_ok[None, :]
        totals += tl.sum(tl.load(block_counts_ptr + blocks[:, None] * E + cols[None, :], mask=mask, other=0), axis=0)
    ends = tl.cumsum(totals, axis=0)
    tl.store(offsets_ptr + cols, ends, mask=col_ok)
    running = ends - totals
    for b0 in range(0, num_blocks, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        mask = (blocks < num_blocks)[:, None] & col_ok[None, :]
        counts = tl.load(block_counts_ptr + blocks[:, None] * E + cols[None, :], mask=mask, other=0)
        starts = running[None, :] + tl.cumsum(counts, axis=0) - counts
        tl.store(block_starts_ptr + blocks[:, None] * E + cols[None, :], starts, mask=mask)
        running += tl.sum(counts, axis=0)


@triton.jit
def _scatter_kernel(
    experts_ptr,
    ranks_ptr,
    block_starts_ptr,
    slot_of_row_ptr,
    token_of_row_ptr,
    S,
    E,
    K,
    stride_t,
    stride_k,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    slots = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = slots < S
    tokens = slots // K
    experts = tl.load(experts_ptr + tokens * stride_t + (slots % K) * stride_k, mask=ok, other=0)
    # An id outside [0, E) was counted nowhere and has no row: writing it would reach past the
    # tables. The public ops reject such ids on the host; this guards the paths that skip that check.
    ok &= (experts >= 0) & (experts < E)
    ranks = tl.load(ranks_ptr + slots, mask=ok, other=0)
    rows = tl.load(block_starts_ptr + pid * E + experts, mask=ok, other=0) + ranks
    tl.store(slot_of_row_ptr + rows, slots, mask=ok)
    tl.store(token_of_row_ptr + rows, tokens, mask=ok)


def _sort_triton(experts: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    T, k = experts.shape
    S = T * k
    block_e = triton.next_power_of_2(num_experts)
    block_s = max(16, min(1024, _ONE_HOT_ELEMENTS // block_e))
    num_blocks = triton.cdiv(S, block_s)
    device = experts.device
    slot_of_row = torch.empty(S, dtype=torch.int32, device=device)
    token_of_row = torch.empty(S, dtype=torch.int32, device=device)
    offsets = torch.empty(num_experts, dtype=torch.int32, device=device)
    ranks = torch.empty(S, dtype=torch.int32, device=device)
    block_counts = torch.empty((num_blocks, num_experts), dtype=torch.int32, device=device)
    block_starts = torch.empty_like(block_counts)
    strides = experts.stride()
    if num_blocks > 0:
        _rank_kernel[(num_blocks,)](
            experts, ranks, block_counts, S, num_experts, k, *strides, BLOCK_S=block_s, BLOCK_E=block_e
        )
    _scan_kernel[(1,)](
        block_counts, block_starts, offsets, num_blocks, num_experts, BLOCK_B=_SCAN_BLOCKS, BLOCK_E=block_e
    )
    if num_blocks > 0:
        _scatter_kernel[(num_blocks,)](
            experts, ranks, block_starts, slot_of_row, token_of_row, S, num_experts, k, *strides, BLOCK_S=block_s
        )
    return slot_of_row, token_of_row, offsets


def _sort_torch(experts: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    k = experts.shape[1]
    sorted_experts, slot_of_row = torch.sort(experts.reshape(-1), stable=True)
    ids = torch.arange(num_experts, device=experts.device, dtype=sorted_experts.dtype)
    offsets = torch.searchsorted(sorted_experts, ids, right=True)
    slot_of_row = slot_of_row.to(torch.int32)
    return slot_of_row, slot_of_row // k, offsets.to(torch.int32)


@custom_op("moe_kernels::sort_by_expert")
def sort_by_expert(experts: Tensor, num_experts: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """The slots of ``experts [T, k]`` (ids in ``[0, E)``, assumed valid) sorted stably by expert:
    ``slot_of_row [S]``, ``token_of_row [S]`` and ``offsets [E]``, int32. An id outside ``[0, E)``
    gets no row on the Triton path (it is never written out of bounds)."""
    sort = _sort_triton if backend == "triton" else _sort_torch
    return sort(experts, num_experts)


@sort_by_expert.register_fake
def _(experts, num_experts, backend):
    S = experts.shape[0] * experts.shape[1]
    index = dict(dtype=torch.int32)
    return (
        experts.new_empty((S,), **index),
        experts.new_empty((S,), **index),
        experts.new_empty((num_experts,), **index),
    )


def by_token(experts: Tensor, weights: Tensor, num_experts: int, backend: str) -> Dispatch:
    """The dispatch of ``k`` experts per token: ``experts [T, k]`` (ids in ``[0, E)``, assumed
    valid) with their ``weights [T, k]``; token ``t``'s ``j``-th choice is slot ``t * k + j``."""
    slot_of_row, token_of_row, offsets = sort_by_expert(experts, num_experts, backend)
    return Dispatch(weights.reshape(-1), slot_of_row, token_of_row, offsets)


def by_expert(
    tokens: Tensor, weights: Tensor, offsets: Tensor, num_tokens: int, rows_per_expert: int | None = None
) -> Dispatch:
    """The dispatch of experts that chose their tokens: expert ``e`` took ``tokens[offsets[e-1]:
    offsets[e]]`` (int64 ``[S]``, distinct within an expert; assumed valid) with ``weights [S]``,
    of ``num_tokens`` tokens. Every (token, chooser) pair is a slot, numbered token-major and in
    expert order within a token. ``rows_per_expert``: see ``Dispatch``."""
    E, S = offsets.shape[0], tokens.shape[0]
    expert_of_row = torch.repeat_interleave(
        torch.arange(E, device=tokens.device), torch.diff(offsets, prepend=offsets.new_zeros(1)), output_size=S
    )
    # An exclusive scan of the [T, E] chosen mask numbers the slots token-major, experts in order.
    pair = tokens * E + expert_of_row
    chosen = torch.zeros(num_tokens * E, dtype=torch.int32, device=tokens.device).index_fill_(0, pair, 1)
    ends = chosen.cumsum(0, dtype=torch.int32)
    starts = torch.cat([ends.new_zeros(1), ends.view(num_tokens, E)[:, -1]])
    slot_of_row = ends.index_select(0, pair) - 1
    # Each slot is one row: the weights reach slot order by plain stores (differentiably).
    slot_weights = torch.zeros_like(weights).index_copy(0, slot_of_row.long(), weights)
    return Dispatch(slot_weights, slot_of_row, tokens.to(torch.int32), offsets, starts, rows_per_expert)


def row_of_slot(slot_of_row: Tensor) -> Tensor:
    """The inverse permutation: where each slot's row is."""
    rows = torch.arange(slot_of_row.shape[0], dtype=slot_of_row.dtype, device=slot_of_row.device)
    return torch.empty_like(slot_of_row).scatter_(0, slot_of_row.long(), rows)
