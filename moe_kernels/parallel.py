"""Expert parallelism: the experts of an ``MoE`` split over the ranks of a 1-D ``DeviceMesh``.

Rank ``r`` of ``P`` holds experts ``r * E/P`` to ``(r + 1) * E/P - 1``: ``w_in`` and ``w_out`` (and the biases)
become ``DTensor`` parameters sharded on dimension 0, so state dicts and
``torch.distributed.checkpoint`` see the full expert tensors and can reshard them. Everything
else (router, shared experts and their gate) stays replicated. A forward, on each rank:

    router               on the rank's own tokens (and its auxiliary loss, from them alone): a
                         dispatch whose rows are expert-major, hence grouped by destination rank
    counts exchange      all_to_all of the per-expert row counts; one host sync for the sizes
    token exchange       all_to_all of the rows' tokens (autograd-aware)
    local experts        the experts op over the received rows, one slot each, unweighted
    reverse exchange     all_to_all of the outputs back to the ranks that sent them
    combine              the routing-weighted sum over each token's slots

One path serves every router (``sharded_experts``). No token is dropped: a rank receives however
many rows its experts were chosen for. Those sizes are data: reading them costs one
device-to-host sync per layer (torchtitan's expert parallelism does the same), which
``torch.compile`` sees as a graph break and which a CUDA graph cannot capture. A dispatch whose
experts own a fixed number of rows (``Dispatch.rows_per_expert``: expert choice, where every
expert takes ``C`` tokens of every group) needs neither the counts exchange nor the sync: with
the same number of tokens on every rank (a data-parallel batch), each rank sends ``E/P * G * C``
rows to each rank and receives as many from each, and the layer can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .combine import combine_torch
from .dispatch import Dispatch, by_token, row_of_slot
from .experts import run_experts

EXPERT_PARAMETERS = ("w_in", "w_out", "b_in", "b_out")


def expert_parallel(moe: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard ``moe``'s routed experts over ``mesh`` (1-D, its size dividing ``num_experts``), in
    place, and return it.

    Every rank must hold the same weights when this is called (build the model from one seed):
    each keeps its own slice of them. Afterwards, on every rank, ``moe(x)`` equals the unsharded
    layer applied to that rank's ``x``, and each local expert's gradient is the gradient over all
    ranks' tokens (summed: with a loss averaged over ``N`` data-parallel ranks, divide by ``N``,
    as a data-parallel wrapper does for the replicated parameters).
    """
    # What makes a moe_kernels.MoE here: stacked experts and a mesh slot (this module cannot import
    # the layer, which imports it for its sharded forward).
    if not (isinstance(moe, nn.Module) and hasattr(moe, "expert_mesh") and hasattr(moe, "fp8_weights")):
        raise TypeError(f"expert_parallel expects a moe_kernels.MoE, got {type(moe).__name__}")
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim != 1:
        raise ValueError(
            f"mesh must be 1-D (the expert-parallel ranks), got {mesh.ndim}-D; pass a sub-mesh, e.g. mesh['ep']"
        )
    if moe.expert_mesh is not None:
        raise ValueError("this MoE is already expert-parallel")
    if moe.fp8_weights:
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


def sharded_experts(
    x: torch.Tensor,
    dispatch: Dispatch,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
    *,
    activation: str,
    backend: str,
    mesh: DeviceMesh,
) -> torch.Tensor:
    """The experts op with the experts spread over ``mesh``: this rank's tokens, all ranks' experts.

    Args:
        x: ``[T, D]``, this rank's tokens.
        dispatch: the router's dispatch of them over all ``E`` experts (expert-major rows).
        w_in, w_out: this rank's experts, ``[E/P, D, 2H or H]`` and ``[E/P, H, D]`` (local tensors).
        b_in, b_out: their biases, ``[E/P, 2H or H]`` and ``[E/P, D]``, or ``None``.
    Returns:
        ``y [T, D]`` in ``x.dtype``.
    """
    group = mesh.get_group()
    size, local = mesh.size(), w_in.shape[0]
    if dispatch.rows_per_expert is None:
        # Rows are expert-major, so grouped by destination rank: exchange the counts, read the sizes.
        counts = dispatch.counts
        received = funcol.all_to_all_single(counts, None, None, group)  # [P * E/P]: source-major
        sizes = torch.stack([counts.view(size, local).sum(1), received.view(size, local).sum(1)])
        send, recv = sizes.tolist()  # the one host sync
    else:  # every rank sends E/P * rows_per_expert rows to every rank, receives as many
        send = recv = None
        received = torch.full((size * local,), dispatch.rows_per_expert, dtype=torch.int32, device=x.device)
    rows = funcol.all_to_all_single_autograd(x.index_select(0, dispatch.token_of_row), recv, send, group)
    out = _local_experts(rows, received, size, w_in, w_out, b_in, b_out, activation, backend)
    out = funcol.all_to_all_single_autograd(out, send, recv, group)
    slots = dispatch.slots(x.shape[0])
    return combine_torch(out, dispatch.weights, slots, x.shape[0], x.dtype, row_of_slot(dispatch.slot_of_row))


def _local_experts(
    rows: torch.Tensor, per_expert: torch.Tensor, size: int, w_in, w_out, b_in, b_out, activation, backend
) -> torch.Tensor:
    """This rank's experts on the ``rows`` it received, ``size`` source-major blocks of
    ``[E/P]`` expert segments whose sizes are ``per_expert [P * E/P]``; outputs in received order."""
    local = w_in.shape[0]
    local_experts = torch.arange(local, device=rows.device, dtype=torch.int32).repeat(size)
    expert_of_row = torch.repeat_interleave(local_experts, per_expert, output_size=rows.shape[0])
    dispatch = by_token(expert_of_row[:, None], rows.new_ones((rows.shape[0], 1)), local, backend)
    return run_experts(rows, dispatch, w_in, w_out, b_in, b_out, activation=activation, backend=backend)
