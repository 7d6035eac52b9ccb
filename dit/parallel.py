"""How a DiT-MoE is laid out over the training processes: data and expert parallelism.

The processes form a 2-D ``DeviceMesh`` ``(dp, ep)``: ``ep`` consecutive ranks share one copy of
the experts, each holding ``E / ep`` of every MoE layer's experts (``moe_kernels.parallel``);
the ``dp`` such groups split the batch. Everything else (attention, embeddings, routers,
shared experts) is replicated on every rank and averaged over all of them by DDP.

Each local expert's gradient arrives summed over its ``ep`` group's tokens (the all-to-all's
backward); ``reduce_expert_grads`` sums it over the ``dp`` groups and divides by the world size,
so every gradient is the mean over the global batch, as on one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from moe_kernels.parallel import expert_parallel

from .models import DiT


def build_mesh(world_size: int, ep: int, device: torch.device) -> DeviceMesh:
    """The ``(dp, ep)`` mesh of all processes; ``ep`` must divide ``world_size``."""
    if world_size % ep:
        raise ValueError(f"--ep {ep} must divide the number of processes ({world_size})")
    return init_device_mesh(device.type, (world_size // ep, ep), mesh_dim_names=("dp", "ep"))


def shard_experts(model: DiT, mesh: DeviceMesh) -> None:
    """Split every MoE layer's experts over ``mesh["ep"]``."""
    ep = mesh["ep"].size()
    num_experts = model.config.num_experts
    if not model.moe_layers():
        raise ValueError(f"--ep {ep} needs a model with MoE layers; {model.config.name} has none")
    if num_experts % ep:
        raise ValueError(f"--ep {ep} must divide the experts per layer ({num_experts} in {model.config.name})")
    for moe in model.moe_layers():
        expert_parallel(moe, mesh["ep"])


def expert_parameter_names(model: nn.Module) -> list[str]:
    """The names of the sharded expert weights of ``model``."""
    return [name for name, p in model.named_parameters() if isinstance(p, DTensor)]


def data_parallel(model: DiT, device: torch.device) -> DDP:
    """DDP over every rank for the replicated parameters; the sharded experts are left to
    ``reduce_expert_grads``."""
    DDP._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def reduce_expert_grads(model: DiT, mesh: DeviceMesh) -> None:
    """Turn each local expert's gradient (summed over its ``ep`` group) into the global-batch
    mean: sum over the ``dp`` groups, divide by the world size."""
    grads = [p.grad.to_local() for p in model.parameters() if isinstance(p, DTensor) and p.grad is not None]
    if not grads:
        return
    world_size = mesh.size()
    if mesh["dp"].size() > 1:
        group = mesh["dp"].get_group()
        works = [dist.all_reduce(grad, group=group, async_op=True) for grad in grads]
        for work in works:
            work.wait()
    torch._foreach_div_(grads, world_size)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's local values: its shard if it is a DTensor, else itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor

