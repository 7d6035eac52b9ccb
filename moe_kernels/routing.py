"""Token routing: sort the ``T * k`` token slots by expert, stably, without a host sync.

Slot ``s = t * k + j`` is token ``t``'s ``j``-th choice. Routing returns, for the expert-sorted
order of the slots (a "row"), which slot and which token sit at each row, and ``offsets [E]``,
the cumulative row ends of the experts' segments. Within an expert, rows keep slot order, so
the result is deterministic.

The Triton path is a counting sort in three kernels: each block of slots ranks its slots within
their experts and counts them (histogram); one program scans the block counts into each
block's first row per expert (prefix sum); each block then writes its slots to their rows
(scatter).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# A block ranks its slots through a [BLOCK_S, BLOCK_E] one-hot cumsum; this bounds its size.
_ONE_HOT_ELEMENTS = 8192
_SCAN_BLOCKS = 64


class Routing(NamedTuple):
    """The expert-sorted order of the ``S`` token slots (``T * k`` under token choice).

    slot_of_row: ``[S]`` int32, the slot at each row.
    token_of_row: ``[S]`` int32, the token of each row's slot.
    offsets: ``[E]`` int32, cumulative row ends; expert ``e`` owns rows ``offsets[e-1]:offsets[e]``.
    """

    slot_of_row: torch.Tensor
    token_of_row: torch.Tensor
    offsets: torch.Tensor


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


def _route_triton(experts: torch.Tensor, num_experts: int) -> Routing:
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
    if num_blocks > 0:
        _rank_kernel[(num_blocks,)](
            experts, ranks, block_counts, S, num_experts, k, *experts.stride(), BLOCK_S=block_s, BLOCK_E=block_e
        )
    _scan_kernel[(1,)](
        block_counts, block_starts, offsets, num_blocks, num_experts, BLOCK_B=_SCAN_BLOCKS, BLOCK_E=block_e
    )
    if num_blocks > 0:
        _scatter_kernel[(num_blocks,)](
            experts,
            ranks,
            block_starts,
            slot_of_row,
            token_of_row,
            S,
            num_experts,
            k,
            *experts.stride(),
            BLOCK_S=block_s,
        )
    return Routing(slot_of_row, token_of_row, offsets)


def _route_torch(experts: torch.Tensor, num_experts: int) -> Routing:
    k = experts.shape[1]
    sorted_experts, slot_of_row = torch.sort(experts.reshape(-1), stable=True)
    ids = torch.arange(num_experts, device=experts.device, dtype=sorted_experts.dtype)
    offsets = torch.searchsorted(sorted_experts, ids, right=True)
    slot_of_row = slot_of_row.to(torch.int32)
    return Routing(slot_of_row, slot_of_row // k, offsets.to(torch.int32))


def row_of_slot(slot_of_row: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: where each slot's row is."""
    rows = torch.arange(slot_of_row.shape[0], dtype=slot_of_row.dtype, device=slot_of_row.device)
    return torch.empty_like(slot_of_row).scatter_(0, slot_of_row.long(), rows)


def route(experts: torch.Tensor, num_experts: int, backend: str) -> Routing:
    """Sort the slots of ``experts [T, k]`` (ids in ``[0, E)``, assumed valid) by expert."""
    if backend == "triton":
        return _route_triton(experts, num_experts)
    return _route_torch(experts, num_experts)


def chosen_routing(tokens: torch.Tensor, offsets: torch.Tensor, num_tokens: int) -> tuple[Routing, torch.Tensor]:
    """The slots of experts that chose their tokens: expert ``e`` took ``tokens[offsets[e-1]:
    offsets[e]]`` (int64 rows, expert-major, distinct within an expert; assumed valid). Every
    (token, chooser) pair is a slot, numbered token-major and in expert order within a token.

    Returns the ``Routing`` and ``starts [T + 1]`` int32, where each token's slots begin. Plain
    tensor ops with static shapes: no host sync, deterministic.
    """
    E, S = offsets.shape[0], tokens.shape[0]
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    expert_of_row = torch.repeat_interleave(torch.arange(E, device=tokens.device), counts, output_size=S)
    # An exclusive scan of the [T, E] chosen mask numbers the slots token-major, experts in order.
    pair = tokens * E + expert_of_row
    chosen = torch.zeros(num_tokens * E, dtype=torch.int32, device=tokens.device).index_fill_(0, pair, 1)
    ends = chosen.cumsum(0, dtype=torch.int32)
    starts = torch.cat([ends.new_zeros(1), ends.view(num_tokens, E)[:, -1]])
    return Routing(ends.index_select(0, pair) - 1, tokens.to(torch.int32), offsets), starts
