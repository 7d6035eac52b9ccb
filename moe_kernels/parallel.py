"""Expert parallelism: the experts of an ``MoE`` split over the ranks of a 1-D ``DeviceMesh``.

Rank ``r`` of ``P`` holds experts ``r * E/P`` to ``(r + 1) * E/P - 1``: ``w_in`` and ``w_out`` (and the biases)
become ``DTensor`` parameters sharded on dimension 0, so state dicts and
``torch.distributed.checkpoint`` see the full expert tensors and can reshard them. Everything
else (router, shared experts and their gate) stays replicated. A forward, on each rank:

    router, top-k        on the rank's own tokens (and its balance loss, from them alone)
    routing              the token slots sorted by expert, hence grouped by destination rank
    counts exchange      all_to_all of the per-expert slot counts; one host sync for the sizes
    token exchange       all_to_all of the slots' rows (autograd-aware)
    local experts        ``moe_ffn`` over the received rows, one slot each, unweighted
    reverse exchange     all_to_all of the outputs back to the ranks that sent them
    combine              the routing-weighted sum over each token's k slots

No token is dropped: a rank receives however many rows its experts were chosen for. The sizes
of the row exchange are data: reading them costs one device-to-host sync per layer (torchtitan's
expert parallelism does the same), which ``torch.compile`` sees as a graph break and which a
CUDA graph cannot capture.

Expert choice needs neither the counts exchange nor the sync: every expert takes ``C`` tokens of
every group, so with the same number of tokens on every rank (a data-parallel batch), each rank
sends ``E/P * G * C`` rows to each rank and receives as many from each; the sizes follow from
the shapes, and the layer can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .combine import combine_torch
from .expert_choice import expert_rows, slot_weights
from .ffn import moe_ffn_unchecked
from .routing import chosen_routing, route, row_of_slot

if TYPE_CHECKING:
    from .layer import MoE

EXPERT_PARAMETERS = ("w_in", "w_out", "b_in", "b_out")


def expert_parallel(moe: MoE, mesh: DeviceMesh) -> MoE:
    """Shard ``moe``'s routed experts over ``mesh`` (1-D, its size dividing ``num_experts``), in
    place, and return it.

    Every rank must hold the same weights when this is called (build the model from one seed):
    each keeps its own slice of them. Afterwards, on every rank, ``moe(x)`` equals the unsharded
    layer applied to that rank's ``x``, and each local expert's gradient is the gradient over all
    ranks' tokens (summed: with a loss averaged over ``N`` data-parallel ranks, divide by ``N``,
    as a data-parallel wrapper does for the replicated parameters).
    """
    from .layer import MoE

    if not isinstance(moe, MoE):
        raise TypeError(f"expert_parallel expects a moe_kernels.MoE, got {type(moe).__name__}")
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim != 1:
        raise ValueError(
            f"mesh must be 1-D (the expert-parallel ranks), got {mesh.ndim}-D; pass a sub-mesh, e.g. mesh['ep']"
        )
    if moe.expert_mesh is not None:
        raise ValueError("this MoE is already expert-parallel")
    if moe.fp8:
        raise ValueError("an MoE with FP8 experts (to_fp8) serves inference on one device: shard it before to_fp8")
    if moe.precision == "fp8":
        raise ValueError("FP8 experts do not run under expert parallelism yet: set the layer's precision to None")
    size = mesh.size()
    if moe.num_experts % size:
        raise ValueError(f"num_experts ({moe.num_experts}) must be divisible by the expert-parallel degree ({size})")
    if moe.w_in.device.type not in (mesh.device_type, "meta"):  # meta: build, shard, then materialise
        raise ValueError(f"the MoE's parameters are on {moe.w_in.device} but the mesh is on {mesh.device_type}")
    local = moe.num_experts // size
    first = mesh.get_local_rank() * local
    for name in EXPERT_PARAMETERS:
        full = getattr(moe, name)
        if full is None:  # a layer without expert biases
            continue
        shard = full.detach()[first : first + local].clone()
        sharded = DTensor.from_local(shard, mesh, [Shard(0)], run_check=False)
        setattr(moe, name, torch.nn.Parameter(sharded, requires_grad=full.requires_grad))
    moe.expert_mesh = mesh
    return moe


def expert_parallel_ffn(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
    *,
    activation: str,
    backend: str,
    mesh: DeviceMesh,
) -> torch.Tensor:
    """``moe_ffn`` with the experts spread over ``mesh``: this rank's tokens, all ranks' experts.

    Args:
        x: ``[T, D]``, this rank's tokens.
        weights, experts: ``[T, k]``, routing weights and global expert ids in ``[0, E)``.
        w_in, w_out: this rank's experts, ``[E/P, D, 2H or H]`` and ``[E/P, H, D]`` (local tensors).
        b_in, b_out: their biases, ``[E/P, 2H or H]`` and ``[E/P, D]``, or ``None``.
    Returns:
        ``y [T, D]`` in ``x.dtype``.
    """
    group = mesh.get_group()
    size, local = mesh.size(), w_in.shape[0]
    T, k = experts.shape
    routing = route(experts, local * size, backend)
    # Slot counts per expert; the slots are sorted by expert, so by destination rank too.
    counts = torch.diff(routing.offsets, prepend=routing.offsets.new_zeros(1))
    received = funcol.all_to_all_single(counts, None, None, group)  # [P * E/P]: source-major
    sizes = torch.stack([counts.view(size, local).sum(1), received.view(size, local).sum(1)])
    send, recv = sizes.tolist()  # the one host sync
    rows = funcol.all_to_all_single_autograd(x.index_select(0, routing.token_of_row), recv, send, group)
    out = _local_experts(rows, received, size, w_in, w_out, b_in, b_out, activation, backend)
    out = funcol.all_to_all_single_autograd(out, send, recv, group)
    out = out.index_select(0, row_of_slot(routing.slot_of_row))
    return combine_torch(out, weights.flatten(), k, T, x.dtype)


def _local_experts(
    rows: torch.Tensor, per_expert: torch.Tensor, size: int, w_in, w_out, b_in, b_out, activation, backend
) -> torch.Tensor:
    """This rank's experts on the ``rows`` it received, ``size`` source-major blocks of
    ``[E/P]`` expert segments whose sizes are ``per_expert [P * E/P]``; outputs in received order."""
    local = w_in.shape[0]
    local_experts = torch.arange(local, device=rows.device, dtype=torch.int32).repeat(size)
    expert_of_row = torch.repeat_interleave(local_experts, per_expert, output_size=rows.shape[0])
    ones = rows.new_ones((rows.shape[0], 1))
    return moe_ffn_unchecked(
        rows, ones, expert_of_row[:, None], w_in, w_out, b_in, b_out, activation=activation, backend=backend
    )


def expert_choice_parallel_ffn(
    x: torch.Tensor,
    weights: torch.Tensor,
    tokens: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
    *,
    activation: str,
    backend: str,
    mesh: DeviceMesh,
) -> torch.Tensor:
    """``expert_choice_ffn`` with the experts spread over ``mesh``, without a host sync.

    Args:
        x: ``[T, D]``, this rank's tokens; every rank must pass the same ``T`` (the exchange
            sizes are computed, not exchanged).
        weights, tokens: ``[G, E, C]``, this rank's expert choice over all ``E`` experts.
        w_in, w_out, b_in, b_out: this rank's experts, as for ``expert_parallel_ffn``.
    Returns:
        ``y [T, D]`` in ``x.dtype``.
    """
    group = mesh.get_group()
    size = mesh.size()
    G, E, C = tokens.shape
    row_weights, row_tokens, offsets = expert_rows(weights, tokens)
    routing, starts = chosen_routing(row_tokens, offsets, x.shape[0])
    # Rows are expert-major, so each destination rank's rows are one block of E/P * G * C.
    rows = funcol.all_to_all_single_autograd(x.index_select(0, routing.token_of_row), None, None, group)
    per_expert = torch.full((E,), G * C, dtype=torch.long, device=x.device)
    out = _local_experts(rows, per_expert, size, w_in, w_out, b_in, b_out, activation, backend)
    out = funcol.all_to_all_single_autograd(out, None, None, group)
    out = out.index_select(0, row_of_slot(routing.slot_of_row))
    return combine_torch(out, slot_weights(row_weights, routing.slot_of_row), starts, x.shape[0], x.dtype)
