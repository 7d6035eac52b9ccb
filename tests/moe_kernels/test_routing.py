import pytest
import torch

from moe_kernels.routing import route
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
def test_route_sorts_slots_stably_by_expert(backend, name, experts):
    E = 8
    experts = experts.to(DEVICE)
    T, k = experts.shape
    slot_of_row, token_of_row, offsets = route(experts, E, backend)
    assert slot_of_row.dtype == token_of_row.dtype == offsets.dtype == torch.int32
    flat = experts.reshape(-1).long()
    counts = torch.bincount(flat, minlength=E)
    assert torch.equal(offsets.long(), counts.cumsum(0))
    # A permutation of the slots whose experts are sorted, slots ascending within an expert.
    expected = torch.sort(flat, stable=True).indices
    assert torch.equal(slot_of_row.long(), expected)
    assert torch.equal(token_of_row.long(), expected // k)


def test_backends_agree_on_a_large_batch():
    # With 64 experts a routing block holds 128 slots, so 8400 slots make 66 blocks: more than
    # the scan kernel reads at once, so its running total must carry across its loop.
    experts = torch.randint(0, 64, (4200, 2), device=DEVICE)
    expected = torch.sort(experts.reshape(-1), stable=True).indices
    slot_of_row, _, offsets = route(experts, 64, "triton")
    assert torch.equal(slot_of_row.long(), expected)
    assert torch.equal(offsets.long(), torch.bincount(experts.reshape(-1), minlength=64).cumsum(0))
    for a, b in zip(route(experts, 64, "triton"), route(experts, 64, "torch")):
        assert torch.equal(a, b)


def test_ids_out_of_range_are_left_out():
    """Ids outside [0, E) only reach routing when the host check is skipped (CUDA-graph
    capture): the kernels give them no row and write nothing out of bounds. (PyTorch's own
    indexing checks its bounds, so the torch backend needs no such guard.)"""
    experts = torch.tensor([[0, 3], [9, 1], [-1, 2]], device=DEVICE)
    slot_of_row, token_of_row, offsets = route(experts, 4, "triton")
    assert offsets.tolist() == [1, 2, 3, 4]
    assert slot_of_row[:4].tolist() == [0, 3, 5, 1]
