"""``moe_kernels.parallel.expert_parallel`` against the unsharded ``MoE``, on 2 and 4 processes."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import moe_kernels as mk
from moe_kernels.parallel import EXPERT_PARAMETERS, expert_parallel
from tests.distributed.helpers import run_processes

TOL = dict(atol=1e-5, rtol=1e-5)


# DeepSeek-V3-style routing and a gated shared expert, to check the options travel too.
DEEPSEEK = dict(
    score="sigmoid",
    selection_bias=True,
    num_groups=2,
    topk_groups=1,
    normalize_weights=True,
    routed_scale=2.5,
    shared_gate=True,
)


def _layer(backend: str, num_experts: int, top_k: int, unused: int, options: dict) -> mk.MoE:
    """A layer whose experts of rank 0 draw most tokens and expert ``unused`` draws none: the
    tokens are positive, so a strongly negative router row is never among the top k."""
    torch.manual_seed(0)
    layer = mk.MoE(8, 12, num_experts, top_k, num_shared_experts=1, backend=backend, **options)
    if getattr(layer.router, "expert_bias", None) is not None:
        layer.router.expert_bias.normal_(0, 0.1)
    with torch.no_grad():
        layer.router.weight[0] += 0.5
        layer.router.weight[unused] = -10.0
    return layer


def _tokens(world_size: int, counts: list[int], step: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(step)
    xs = [torch.rand(n, 8, generator=generator) + 0.1 for n in counts[:world_size]]
    gs = [torch.randn(n, 8, generator=generator) for n in counts[:world_size]]
    return xs, gs


def _check_against_unsharded(rank: int, world_size: int, backend: str) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    # Uneven token counts, a rank with no tokens at all (it sends nothing), k=1 and k=E.
    for num_experts, top_k, counts, options in (
        (8, 2, [7, 0, 5, 3], {}),
        (4, 1, [6, 9, 1, 4], dict(expert_biases=True, activation="gelu_tanh")),
        (4, 4, [3, 5, 2, 6], {}),
        (8, 3, [4, 6, 0, 5], DEEPSEEK),
        (8, 2, [5, 7, 3, 0], dict(router="promoe", unconditional_experts=3)),  # cosine routing, one side
    ):
        if num_experts % world_size:
            continue
        unused = num_experts - 1 if top_k < num_experts - 1 else None
        layer = _layer(backend, num_experts, top_k, unused if unused is not None else 0, options)
        if unused is None:
            layer.router.weight.data.normal_()
        reference = copy.deepcopy(layer)
        expert_parallel(layer, mesh)
        xs, gs = _tokens(world_size, counts, num_experts + top_k)
        x = xs[rank].clone().requires_grad_()
        y = layer(x)
        (y * gs[rank]).sum().backward()

        x_all = torch.cat(xs).requires_grad_()
        y_all = reference(x_all)
        (y_all * torch.cat(gs)).sum().backward()
        rows = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
        torch.testing.assert_close(y, y_all[rows], **TOL)
        torch.testing.assert_close(x.grad, x_all.grad[rows], **TOL)
        local = num_experts // world_size
        experts = slice(rank * local, (rank + 1) * local)
        sharded = [name for name in EXPERT_PARAMETERS if getattr(layer, name) is not None]
        for name in sharded:
            grad = getattr(layer, name).grad
            assert grad.placements == getattr(layer, name).placements
            torch.testing.assert_close(grad.to_local(), getattr(reference, name).grad[experts], **TOL)
        # Replicated parameters: this rank's part; summed over ranks, the unsharded gradient.
        full = dict(reference.named_parameters())
        for name, mine in layer.named_parameters():
            if name not in sharded:
                total = mine.grad.clone()
                dist.all_reduce(total)
                torch.testing.assert_close(total, full[name].grad, **TOL, msg=lambda m: f"{name}: {m}")
        # The balance loss and expert counts are this rank's own, as the unsharded layer on its tokens.
        if counts[rank]:
            reference(xs[rank])
            torch.testing.assert_close(layer.aux_loss, reference.aux_loss, **TOL)
            torch.testing.assert_close(layer.expert_counts, reference.expert_counts)


def _check_expert_choice(rank: int, world_size: int, backend: str) -> None:
    """Expert choice over each rank's images: the same outputs and gradients as unsharded, and
    no host sync (no tensor is read back while the layer runs forward and backward)."""
    mesh = init_device_mesh("cpu", (world_size,))
    for options, capacity_factor in (({}, 2), (dict(expert_biases=True, activation="gelu_tanh"), 3)):
        torch.manual_seed(0)
        layer = mk.MoE(
            8, 12, 4, 2, num_shared_experts=1, router="expert-choice", group_size=6, backend=backend, **options
        )
        layer.router.capacity_factor = capacity_factor
        reference = copy.deepcopy(layer)
        expert_parallel(layer, mesh)
        xs, gs = _tokens(world_size, [12] * world_size, 7)
        x = xs[rank].clone().requires_grad_()
        with _no_host_reads():
            y = layer(x.view(2, 6, 8)).view(12, 8)
            (y * gs[rank]).sum().backward()
        x_all = torch.cat(xs).requires_grad_()
        y_all = reference(x_all.view(-1, 6, 8)).view(-1, 8)
        (y_all * torch.cat(gs)).sum().backward()
        rows = slice(12 * rank, 12 * (rank + 1))
        torch.testing.assert_close(y, y_all[rows], **TOL)
        torch.testing.assert_close(x.grad, x_all.grad[rows], **TOL)
        _check_gradients(layer, reference, rank, world_size)


def _check_expert_race(rank: int, world_size: int, backend: str) -> None:
    """Expert Race races each rank's own tokens: each rank's outputs are the unsharded layer's on
    its tokens alone, and the gradients summed over ranks those of the per-rank races summed."""
    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    layer = mk.MoE(8, 12, 4, 2, num_shared_experts=1, router="expert-race", backend=backend)
    reference = copy.deepcopy(layer)
    expert_parallel(layer, mesh)
    xs, gs = _tokens(world_size, [9, 4, 7, 5], 11)
    x = xs[rank].clone().requires_grad_()
    y = layer(x)
    (y * gs[rank]).sum().backward()
    x_refs = [xi.clone().requires_grad_() for xi in xs]
    y_refs = [reference(xi) for xi in x_refs]  # one race per rank's tokens
    sum((yi * gi).sum() for yi, gi in zip(y_refs, gs)).backward()
    torch.testing.assert_close(y, y_refs[rank], **TOL)
    torch.testing.assert_close(x.grad, x_refs[rank].grad, **TOL)
    _check_gradients(layer, reference, rank, world_size)


def _check_gradients(layer: mk.MoE, reference: mk.MoE, rank: int, world_size: int) -> None:
    """A sharded 4-expert layer's expert gradients are the reference's for this rank's experts,
    and its router's, summed over ranks, the reference's."""
    experts = slice(rank * 4 // world_size, (rank + 1) * 4 // world_size)
    for name in EXPERT_PARAMETERS:
        if getattr(layer, name) is not None:
            torch.testing.assert_close(
                getattr(layer, name).grad.to_local(), getattr(reference, name).grad[experts], **TOL
            )
    total = layer.router.weight.grad.clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total, reference.router.weight.grad, **TOL)


class _no_host_reads:
    """Fail on ``Tensor.item`` and ``Tensor.tolist`` (the host syncs a CUDA graph cannot hold)."""

    def __enter__(self):
        self.saved = torch.Tensor.item, torch.Tensor.tolist

        def refuse(*_args, **_kwargs):
            raise AssertionError("a host read in a layer that should have none")

        torch.Tensor.item = torch.Tensor.tolist = refuse

    def __exit__(self, *_exc):
        torch.Tensor.item, torch.Tensor.tolist = self.saved


def _check_against_unsharded_and_errors(rank: int, world_size: int, backend: str) -> None:
    _check_against_unsharded(rank, world_size, backend)
    _check_expert_choice(rank, world_size, backend)
    _check_expert_race(rank, world_size, backend)
    if world_size == 2:
        _check_errors(rank, world_size)


@pytest.mark.parametrize("world_size", [2, 4])
def test_expert_parallel_matches_unsharded_torch(world_size):
    run_processes(_check_against_unsharded_and_errors, world_size, "torch")


def _check_both_routings(rank: int, world_size: int, backend: str) -> None:
    _check_against_unsharded(rank, world_size, backend)
    _check_expert_choice(rank, world_size, backend)


def test_expert_parallel_matches_unsharded_triton():
    run_processes(_check_both_routings, 2, "triton")


def _check_errors(rank: int, world_size: int) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    with pytest.raises(ValueError, match="divisible by the expert-parallel degree"):
        expert_parallel(mk.MoE(8, 8, 3, 1), mesh)
    with pytest.raises(TypeError, match="expects a moe_kernels.MoE"):
        expert_parallel(torch.nn.Linear(2, 2), mesh)
    with pytest.raises(ValueError, match="must be 1-D"):
        expert_parallel(mk.MoE(8, 8, 4, 1), init_device_mesh("cpu", (1, world_size), mesh_dim_names=("dp", "ep")))
    layer = expert_parallel(mk.MoE(8, 8, 4, 1), mesh)
    with pytest.raises(ValueError, match="already expert-parallel"):
        expert_parallel(layer, mesh)


@pytest.mark.parametrize("frozen", ["w_in", "w_out"])
def test_sharding_keeps_frozen_experts_frozen(frozen):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        layer = mk.MoE(8, 12, 4, 2, backend="torch")
        getattr(layer, frozen).requires_grad_(False)
        expert_parallel(layer, init_device_mesh("cpu", (2,)))
        assert {name: getattr(layer, name).requires_grad for name in ("w_in", "w_out")} == {
            "w_in": frozen != "w_in",
            "w_out": frozen != "w_out",
        }
        assert frozen not in {name for name, p in layer.named_parameters() if p.requires_grad}
    finally:
        dist.destroy_process_group()
