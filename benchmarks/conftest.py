"""Benchmark set-up. On a machine without CUDA, Triton kernels run through the interpreter (a
correctness tool, so their timings there mean nothing and they run at tiny shapes only).

``--paper-shapes`` selects the paper's shapes (``benchmarks.common.PAPER_CASES``) in bf16 (CUDA). After a timed run
(``--benchmark-only``), the comparison tables are printed and saved under
``benchmarks/results/`` with a throughput plot (see ``benchmarks.report``).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.common import DEVICE_NAME  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--paper-shapes", action="store_true", help="the paper's layer shapes in bf16 (needs CUDA)")


def pytest_configure(config):
    if config.getoption("--paper-shapes", default=False) and not torch.cuda.is_available():
        raise pytest.UsageError("--paper-shapes needs a CUDA device")


@pytest.fixture
def paper_shapes(request) -> bool:
    return request.config.getoption("--paper-shapes")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_sessionfinish(session):
    bench_session = getattr(session.config, "_benchmarksession", None)
    # Only the documented `--benchmark-only` run saves: a plain `pytest` times the benchmarks
    # between tests, and its numbers must not replace the committed ones.
    if bench_session is None or bench_session.disabled or not session.config.getoption("benchmark_only"):
        return
    results = [b.as_dict(include_data=False) for b in bench_session.benchmarks if b.stats]
    if not results:
        return
    paths = report.save(results, DEVICE_NAME)
    print("\n" + report.markdown(results) + f"\nsaved: {', '.join(str(p) for p in paths)}")


def pytest_generate_tests(metafunc):
    from benchmarks.common import cases, layer_cases

    paper = metafunc.config.getoption("--paper-shapes")
    for name, chosen in (("case", cases(paper)), ("layer_case", layer_cases(paper))):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, list(chosen.items()), ids=list(chosen))
