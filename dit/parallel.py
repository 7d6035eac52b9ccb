"""The training processes: who they are (``Distributed``: rank, device, a process group under
torchrun, the main process's decisions shared with all; ``StepDraws`` and the RNG states: the
same random draws on any number of processes), and how a DiT-MoE is laid out over them: data,
expert and sharded data parallelism.

The processes form a 2-D ``DeviceMesh`` ``(dp, ep)``: ``ep`` consecutive ranks share one copy of
the experts, each holding ``E / ep`` of every MoE layer's experts (``moe_kernels.parallel``);
the ``dp`` such groups split the batch.

Without FSDP, everything but the experts (attention, embeddings, routers, shared experts) is
replicated and averaged over all ranks by DDP. Each local expert's gradient arrives summed over
its ``ep`` group's tokens (the all-to-all's backward); ``reduce_expert_grads`` sums it over the
``dp`` groups and divides by the world size, so every gradient is the mean over the global batch,
as on one process.

With FSDP (``fully_shard``, FSDP2), every parameter is sharded instead of replicated: the
replicated ones over all ranks, the experts of each ``ep`` rank over the ``dp`` dimension (on
their dimension 1, so that any number of local experts splits evenly), each DiT block one unit
of all-gather and reduce-scatter. FSDP's reduce-scatter then produces the global-batch means
itself (the experts' divided by the world size, not by ``dp``).
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel as DDP

from moe_kernels.parallel import expert_parallel

from .models import DiT

T = TypeVar("T")


class Distributed:
    """Rank, world size and device; a process group when launched by torchrun."""

    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        # A torchrun worker's parent is its agent; if that changes, the agent is gone.
        self.agent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if self.world_size > 1:
            dist.init_process_group("nccl" if cuda else "gloo", **_attempt_store(self.rank, self.world_size))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def check_agent(self) -> None:
        """Stop this process, touching nothing more, if the torchrun agent that started it is
        gone: a restarted job may already be resuming from the run's checkpoints."""
        if self.agent is not None and os.getppid() != self.agent:
            raise AgentGone(f"the torchrun agent that started process {os.getpid()} is gone; stopping without saving")

    def on_main(self, action: Callable[[], T]) -> T:
        """``action()`` run by the main process alone; its result, or the ``ValueError`` it
        raised, on every process (so all of them stop alike instead of waiting on one that did)."""
        outcome = None
        if self.main:
            try:
                outcome = (True, action())
            except ValueError as error:
                outcome = (False, str(error))
        ok, value = self.broadcast(outcome)
        if not ok:
            raise JobRefused(value)
        return value

    def refuse(self, error: JobRefused) -> NoReturn:
        """Stop for ``error``, which every process raised alike: on one process, raise it; on
        many, the main process prints it, then all stop together (none is left waiting, and
        torchrun stops none before the reason is out)."""
        if self.world_size == 1:
            raise error
        if self.main:
            print(f"error: {error}", file=sys.stderr, flush=True)
        self.barrier()
        raise SystemExit(1) from error

    def gather(self, obj):
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor(value, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def broadcast(self, value):
        """The main process's ``value``, on every process."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1:
            dist.destroy_process_group()


def _attempt_store(rank: int, world_size: int) -> dict:
    """``init_process_group``'s rendezvous under torchrun: its store, under a prefix of this attempt
    (``TORCHELASTIC_RESTART_COUNT``). The store outlives an elastic restart, and without the prefix
    the restarted workers read the addresses their predecessors published and hang connecting to
    processes that are gone. Elsewhere, the default (``env://``)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return {}
    hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=not hosted_by_agent and rank == 0,
    )
    return dict(store=dist.PrefixStore(f"attempt-{attempt}", store), rank=rank, world_size=world_size)


class JobRefused(ValueError):
    """A refusal every process of a job raises alike (``Distributed.on_main``)."""


class AgentGone(SystemExit):
    """Raised in a torchrun worker whose agent died: it exits without saving or cleaning up."""


def rng_state(device: torch.device) -> dict:
    """Every RNG's state as tensors and plain values, so the checkpoint loads with ``weights_only=True``."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def stream_seed(seed: int, index: int) -> int:
    """The seed of stream ``index`` (a training step, a sample) of a run seeded ``seed``:
    ``(seed * 0x9E3779B9 + index) mod 2**32``. torch's CPU generator keeps only the low 32 bits
    of a seed, so both must act there: the streams of one run all differ, and two runs' collide
    only where their indices differ by a multiple of the golden-ratio step, billions apart."""
    return (seed * 0x9E3779B9 + index) % 2**32


class StepDraws:
    """The random draws of one optimizer step, for this process's ``rows`` of the global batch.

    Each draw is made for the whole global batch from a generator seeded by (seed, step), and
    each process keeps its rows. So the losses of a run do not depend on how many processes
    share it, and a resumed run draws what the uninterrupted one would have.
    """

    def __init__(self, seed: int, step: int, global_batch: int, rows: slice, device: torch.device):
        self.generator = torch.Generator(device).manual_seed(stream_seed(seed, step))
        self.global_batch, self.rows, self.device = global_batch, rows, device

    def take(self, values: torch.Tensor) -> torch.Tensor:
        """This process's rows of a draw for the global batch."""
        return values[self.rows]

    def uniform(self) -> torch.Tensor:
        return self.take(torch.rand(self.global_batch, device=self.device, generator=self.generator))

    def normal(self, shape: torch.Size) -> torch.Tensor:
        return self.take(torch.randn((self.global_batch, *shape), device=self.device, generator=self.generator))


def lay_out(model: DiT, ema: DiT, world_size: int, ep: int, fsdp: bool, bf16: bool = False) -> DeviceMesh | None:
    """Shard ``model`` and its ``ema`` copy in place, alike, over ``world_size`` processes: the
    experts ``ep`` ways, then everything with FSDP if ``fsdp`` (the model's blocks computing
    with bf16 weights if ``bf16`` on a GPU). Return the ``(dp, ep)`` mesh, or ``None`` on one
    process. DDP, for runs without FSDP, is applied afterwards (``data_parallel``)."""
    if world_size == 1:
        return None
    device = next(model.parameters()).device
    mesh = build_mesh(world_size, ep, device)
    param_dtype = torch.bfloat16 if bf16 and device.type == "cuda" else None
    for module, dtype in ((model, param_dtype), (ema, None)):
        if ep > 1:
            shard_experts(module, mesh)
        if fsdp:
            fully_shard_model(module, mesh, dtype)
    return mesh


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


def fully_shard_model(model: DiT, mesh: DeviceMesh, param_dtype: torch.dtype | None = None) -> None:
    """FSDP2 over ``mesh`` (``(dp, ep)``), in place: each block, then the whole model. With
    ``param_dtype`` (bf16 on a GPU), blocks compute in it and gradients reduce in fp32."""
    world = init_device_mesh(mesh.device_type, (mesh.size(),), mesh_dim_names=("fsdp",))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    # gloo has no pre-scaled sum (PREMUL_SUM): ask FSDP for plain sums and a separate division.
    plain_sums = dist.get_backend() == "gloo"
    for block in model.blocks:
        moe = block.ffn
        if getattr(moe, "expert_mesh", None) is not None:
            # The replicated parts first, so that the MoE's own unit holds just the experts.
            for part in (moe.router, moe.shared, moe.shared_gate):
                if part is not None:
                    _shard(part, world, policy, plain_sums)
            experts = _shard(moe, mesh["dp"], policy, plain_sums, shard_placement_fn=lambda p: Shard(1))
            experts.set_gradient_divide_factor(float(mesh.size()))
        _shard(block, world, policy, plain_sums)
    _shard(model, world, policy, plain_sums)


def _shard(module: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy, plain_sums: bool, **kwargs) -> nn.Module:
    fully_shard(module, mesh=mesh, mp_policy=policy, **kwargs)
    if plain_sums:
        module.set_force_sum_reduction_for_comms(True)
    return module


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's local values: its shard if it is a DTensor, else itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
