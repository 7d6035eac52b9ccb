"""Host time per call of one MoE layer, with the dispatcher skipped (as plain eager calls do) and
with every op forced through it, in the same process.

    python benchmarks/host_overhead.py [--calls N] [--rounds R]

The layer (width 64, 16 tokens, 8 experts, top-2, a shared expert) runs on the PyTorch backend on
the CPU: its arithmetic is negligible, so what is timed is the Python and the dispatch around it,
which is also what a small batch waits for on a GPU (there each Triton launch adds its own). The
best round of each is printed. On the 2-core CPU of this project's machines (torch 2.13; three
runs, whose spread the ranges give):

| per call | dispatcher skipped | through the dispatcher | ratio |
|---|---|---|---|
| eval forward (no grad) | 0.65-0.68 ms | 0.80-0.81 ms | 1.19-1.24x |
| training forward + backward | 2.4-2.9 ms | 2.9-3.4 ms | 1.13-1.18x |

That is about 0.07 ms per op call (two in the forward, five in training). Before this change,
the shared expert's SwiGLU also went through ``autograd.Function.apply`` without grad, which
binds its signature on every call: the eval forward took 0.92-0.94 ms in the same comparison.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from unittest import mock

import torch

from moe_kernels import MoE, library


def _ms_per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def measure(calls: int, rounds: int) -> dict[str, dict[str, float]]:
    """``{"eval forward" | "train fwd+bwd": {"skipped" | "dispatcher": ms}}``: the best of
    ``rounds`` rounds of ``calls`` calls each, the two paths alternating round by round so that a
    busy spell of the machine hits both."""
    torch.manual_seed(0)
    layer = MoE(64, 128, 8, 2, backend="torch")
    x = torch.randn(16, 64, requires_grad=True)

    def forward():
        with torch.no_grad():
            layer(x)

    def forward_backward():
        layer(x).sum().backward()

    def through_dispatcher():
        return mock.patch.object(library, "dispatch_free", lambda args: False)

    results = {}
    for name, fn, training in (("eval forward", forward, False), ("train fwd+bwd", forward_backward, True)):
        layer.train(training)
        times = {"skipped": [], "dispatcher": []}
        for _ in range(rounds + 1):  # the first round warms up
            times["skipped"].append(_ms_per_call(fn, calls))
            with through_dispatcher():
                times["dispatcher"].append(_ms_per_call(fn, calls))
        results[name] = {path: min(t[1:]) for path, t in times.items()}
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=20, help="calls per round")
    p.add_argument("--rounds", type=int, default=50)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| per call | dispatcher skipped | through the dispatcher | ratio |\n|---|---|---|---|")
    for name, row in measure(args.calls, args.rounds).items():
        print(
            f"| {name} | {row['skipped']:.2f} ms | {row['dispatcher']:.2f} ms | {row['dispatcher'] / row['skipped']:.2f}x |"
        )


if __name__ == "__main__":
    main()
