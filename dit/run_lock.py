"""One job per run directory: ``RunLock`` holds a run for the job that trains it.

A restarted job must not clean up or write checkpoints under one still running (say, workers
of a ``torchrun`` whose agent was killed, which outlive it for a moment). The main process of a
job takes an exclusive ``flock`` on ``<run>/.lock`` and writes its host and process id there;
the kernel drops the lock when that process ends, however it ends, so a lock is never left
stale. A second job waits a while for the lock, then stops with an error naming its holder.
``flock`` also works across machines on NFS (Linux maps it to NFS byte-range locks).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

LOCK_FILE = ".lock"


class RunLock:
    """The lock of one run directory, held from ``acquire`` until ``release`` or process exit."""

    def __init__(self):
        self.fd: int | None = None
        self.path: Path | None = None

    def acquire(self, run_dir: Path, wait: float = 60.0, say: Callable[[str], None] = print) -> None:
        """Hold ``run_dir`` for this process, waiting up to ``wait`` seconds (telling ``say``
        once) for another job to let go of it; ``ValueError`` names that job if it does not."""
        path = run_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _describe(path)
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise ValueError(
                        f"run {run_dir} is in use by {holder}; wait for that job to end or stop it (its lock, "
                        f"{path}, is released when its process exits)"
                    ) from None
                if not waiting:
                    say(f"run {run_dir} is in use by {holder}: waiting up to {wait:.0f} s for it to end")
                    waiting = True
                time.sleep(0.2)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd, self.path = fd, path

    def release(self) -> None:
        """Let go of the run. The lock file stays (removing it could split a waiting job's lock
        from a new one's), unless the run holds nothing else: a run refused before it wrote
        anything leaves no directory behind."""
        if self.fd is None:
            return
        run_dir = self.path.parent
        if [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
            self.path.unlink()
            run_dir.rmdir()
        os.close(self.fd)  # closing the only descriptor drops the flock
        self.fd = None


def _describe(path: Path) -> str:
    """Who holds the lock at ``path``, as its file says."""
    try:
        record = json.loads(path.read_text())
        return f"process {record['pid']} on {record['host']} (since {record['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another job (its lock file names no holder yet)"
