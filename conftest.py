"""Set-up shared by ``tests/`` and ``benchmarks/``.

Under pytest-xdist (``make test`` runs one worker per core) each worker computes on one thread:
torch's intra-op threads on top of the workers would oversubscribe the cores, and OpenMP threads
that wait on each other's cores made some tests three times slower on two cores. Subprocesses the
tests start (torchrun, the command-line tools) inherit ``OMP_NUM_THREADS``. A single-process run
(``make bench`` included) keeps torch's default.
"""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
