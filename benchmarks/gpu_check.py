"""One prepared GPU run: check every op in bf16 against the reference, then time the MoE layer.

    PYTHONPATH=$PWD python3 benchmarks/gpu_check.py --out benchmarks/results
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --smoke --out /tmp/x   # the same code on CPU, tiny

Part 1 compares each op (forward and gradients) of the ``triton`` backend with
``moe_kernels.reference`` in bf16 and fp32. Part 2 times one MoE FFN layer (router, top-2
gating, SwiGLU experts, weighted combine: ``MoE`` without shared experts, called as a model
calls it) at the paper's shapes (``benchmarks.common.PAPER_CASES``), forward and
forward+backward, for the ``triton`` and ``torch`` backends and for ``dense-eq`` (one dense
SwiGLU MLP over the T*k token copies: the same FLOPs without routing), with CUDA events and
peak memory. Part 3 times one guided sampling step of DiT-MoE-S/2 (batch 1) and XL/2 (batch 8)
at 256 px, eager and replayed as a CUDA graph (``dit.sampling.cuda_graphed``), on both backends.
Results are printed and written as JSON named after the card (after each part, so a run cut
short keeps what it measured). ``--smoke`` runs
every step on CPU through the Triton interpreter at tiny sizes, in fp32, timing each call once,
so that the script a short GPU lease depends on is itself tested
(``benchmarks/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton

import moe_kernels as mk
from benchmarks.baselines import DenseSwiGLU
from benchmarks.common import PAPER_CASES, cuda_time_ms, layer_flops, peak_memory_mb
from dit.models import create_model
from dit.sampling import cuda_graphed, guided
from moe_kernels import reference
from moe_kernels.activations import ACTIVATIONS
from moe_kernels.backend import INTERPRET

STARTED = time.time()

SMOKE_CASES = {"smoke T=40": dict(T=40, D=32, H=128, E=4, k=2)}
TOL = {torch.bfloat16: dict(atol=5e-2, rtol=5e-2), torch.float32: dict(atol=1e-3, rtol=1e-3)}


def check(
    dtype: torch.dtype, dev: str = "cuda", T: int = 777, D: int = 256, H: int = 320,
    group_sizes: tuple[int, ...] = (0, 300, 1, 0, 476, 200, 400, 177),
) -> list[str]:
    """Compare every op to the reference on ``T`` tokens of width ``D`` (expert width ``H``, 8
    experts, top-2; ``grouped_mm`` on rows grouped by ``group_sizes``); return failures as text."""
    failures = []
    E, k = 8, 2

    def compare(name, got, want):
        try:
            torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
        except AssertionError as error:
            failures.append(f"{dtype} {name}: {str(error).splitlines()[1:3]}")

    logits = torch.randn(T, E, device=dev, dtype=dtype, requires_grad=True)
    got = mk.topk_gating(logits, k, backend="triton")
    want = reference.topk_gating(logits, k)
    compare("topk_gating weights", got[0], want[0])
    compare("topk_gating probs", got[2], want[2])
    g1 = torch.autograd.grad(got[0].sum() + got[2].square().sum(), logits)[0]
    g2 = torch.autograd.grad(want[0].sum() + want[2].square().sum(), logits)[0]
    compare("topk_gating dlogits", g1, g2)

    probs = torch.softmax(torch.randn(T, E, device=dev), -1).requires_grad_()
    experts = torch.rand(T, E, device=dev).argsort(1)[:, :k]
    compare("balance_loss", mk.balance_loss(probs, experts, E, backend="triton"), reference.balance_loss(probs, experts, E))

    sizes = torch.tensor(group_sizes, device=dev)
    offsets = sizes.cumsum(0).int()
    x = torch.randn(int(sizes.sum()), D, device=dev, dtype=dtype, requires_grad=True)
    w = (torch.randn(E, D, H, device=dev) / D**0.5).to(dtype).requires_grad_()
    y = mk.grouped_mm(x, w, offsets, backend="triton")
    ref = reference.grouped_mm(x.float(), w.float(), offsets)
    compare("grouped_mm", y, ref)
    dy = torch.randn_like(ref)
    for name, a, b in zip(("dx", "dw"), torch.autograd.grad((y.float() * dy).sum(), [x, w]), torch.autograd.grad((ref * dy).sum(), [x, w])):
        compare(f"grouped_mm {name}", a, b)

    for activation in ACTIVATIONS:
        width = 2 * H if activation == "swiglu" else H
        x = torch.randn(T, D, device=dev, dtype=dtype, requires_grad=True)
        weights = torch.rand(T, k, device=dev, requires_grad=True)
        w_in = (torch.randn(E, D, width, device=dev) / D**0.5).to(dtype).requires_grad_()
        w_out = (torch.randn(E, H, D, device=dev) / H**0.5).to(dtype).requires_grad_()
        y = mk.moe_ffn(x, weights, experts, w_in, w_out, activation, backend="triton")
        ref = reference.moe_ffn(x.float(), weights, experts, w_in.float(), w_out.float(), activation)
        compare(f"moe_ffn {activation}", y, ref)
        dy = torch.randn_like(ref)
        params = [x, weights, w_in, w_out]
        for name, a, b in zip(("dx", "dweights", "dw_in", "dw_out"), torch.autograd.grad((y.float() * dy).sum(), params), torch.autograd.grad((ref * dy).sum(), params)):
            compare(f"moe_ffn {activation} {name}", a, b)
    return failures


def layer_fn(backend: str, case: dict, backward: bool, dev: str = "cuda", dtype=torch.bfloat16) -> Callable[[], object]:
    """One call of the layer at ``case`` (``T, D, H, E, k``): ``MoE`` on ``backend``, or ``dense-eq``."""
    T, D, H, E, k = (case[key] for key in ("T", "D", "H", "E", "k"))
    x = torch.randn(T, D, device=dev, dtype=dtype, requires_grad=backward)
    grad = torch.randn(T, D, device=dev, dtype=dtype)
    if backend == "dense-eq":
        mlp = DenseSwiGLU(D, H).to(dev, dtype).requires_grad_(backward)

        def fn(x):
            return mlp(x.repeat_interleave(k, dim=0)).view(T, k, D).sum(1)
    else:
        # A forward-only timing records no autograd graph, for the baseline alike.
        fn = mk.MoE(D, H, E, k, num_shared_experts=0, backend=backend).to(dev, dtype).requires_grad_(backward)
    if not backward:
        return lambda: fn(x)
    return lambda: fn(x).backward(grad)


# name: (model, batch); one guided step of DiT-MoE at 256 px (32x32x4 latents), as the official
# code's sampler runs it (52.6 ms for S/2 batch 1 and 112 ms for XL/2 batch 8 on an H200).
SAMPLING_CASES = {"S/2-8E2A batch 1 + CFG": ("DiT-MoE-S/2-8E2A", 1), "XL/2-8E2A batch 8 + CFG": ("DiT-MoE-XL/2-8E2A", 8)}
SMOKE_SAMPLING_CASES = {"Ti/2-4E2A batch 2 + CFG (smoke)": ("DiT-MoE-Ti/2-4E2A", 2)}


def sampling_step(name: str, batch: int, backend: str, dev: str, smoke: bool) -> Callable:
    """One guided network evaluation ``step(x, t)`` of a freshly initialised model (bf16 autocast on
    CUDA, as ``--precision bf16``), and its inputs."""
    shape = dict(input_size=8, in_channels=1, num_classes=10) if smoke else dict(input_size=32, in_channels=4, num_classes=1000)
    with torch.device(dev):  # initialise on the device: the XL model has 4.1B parameters
        model = create_model(name, moe_backend=backend, **shape)
    model = model.to(dev).eval()
    x = torch.randn(batch, shape["in_channels"], shape["input_size"], shape["input_size"], device=dev)
    t = torch.full((batch,), 500, device=dev)
    model_fn = guided(model, torch.randint(0, shape["num_classes"], (batch,), device=dev), cfg_scale=4.0)

    @torch.no_grad()
    def step(x, t):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=not smoke):
            return model_fn(x, t)

    return step, x, t


def time_sampling(smoke: bool, dev: str, bench: Callable, report: dict) -> None:
    """Eager and CUDA-graph time of one guided step, both backends; the graph as a ratio to eager."""
    for name, (model_name, batch) in (SMOKE_SAMPLING_CASES if smoke else SAMPLING_CASES).items():
        for backend in ("triton", "torch"):
            step, x, t = sampling_step(model_name, batch, backend, dev, smoke)
            row = {"eager": bench(lambda: step(x, t))}
            if not smoke:
                graphed = cuda_graphed(step)
                graphed(x, t)  # warm-up and capture
                row["cuda_graph"] = bench(lambda: graphed(x, t))
                row["graph / eager"] = row["cuda_graph"] / row["eager"]
            report["sampling"][f"{name} | {backend}"] = row
            print(f"[{time.time() - STARTED:6.0f} s] sampling {name:32s} {backend:7s} "
                  + " ".join(f"{key} {value:.3f}" for key, value in row.items()), flush=True)


def _time_once(fn: Callable[[], object]) -> float:
    """Milliseconds of one call: the smoke run's stand-in for ``do_bench``, which needs CUDA."""
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--smoke", action="store_true", help="run every step on CPU, tiny, through the Triton interpreter")
    args = p.parse_args(argv)
    if args.smoke and not INTERPRET:
        p.error("--smoke runs the kernels through the interpreter: set TRITON_INTERPRET=1")
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device; --smoke runs the script on CPU")
    dev = "cpu" if args.smoke else "cuda"
    card = "smoke (CPU, interpreter)" if args.smoke else torch.cuda.get_device_name()
    report = {"card": card, "torch": torch.__version__, "triton": triton.__version__, "checks": {}, "timings": {}}
    # The interpreter's bf16 tl.dot is wrong, so the smoke run checks fp32 only.
    for dtype in (torch.float32,) if args.smoke else (torch.float32, torch.bfloat16):
        tiny = dict(T=45, D=16, H=24, group_sizes=(0, 7, 1, 0, 12, 5, 9, 3))
        failures = check(dtype, dev, **tiny) if args.smoke else check(dtype)
        report["checks"][str(dtype)] = failures or "ok"
        print(f"check {dtype}: {'ok' if not failures else failures}", flush=True)
    path = _save(report, args.out, card)
    bench = _time_once if args.smoke else cuda_time_ms
    dtype = torch.float32 if args.smoke else torch.bfloat16
    print(f"{'shape':24s} {'backend':9s} {'fwd ms':>8s} {'fwd+bwd ms':>11s} {'TFLOP/s fwd':>12s} {'peak MiB':>9s}", flush=True)
    for name, case in (SMOKE_CASES if args.smoke else PAPER_CASES).items():
        for backend in ("triton", "torch", "dense-eq"):
            row = {}
            for backward in (False, True):
                fn = layer_fn(backend, case, backward, dev, dtype)
                row["fwd+bwd" if backward else "fwd"] = bench(fn)
                if not args.smoke:
                    row["peak_mb fwd+bwd" if backward else "peak_mb fwd"] = peak_memory_mb(fn)
            dims = (case[key] for key in ("T", "D", "H", "E", "k"))
            row["tflops_fwd"] = layer_flops(*dims) / row["fwd"] / 1e9
            report["timings"][f"{name} | {backend}"] = row
            print(f"{name:24s} {backend:9s} {row['fwd']:8.3f} {row['fwd+bwd']:11.3f} {row['tflops_fwd']:12.1f} "
                  f"{row.get('peak_mb fwd+bwd', 0):9.0f}", flush=True)
        _save(report, args.out, card)
    report["sampling"] = {}
    time_sampling(args.smoke, dev, bench, report)
    report["seconds"] = time.time() - STARTED
    _save(report, args.out, card)
    print(f"wrote {path}")
    return path


def _save(report: dict, out: str, card: str) -> Path:
    """Write the report so far: a run cut short keeps what it measured."""
    Path(out).mkdir(parents=True, exist_ok=True)
    path = Path(out) / f"gpu_check_{re.sub(r'[^A-Za-z0-9._-]+', '_', card).strip('_')}.json"
    path.write_text(json.dumps(report, indent=2))
    return path


if __name__ == "__main__":
    main()
