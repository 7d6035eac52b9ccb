"""What the benchmark groups share: the device, the shapes, FLOP and byte counts, and the
helper that runs a benchmark and records its ``extra_info``."""

from __future__ import annotations

import platform
from collections.abc import Callable

import torch

from moe_kernels.backend import INTERPRET

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DEVICE_NAME = (
    torch.cuda.get_device_name()
    if CUDA
    else f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()}"
)
# The interpreter is for correctness: it sees only tiny shapes, and its timings are marked.
TINY = dict(T=48, D=32, H=64, E=4, k=2)


def layer_flops(T: int, D: int, H: int, E: int, k: int, shared_hidden: int = 0, backward: bool = False) -> int:
    """FLOPs of one MoE FFN: router, k SwiGLU experts of width H per token, shared SwiGLU expert."""
    forward = 2 * T * D * E + 2 * T * k * 3 * D * H + 2 * T * 3 * D * shared_hidden
    return forward * (3 if backward else 1)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def cuda_time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` timed with CUDA events (Triton's ``do_bench``: warm-up
    first, the L2 cache flushed before each call), free of host-side timer noise."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak CUDA memory allocated during one call of ``fn`` (inputs and weights included), MiB."""
    sync()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() / 2**20


def measure(
    benchmark,
    fn: Callable[[], object],
    *,
    group: str,
    case: str,
    variant: str,
    op: str,
    flops: int | None = None,
    bytes_moved: int | None = None,
    dtype: torch.dtype = torch.float32,
    tokens: int | None = None,
    images: int | None = None,
    backend: str | None = None,
    reference: bool = True,
) -> None:
    """Benchmark ``fn`` and record what the report needs in ``extra_info``.

    On CUDA the time is ``cuda_time_ms`` (CUDA events) and the peak memory is recorded too;
    pytest-benchmark then runs ``fn`` once, for its own record. On the CPU pytest-benchmark
    times it. ``backend`` is the moe_kernels backend ``fn`` runs (``None`` for baselines); the
    one that ``auto`` picks on this device is "ours", the reference of the report's ratios, unless
    ``reference`` is false (another operation on the same backend, such as expert choice).
    """
    interpreted = backend == "triton" and not CUDA and INTERPRET

    def run():
        fn()
        sync()

    benchmark.extra_info.update(
        group=group,
        case=case,
        variant=variant,
        op=op,
        flops=flops,
        bytes=bytes_moved,
        tokens=tokens,
        images=images,
        device=DEVICE_NAME,
        dtype=str(dtype).removeprefix("torch."),
        backend=backend,
        interpreted=interpreted,
        ours=reference and backend == ("triton" if CUDA else "torch"),
    )
    if CUDA and getattr(benchmark, "enabled", True):
        benchmark.extra_info.update(cuda_median_ms=cuda_time_ms(fn), peak_mb=peak_memory_mb(fn))
    if interpreted or CUDA:
        benchmark.pedantic(run, rounds=1, iterations=1)
    else:
        benchmark(run)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and flops and not interpreted:
        seconds = benchmark.extra_info.get("cuda_median_ms", stats.stats.median * 1e3) / 1e3
        benchmark.extra_info["tflops" if CUDA else "gflops"] = flops / seconds / (1e12 if CUDA else 1e9)
        if bytes_moved:
            benchmark.extra_info["gb_per_s"] = bytes_moved / seconds / 1e9


# name -> (T tokens, D width, H expert width, E experts, k); H = 4D as in DiT-MoE.
PAPER_CASES = {
    "S/2-8E2A T=32768": dict(T=32768, D=384, H=1536, E=8, k=2),
    "S/2-16E2A T=32768": dict(T=32768, D=384, H=1536, E=16, k=2),
    "XL/2-8E2A T=16384": dict(T=16384, D=1152, H=4608, E=8, k=2),
    "G/2-16E2A T=16384": dict(T=16384, D=1408, H=5632, E=16, k=2),
    "XL sampling T=4096": dict(T=4096, D=1152, H=4608, E=8, k=2),
    "S sampling T=512": dict(T=512, D=384, H=1536, E=8, k=2),
}
SMALL_CASES = {"T=1024 D=128 E=8": dict(T=1024, D=128, H=512, E=8, k=2)}


def layer_cases(paper: bool) -> dict[str, dict]:
    """The layer group: the paper's shapes, or a sweep over tokens (the throughput plot)."""
    if paper:
        return PAPER_CASES
    D, E = (384, 8) if CUDA else (128, 8)
    sweep = (512, 4096, 16384, 32768) if CUDA else (256, 1024, 2048)
    return {f"T={T} D={D} E={E}": dict(T=T, D=D, H=4 * D, E=E, k=2) for T in sweep}


def dtype_for(paper: bool) -> torch.dtype:
    return torch.bfloat16 if CUDA else torch.float32


def cases(paper: bool) -> dict[str, dict]:
    return PAPER_CASES if paper else SMALL_CASES


def shape_for(case: tuple[str, dict], backend: str) -> tuple[str, dict]:
    """A ``(name, dims)`` case's label and dims as ``backend`` runs it: the interpreter gets the
    tiny shape instead, and says so in the label."""
    name, dims = case
    if backend == "triton" and not CUDA:
        return name + " (interpreter, tiny)", TINY
    return name, dims
