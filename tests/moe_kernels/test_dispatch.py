import pytest
import torch

from moe_kernels.dispatch import by_expert, by_token, sort_by_expert
from tests.moe_kernels.helpers import BACKENDS, DEVICE


def _cases():
    yield "random", torch.randint(0, 8, (37, 2))
    yield "T=1", torch.tensor([[3, 1]])
    yield "k=E", torch.stack([torch.randperm(5) for _ in range(9)])
    yield "empty experts", torch.randint(2, 4, (50, 2))
    yield "all on one expert", torch.full((64, 1), 6)
    yield "many blocks", torch.randint(0, 3, (3000, 2))
    yield "no tokens", torch.zeros(0, 2, dtype=torch.long)
    yield "int32, non-contiguous", torch.randint(0, 8, (2, 21), dtype=torch.int32).t()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,experts", list(_cases()), ids=[name for name, _ in _cases()])
def test_sort_by_expert_sorts_slots_stably_by_expert(backend, name, experts):
    E = 8
    experts = experts.to(DEVICE)
    T, k = experts.shape
    slot_of_row, token_of_row, offsets = sort_by_expert(experts, E, backend)
    assert slot_of_row.dtype == token_of_row.dtype == offsets.dtype == torch.int32
    flat = experts.reshape(-1).long()
    counts = torch.bincount(flat, minlength=E)
    assert torch.equal(offsets.long(), counts.cumsum(0))
    # A permutation of the slots whose experts are sorted, slots ascending within an expert.
    expected = torch.sort(flat, stable=True).indices
    assert torch.equal(slot_of_row.long(), expected)
    assert torch.equal(token_of_row.long(), expected // k)


def test_backends_agree_on_a_large_batch():
    # With 64 experts a sorting block holds 128 slots, so 8400 slots make 66 blocks: more than
    # the scan kernel reads at once, so its running total must carry across its loop.
    experts = torch.randint(0, 64, (4200, 2), device=DEVICE)
    expected = torch.sort(experts.reshape(-1), stable=True).indices
    slot_of_row, _, offsets = sort_by_expert(experts, 64, "triton")
    assert torch.equal(slot_of_row.long(), expected)
    assert torch.equal(offsets.long(), torch.bincount(experts.reshape(-1), minlength=64).cumsum(0))
    for a, b in zip(sort_by_expert(experts, 64, "triton"), sort_by_expert(experts, 64, "torch")):
        assert torch.equal(a, b)


def test_ids_out_of_range_are_left_out():
    """Ids outside [0, E) only reach routing when the host check is skipped (CUDA-graph
    capture): the kernels give them no row and write nothing out of bounds. (PyTorch's own
    indexing checks its bounds, so the torch backend needs no such guard.)"""
    experts = torch.tensor([[0, 3], [9, 1], [-1, 2]], device=DEVICE)
    slot_of_row, token_of_row, offsets = sort_by_expert(experts, 4, "triton")
    assert offsets.tolist() == [1, 2, 3, 4]
    assert slot_of_row[:4].tolist() == [0, 3, 5, 1]


def test_by_expert_numbers_the_slots_token_major_in_expert_order():
    # Expert 0 took tokens 0, 3; expert 1 took 3, 1; expert 2 took 2, 3 (of T=5).
    tokens = torch.tensor([0, 3, 3, 1, 2, 3])
    weights = torch.arange(6.0) / 10
    d = by_expert(tokens, weights, torch.tensor([2, 4, 6], dtype=torch.int32), 5, rows_per_expert=2)
    # Slots: token 0 (e0), 1 (e1), 2 (e2), 3 (e0, e1, e2); token 4 has none.
    assert d.starts.tolist() == [0, 1, 2, 3, 6, 6]
    assert d.token_of_row.tolist() == [0, 3, 3, 1, 2, 3]
    assert d.slot_of_row.tolist() == [0, 3, 4, 1, 2, 5]
    assert d.offsets.tolist() == [2, 4, 6] and d.counts.tolist() == [2, 2, 2] and d.rows_per_expert == 2
    # Each row's weight moved to its slot.
    assert torch.equal(d.weights[d.slot_of_row.long()], weights)


@pytest.mark.parametrize("backend", BACKENDS)
def test_by_token_slots_are_token_major(backend):
    experts = torch.tensor([[2, 0], [0, 1], [2, 1]], device=DEVICE)
    weights = torch.rand(3, 2, device=DEVICE)
    d = by_token(experts, weights, 3, backend)
    assert torch.equal(d.weights, weights.reshape(-1)) and d.starts is None and d.slots(3) == 2
    assert d.counts.tolist() == [2, 2, 2]
