"""A restarted job never trips over the one before it: the ``torchrun`` agent of a 2-process
``--ep 2`` run is killed alone (its workers run in their own sessions and outlive it for a
moment), once after a checkpoint and once mid-save, and the job restarted at once each time. The
orphaned workers stop at their next step without touching the checkpoints, the restarted job
waits for the run's lock instead of cleaning up under them, and the last restart finishes with an
intact newest checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from dit import checkpoint as ckpt
from tests.distributed.helpers import free_port

ARGS = ["--global-batch-size", "16", "--log-every", "1", "--sample-steps", "2", "--set", "depth=2", "--ckpt-every", "3"]


def start(results: Path, *flags: str, torchrun_flags: tuple[str, ...] = ()) -> subprocess.Popen:
    """``torchrun`` of 2 CPU processes in a session of its own, so that its agent can be killed alone."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        *torchrun_flags,
        "-m",
        "dit.train",
        *ARGS,
        "--results-dir",
        str(results),
        *flags,
    ]
    return subprocess.Popen(
        cmd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_killing_the_agent_alone_loses_nothing(tmp_path):
    checkpoints = lambda: next(tmp_path.glob("*/checkpoints"), None)  # noqa: E731
    saved = lambda: [p for p in checkpoints().iterdir() if p.name.isdigit()] if checkpoints() else []  # noqa: E731
    saving = lambda: checkpoints() is not None and any(p.name.startswith(".") for p in checkpoints().iterdir())  # noqa: E731

    for flags, moment in ((["--ep", "2"], saved), (["--resume", "latest"], saving)):
        job = start(tmp_path, *flags, "--steps", "400")
        try:
            wait_for(moment)
        finally:
            os.kill(job.pid, signal.SIGKILL)  # the agent only: its workers live on for a moment
            job.wait()
    last = start(tmp_path, "--resume", "latest", "--steps", "15")
    _, err = last.communicate(timeout=300)
    assert last.returncode == 0, err[-3000:]
    newest = ckpt.latest_checkpoint(checkpoints())
    assert newest.name == "0000015"
    ckpt.verify(newest)
    assert not [p for p in checkpoints().iterdir() if p.name.startswith(".")]  # no leftovers
    assert (newest.parent.parent / "log.txt").read_text().count("resumed from") >= 1


def _workers(agent: int) -> list[int]:
    """The processes a torchrun agent started (its children)."""
    children = Path(f"/proc/{agent}/task/{agent}/children")
    return [int(pid) for pid in children.read_text().split()] if children.exists() else []


def _weights(results: Path) -> dict:
    (run_dir,) = results.glob("[0-9][0-9][0-9]-*")
    newest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert newest.name == "0000012"
    return {which: ckpt.load_weights(newest, which)[0] for which in ("model", "ema")}


def test_an_elastic_restart_continues_the_run_bit_for_bit(tmp_path):
    """``torchrun --max-restarts 1``: a worker killed after a checkpoint, then one killed mid-save;
    each time torchrun restarts the workers, which resume the run from its newest intact
    checkpoint (the killed save's leftovers cleared) and end with the weights of the run that was
    never interrupted, bit for bit."""
    flags = ("--ep", "2", "--steps", "12", "--ckpt-every", "4")
    uninterrupted = start(tmp_path / "straight", *flags)
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err[-3000:]
    want = _weights(tmp_path / "straight")

    def saved(results: Path) -> bool:
        return any(results.glob("*/checkpoints/0000004/manifest.json"))

    def saving(results: Path) -> bool:
        return any(results.glob("*/checkpoints/.0000008.tmp-*"))

    for name, moment in (("after a checkpoint", saved), ("mid-save", saving)):
        results = tmp_path / name.replace(" ", "-")
        job = start(results, *flags, torchrun_flags=("--max-restarts", "1"))
        try:
            wait_for(lambda: moment(results) and len(_workers(job.pid)) == 2)
            os.kill(_workers(job.pid)[-1], signal.SIGKILL)
            _, err = job.communicate(timeout=300)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
        assert job.returncode == 0, (name, err[-3000:])
        got = _weights(results)
        for which in want:
            assert got[which].keys() == want[which].keys()
            for key in want[which]:
                assert torch.equal(got[which][key], want[which][key]), (name, which, key)
        (run_dir,) = results.glob("[0-9][0-9][0-9]-*")
        log = (run_dir / "log.txt").read_text()
        assert "restart 1 of this job" in log and "resumed from" in log, (name, log[-2000:])
