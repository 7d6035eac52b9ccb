"""Run a test body in several CPU processes joined by gloo, as ``torchrun`` would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, init_file: str, body: Callable, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        body(rank, world_size, *args)
        # No rank tears its group down while another still exchanges with it: gloo aborts the
        # process whose peer vanished mid-collective (seen once in ten runs on two busy cores).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_processes(body: Callable, world_size: int, *args) -> None:
    """Call ``body(rank, world_size, *args)`` in ``world_size`` fresh processes with a gloo process
    group; an exception in any of them fails the caller with that process's traceback.
    ``body`` must be a module-level function (the processes import it)."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.start_processes(_worker, args=(world_size, init_file, body, args), nprocs=world_size, start_method="spawn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *argv: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc -m <argv>`` on the CPU; with ``check``, a failure fails
    the caller with the tail of its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        "-m",
        *argv,
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert not check or result.returncode == 0, result.stderr[-3000:]
    return result


def torchrun_nodes(nnodes: int, *argv: str, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """``nnodes`` torchrun agents of one process each, joined by the c10d rendezvous on localhost
    as agents on ``nnodes`` machines would be (``--node-rank`` 0 to ``nnodes - 1``); each must
    succeed."""
    endpoint = f"localhost:{free_port()}"
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                str(nnodes),
                "--nproc_per_node",
                "1",
                "--node-rank",
                str(rank),
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                "multi-node-test",
                "-m",
                *argv,
            ],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in range(nnodes)
    ]
    results = []
    for agent in agents:
        stdout, stderr = agent.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(agent.args, agent.returncode, stdout, stderr))
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    return results
