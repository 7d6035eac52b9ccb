"""One prepared GPU run: check every op against the reference, then time the layer and the model.

    PYTHONPATH=$PWD python3 benchmarks/gpu_check.py --out benchmarks/results
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --smoke --out /tmp/x   # the same code on CPU, tiny

Each part can run alone (``--parts``), in order:

- ``checks``: every op (forward and gradients) of the ``triton`` backend against
  ``moe_kernels.reference`` in fp64, in fp32 (IEEE and TF32 products), fp16 and bf16, once per
  design of the row GEMM kernel (``tuning.DESIGNS``: the tiled one, then the persistent TMA one).
- ``layers``: one MoE FFN layer (router, top-2 gating, SwiGLU experts, weighted combine: ``MoE``
  without shared experts, called as a model calls it) at the paper's shapes
  (``benchmarks.common.PAPER_CASES``) in bf16, forward and forward+backward, for the ``triton``
  and ``torch`` backends and ``dense-eq`` (one dense SwiGLU MLP over the T*k token copies: the
  same FLOPs without routing), with CUDA events, peak memory, the host (Python) time per call,
  the forward replayed as a CUDA graph (its GPU time alone), and each time as a ratio to
  ``torch``'s in the same run; and ``expert-choice``, ``fp8`` (the experts stored in FP8,
  ``MoE.to_fp8``: forward only; at XL/2-8E2A also ``fp8-nmajor``, its weights N-major instead of
  K-major) and ``fp8-train`` (``MoE(precision="fp8")``, FP8 training), the FP8 ones also as a
  ratio to ``triton``'s; ``triton-tiled``, the Triton layer with the row GEMMs' tiled design alone
  (``triton`` autotunes among every design, each launch picking its own: the table written
  says which won per launch), also as a ratio to ``triton``'s; at XL/2-8E2A and S/2-16E2A ``triton-prescaled``, the Triton layer with
  the backward's dL/dy weighted once for its two GEMMs (``tuning.PRESCALED_BACKWARD``), and
  ``triton-saved-out``, the routing weights' gradient from a pass over the forward's saved
  per-slot outputs instead of the input-gradient GEMM's epilogue (``tuning.WEIGHT_GRAD_IN_EPILOGUE``
  off), and ``triton-scattered``, the second GEMM and the input-gradient GEMM scattering their
  rows to slot order instead of each token gathering its rows in the combine
  (``tuning.GATHER_COMBINE`` off), and on a GPU whose TMA gathers rows (Blackwell)
  ``triton-pointer-gather``, the TMA design reading gathered rows by pointer loads instead
  (``tuning.TMA_GATHER`` off), and ``triton-pointer-store``, the TMA design storing its outputs
  by pointer stores instead of TMA stores (``tuning.TMA_STORE`` off), each also as a ratio to
  ``triton``'s.
- ``profile``: one forward+backward of the ``triton`` layer at three of those shapes, broken
  down kernel by kernel with ``torch.profiler`` (at the first, ``triton-prescaled`` and
  ``fp8-train`` too), and each grouped GEMM launch (the forward's two,
  the backward's ``act_grad`` and input-gradient ones, the two weight gradients: named by the
  profiler ranges ``grouped_mm`` opens around its launches) with its ms, TFLOP/s and fraction of
  the card's peak.
- ``training``: images/s of a DiT-MoE-S/2-8E2A training step at batch 256 (bf16 autocast and
  TF32) and of XL/2-8E2A at batch 32 (bf16), both backends.
- ``first-step``: seconds from a fresh process to the end of its first S/2-8E2A training step
  (batch 256, bf16, Triton), with an empty Triton cache, autotuning every launch and then with
  this run's table of tuned configs (the time a user's first step takes with and without the
  table shipped for their GPU).
- ``sampling``: one guided sampling step of DiT-MoE-S/2 and XL/2 at 256 px, eager and replayed as
  a CUDA graph (``dit.sampling.cuda_graphed``), both backends, with bf16 weights under bf16
  autocast as ``dit.sample --precision bf16`` runs it, and with FP8 experts as ``--precision
  fp8`` runs it.

Progress lines carry the seconds since the start. A row that fails records its error and the run
goes on; the JSON (named after the card) is written after each part, with the config the
autotuner chose for each key it tuned (``autotuned``), so a run cut short keeps what it measured,
and a summary is printed last. Every launch autotunes (``--table off``, the default: the GPU's
shipped table is not used), and what the autotuners chose is written after each part as the
table ``<card>.json`` in ``--tables`` (default ``OUT/configs``), added to what is there: the file
to ship in ``moe_kernels/configs/``. ``--smoke`` runs every part on CPU through the
Triton interpreter at tiny sizes, in fp32, timing each call once, so that the script a short GPU
lease depends on is itself tested (``benchmarks/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import triton

import moe_kernels as mk
from benchmarks.baselines import DenseSwiGLU
from benchmarks.common import PAPER_CASES, cuda_time_ms, layer_flops, peak_memory_mb, sync
from dit.diffusion import create_diffusion
from dit.models import create_model
from dit.precision import autocast, inference_weights, matmul_precision, training_precision
from dit.sampling import cuda_graphed, guided
from moe_kernels import reference, tuning
from moe_kernels.activations import ACTIVATIONS, projection_width
from moe_kernels.backend import INTERPRET
from moe_kernels.fp8 import check_fp8_tensor_cores
from moe_kernels.grouped_mm import grouped_mm_fp8_torch
from moe_kernels.tuning import (
    AUTOTUNE,
    TABLE_ENV,
    TABLES,
    TUNED_KERNELS,
    device_slug,
    has_tma,
    has_tma_gather,
    tuned_table,
    write_table,
)

STARTED = time.time()

SMOKE_CASES = {"smoke T=24": dict(T=24, D=32, H=64, E=4, k=2)}
# label: (dtype, TF32 products).
CHECK_DTYPES = {
    "fp32": (torch.float32, False),
    "fp32+tf32": (torch.float32, True),
    "fp16": (torch.float16, False),
    "bf16": (torch.bfloat16, False),
}
# The largest ||got - ref|| / ||ref|| against the fp64 reference that each passes with. ReLU's
# gradients are left out under TF32 and bf16: rounding moves pre-activations near 0 across the
# kink, so a few of its derivatives are 0 instead of 1 (seen on an H200: 1-2% of dx).
REL_ERROR = {"fp32": 1e-5, "fp32+tf32": 5e-3, "fp16": 5e-3, "bf16": 2e-2}


def say(message: str) -> None:
    """Progress with the seconds since the start: a run cut short still shows where time went."""
    print(f"[{time.time() - STARTED:6.0f} s] {message}", flush=True)


def check(
    label: str,
    dev: str = "cuda",
    T: int = 777,
    D: int = 256,
    H: int = 320,
    group_sizes: tuple[int, ...] = (0, 300, 1, 0, 476, 200, 400, 177),
) -> tuple[list[str], dict[str, float]]:
    """Compare every op to the reference in the dtype of ``CHECK_DTYPES[label]``, on ``T`` tokens of
    width ``D`` (expert width ``H``, 8 experts, top-2; ``grouped_mm`` on rows grouped by
    ``group_sizes``); return the failures as text and each comparison's relative error."""
    dtype, tf32 = CHECK_DTYPES[label]
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32  # the Triton GEMMs follow torch's switch
    try:
        return _check(label, dtype, dev, T, D, H, group_sizes)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _check(label, dtype, dev, T, D, H, group_sizes) -> tuple[list[str], dict[str, float]]:
    failures, errors = [], {}
    E, k = 8, 2
    kinked = dtype == torch.bfloat16 or label == "fp32+tf32"

    def compare(name, got, want):
        want = want.double()
        errors[name] = error = float((got.double() - want).norm() / want.norm().clamp_min(1e-30))
        if kinked and name.startswith("moe_ffn relu d"):
            return
        if not error <= REL_ERROR[label]:  # NaN fails too
            failures.append(f"{label} {name}: relative error {error:.1e} > {REL_ERROR[label]:.0e}")

    logits = torch.randn(T, E, device=dev, dtype=dtype, requires_grad=True)
    got = mk.topk_gating(logits, k, backend="triton")
    want = reference.topk_gating(logits.double(), k)  # references in fp64, free of TF32
    compare("topk_gating weights", got[0], want[0])
    compare("topk_gating probs", got[2], want[2])
    g1 = torch.autograd.grad(got[0].sum() + got[2].square().sum(), logits)[0]
    g2 = torch.autograd.grad(want[0].sum() + want[2].square().sum(), logits)[0]
    compare("topk_gating dlogits", g1, g2)

    probs = torch.softmax(torch.randn(T, E, device=dev), -1).requires_grad_()
    experts = torch.rand(T, E, device=dev).argsort(1)[:, :k]
    compare(
        "balance_loss", mk.balance_loss(probs, experts, E, backend="triton"), reference.balance_loss(probs, experts, E)
    )

    sizes = torch.tensor(group_sizes, device=dev)
    offsets = sizes.cumsum(0).int()
    x = torch.randn(int(sizes.sum()), D, device=dev, dtype=dtype, requires_grad=True)
    w = (torch.randn(E, D, H, device=dev) / D**0.5).to(dtype).requires_grad_()
    y = mk.grouped_mm(x, w, offsets, backend="triton")
    ref = reference.grouped_mm(x.double(), w.double(), offsets)
    compare("grouped_mm", y, ref)
    dy = torch.randn_like(ref)
    for name, a, b in zip(
        ("dx", "dw"),
        torch.autograd.grad((y.double() * dy).sum(), [x, w]),
        torch.autograd.grad((ref * dy).sum(), [x, w]),
    ):
        compare(f"grouped_mm {name}", a, b)

    if dtype in (torch.float16, torch.bfloat16) and fp8_unsupported(dev) is None:
        # FP8 experts: the kernel against its exact emulation (they differ in fp32 sum order and
        # the output's rounding), and the FP8 product against the full-precision one (~4%).
        x = torch.randn(int(sizes.sum()), D, device=dev, dtype=dtype)
        w_fp8, scale = mk.quantize_fp8(w.detach().float())
        y = mk.grouped_mm_fp8(x, w_fp8, scale, offsets, backend="triton")
        compare(
            "grouped_mm_fp8 vs emulation", y, grouped_mm_fp8_torch(x, w_fp8, scale, offsets, out_dtype=torch.float64)
        )
        errors["grouped_mm_fp8 vs full precision"] = float(
            (y.double() - reference.grouped_mm(x.double(), w.double(), offsets)).norm()
            / reference.grouped_mm(x.double(), w.double(), offsets).norm()
        )
        # FP8 training (precision="fp8"): the Triton forward and gradients against the emulation.
        leaves = (
            torch.randn(T, D, device=dev, dtype=dtype),
            torch.rand(T, k, device=dev),
            (torch.randn(E, D, 2 * H, device=dev) / D**0.5).to(dtype),
            (torch.randn(E, H, D, device=dev) / H**0.5).to(dtype),
        )
        dy = torch.randn(T, D, device=dev, dtype=dtype)
        results = []
        for backend in ("triton", "torch"):
            inputs = [t.clone().requires_grad_() for t in leaves]
            y = mk.moe_ffn(*inputs[:2], experts, *inputs[2:], backend=backend, precision="fp8")
            results.append([y, *torch.autograd.grad(y, inputs, dy)])
        for name, a, b in zip(("y", "dx", "dweights", "dw_in", "dw_out"), *results):
            compare(f"moe_ffn fp8 {name} vs emulation", a, b)

    # Every activation, the biased experts of an upcycled DiT (GELU-tanh) and of SwiGLU, the latter
    # with the backward's dL/dy weighted once (tuning.PRESCALED_BACKWARD), SwiGLU with the
    # weights' gradient from the saved outputs (tuning.WEIGHT_GRAD_IN_EPILOGUE off) and with rows
    # scattered to slot order by the GEMMs (tuning.GATHER_COMBINE off).
    variants = [(a, False, None) for a in ACTIVATIONS] + [("gelu_tanh", True, None), ("swiglu", True, None)]
    candidates = [("swiglu", True, "prescaled"), ("swiglu", False, "saved-out"), ("swiglu", False, "scattered")]
    for activation, biased, variant in [*variants, *candidates]:
        width = projection_width(activation, H)
        op = f"moe_ffn {activation}{' biased' if biased else ''}{f' {variant}' if variant else ''}"
        x = torch.randn(T, D, device=dev, dtype=dtype, requires_grad=True)
        weights = torch.rand(T, k, device=dev, requires_grad=True)
        w_in = (torch.randn(E, D, width, device=dev) / D**0.5).to(dtype).requires_grad_()
        w_out = (torch.randn(E, H, D, device=dev) / H**0.5).to(dtype).requires_grad_()
        biases = [torch.randn(E, n, device=dev).to(dtype).requires_grad_() for n in (width, D)] if biased else []
        with switched(variant):  # the forward chooses what the backward reads
            y = mk.moe_ffn(
                x, weights, experts, w_in, w_out, activation, backend="triton", **dict(zip(("b_in", "b_out"), biases))
            )
        ref = reference.moe_ffn(
            x.double(),
            weights.double(),
            experts,
            w_in.double(),
            w_out.double(),
            activation,
            *(b.double() for b in biases),
        )
        compare(op, y, ref)
        dy = torch.randn_like(ref)
        params = [x, weights, w_in, w_out, *biases]
        with switched(variant):
            got = torch.autograd.grad((y.double() * dy).sum(), params)
        for name, a, b in zip(
            ("dx", "dweights", "dw_in", "dw_out", "db_in", "db_out"), got, torch.autograd.grad((ref * dy).sum(), params)
        ):
            compare(f"{op} {name}", a, b)
    return failures, errors


# Candidates of the Triton backward, as the ``tuning`` switch each sets.
SWITCHES = {
    "prescaled": ("PRESCALED_BACKWARD", True),
    "saved-out": ("WEIGHT_GRAD_IN_EPILOGUE", False),
    "scattered": ("GATHER_COMBINE", False),
    "pointer-gather": ("TMA_GATHER", False),
    "pointer-store": ("TMA_STORE", False),
}
# Switches that change nothing on a GPU without the feature they turn off.
NEEDS = {"pointer-gather": has_tma_gather, "pointer-store": has_tma}


@contextlib.contextmanager
def switched(variant: str | None) -> Iterator[None]:
    """The Triton layer as the candidate ``variant`` (a key of ``SWITCHES``; ``None``: as it is)
    for the duration."""
    if variant is None:
        yield
        return
    name, value = SWITCHES[variant]
    saved = getattr(tuning, name)
    setattr(tuning, name, value)
    try:
        yield
    finally:
        setattr(tuning, name, saved)


# The layer variants beyond the backends, and the backend each runs on.
BACKEND_OF = {
    "expert-choice": "triton",
    "fp8": "triton",
    "fp8-nmajor": "triton",
    "fp8-train": "triton",
    "triton-prescaled": "triton",
    "triton-saved-out": "triton",
    "triton-scattered": "triton",
    "triton-pointer-gather": "triton",
    "triton-pointer-store": "triton",
    "triton-tiled": "triton",
}


def layer_fn(backend: str, case: dict, backward: bool, dev: str = "cuda", dtype=torch.bfloat16) -> Callable[[], object]:
    """One call of the layer at ``case`` (``T, D, H, E, k``): ``MoE`` on ``backend``, ``dense-eq``,
    ``expert-choice`` (Triton, each expert taking its best ``k * 256 / E`` tokens of every 256: the
    same FLOPs), ``fp8`` (Triton, the experts stored in FP8: ``MoE.to_fp8``, forward only; ``fp8-nmajor``
    the same with the FP8 weights laid out N-major instead of K-major) or
    ``fp8-train`` (Triton, ``MoE(precision="fp8")``: bf16 weights quantized on each call, the
    forward and input-gradient GEMMs in FP8)."""
    T, D, H, E, k = (case[key] for key in ("T", "D", "H", "E", "k"))
    x = torch.randn(T, D, device=dev, dtype=dtype, requires_grad=backward)
    grad = torch.randn(T, D, device=dev, dtype=dtype)
    if backend == "dense-eq":
        mlp = DenseSwiGLU(D, H).to(dev, dtype).requires_grad_(backward)

        def fn(x):
            return mlp(x.repeat_interleave(k, dim=0)).view(T, k, D).sum(1)
    else:
        # A forward-only timing records no autograd graph, for the baseline alike.
        options = {}
        if backend == "expert-choice":
            options = dict(router="expert-choice", group_size=256 if T % 256 == 0 else None)
        if backend == "fp8-train":
            options = dict(precision="fp8")
        fn = mk.MoE(D, H, E, k, num_shared_experts=0, backend=BACKEND_OF.get(backend, backend), **options)
        fn = fn.to(dev, dtype)
        if backend in ("fp8", "fp8-nmajor"):  # inference only: FP8-stored experts have no backward
            fn.eval().to_fp8()
        if backend == "fp8-nmajor":  # the same weights N-major, as a contiguous checkpoint holds them
            fn.w_in, fn.w_out = fn.w_in.contiguous(), fn.w_out.contiguous()
        fn.requires_grad_(backward)
    call = (lambda: fn(x).backward(grad)) if backward else (lambda: fn(x))
    if backend.removeprefix("triton-") in SWITCHES:

        def candidate():
            with switched(backend.removeprefix("triton-")):
                call()

        return candidate
    if backend == "triton-tiled":

        def tiled():
            with tuning.use_design("tiled"):
                call()

        return tiled
    return call


def fresh_model(
    name: str, backend: str, batch: int, dev: str, smoke: bool
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A freshly initialised ``name`` for 256 px images (32x32x4 latents, 1000 classes), or one
    block deep for 8x8 digits in the smoke run, with a random batch of inputs and labels."""
    shape = (
        dict(input_size=8, in_channels=1, num_classes=10)
        if smoke
        else dict(input_size=32, in_channels=4, num_classes=1000)
    )
    with torch.device(dev):  # initialise on the device: the XL model has 4.1B parameters
        model = create_model(name, moe_backend=backend, **shape, **dict(depth=1) if smoke else {})
    x = torch.randn(batch, shape["in_channels"], shape["input_size"], shape["input_size"], device=dev)
    y = torch.randint(0, shape["num_classes"], (batch,), device=dev)
    return model.to(dev), x, y


# name: (model, batch); one guided step of DiT-MoE at 256 px (32x32x4 latents), as the official
# code's sampler runs it (52.6 ms for S/2 batch 1 and 112 ms for XL/2 batch 8 on an H200).
SAMPLING_CASES = {
    "S/2-8E2A batch 1 + CFG": ("DiT-MoE-S/2-8E2A", 1),
    "S/2-8E2A batch 32 + CFG": ("DiT-MoE-S/2-8E2A", 32),
    "XL/2-8E2A batch 8 + CFG": ("DiT-MoE-XL/2-8E2A", 8),
}
SMOKE_SAMPLING_CASES = {"Ti/2-4E2A batch 2 + CFG (smoke)": ("DiT-MoE-Ti/2-4E2A", 2)}


def sampling_step(name: str, batch: int, backend: str, dev: str, smoke: bool) -> Callable:
    """One guided network evaluation ``step(x, t)`` of a freshly initialised model (on CUDA, as
    ``dit.sample --precision bf16`` runs it: bf16 weights under bf16 autocast; backend ``fp8``
    as ``--precision fp8``: the same with the routed experts in FP8), and its inputs."""
    model, x, labels = fresh_model(name, BACKEND_OF.get(backend, backend), batch, dev, smoke)
    model.eval()
    if not smoke:
        inference_weights(model, "fp8" if backend == "fp8" else "bf16")
    elif backend == "fp8":
        for moe in model.moe_layers():
            moe.to_fp8()
    t = torch.full((batch,), 500, device=dev)
    model_fn = guided(model, labels, cfg_scale=4.0)

    @torch.no_grad()
    def step(x, t):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=not smoke):
            return model_fn(x, t)

    return step, x, t


def time_sampling(smoke: bool, dev: str, bench: Callable, report: dict) -> None:
    """Eager and CUDA-graph time of one guided step, both backends; the graph as a ratio to eager."""
    for name, (model_name, batch) in (SMOKE_SAMPLING_CASES if smoke else SAMPLING_CASES).items():
        for backend in ("triton", "torch", "fp8"):

            def measure():
                step, x, t = sampling_step(model_name, batch, backend, dev, smoke)
                row = {"eager ms": bench(lambda: step(x, t))}
                if not smoke:
                    graphed = cuda_graphed(step)
                    graphed(x, t)  # warm-up and capture
                    row["cuda_graph ms"] = bench(lambda: graphed(x, t))
                    row["graph / eager"] = row["cuda_graph ms"] / row["eager ms"]
                return row

            guarded(report["sampling"], f"{name} | {backend}", measure, dev)


# name: (model, batch); one training step at 256 px (32x32x4 latents, 1000 classes): the official
# code trains S/2-8E2A at 633 img/s at batch 256 on an H200 (bf16 autocast).
# XL/2 at batch 32 needs about 84 GiB (python -m dit.memory, without the EMA): an H200's;
# on an H100 its row records the out-of-memory error.
TRAINING_CASES = {
    "S/2-8E2A batch 256": ("DiT-MoE-S/2-8E2A", 256, ("bf16", "tf32", "fp8")),
    "XL/2-8E2A batch 32": ("DiT-MoE-XL/2-8E2A", 32, ("bf16",)),
}
SMOKE_TRAINING_CASES = {
    "Ti/2-4E2A batch 4 (smoke)": ("DiT-MoE-Ti/2-4E2A", 4, ("tf32",))
}  # no bf16 dot in the interpreter


def training_step(
    model_name: str, batch: int, backend: str, precision: str, dev: str, smoke: bool
) -> Callable[[], None]:
    """One step of ``python -m dit.train`` without the data loader and the EMA: diffusion loss at
    random times plus the balance loss, backward, fused AdamW."""
    model, x, y = fresh_model(model_name, backend, batch, dev, smoke)
    training_precision(model, precision)
    objective = create_diffusion(learn_sigma=model.config.learn_sigma)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=dev == "cuda")
    device = torch.device(dev)

    def step():
        with matmul_precision(precision):
            with autocast(precision, device):
                loss = objective.training_losses(model, x, {"y": y})["loss"].mean()
            (loss + model.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_training(smoke: bool, dev: str, bench: Callable, report: dict) -> None:
    """Training images/s, both backends, in each case's precisions (bf16 autocast, TF32; FP8
    experts on Triton only: the PyTorch path emulates them)."""
    for name, (model_name, batch, precisions) in (SMOKE_TRAINING_CASES if smoke else TRAINING_CASES).items():
        for precision in precisions:
            # The smoke run spares the interpreter a training step: the step's code is the same.
            for backend in ("torch",) if smoke else ("triton",) if precision == "fp8" else ("triton", "torch"):

                def measure():
                    ms = bench(training_step(model_name, batch, backend, precision, dev, smoke))
                    return {"step ms": ms, "img/s": batch / ms * 1e3}

                guarded(report["training"], f"{name} {precision} | {backend}", measure, dev)


def fp8_unsupported(dev: str) -> str | None:
    """Why ``dev`` cannot run the FP8 rows (an A100 has no e4m3 tensor cores), or ``None``."""
    if dev != "cuda":
        return None
    try:
        check_fp8_tensor_cores(torch.device(dev))
    except ValueError as error:
        return str(error)
    return None


def guarded(section: dict, key: str, measure: Callable[[], dict], dev: str = "cuda") -> None:
    """``section[key] = measure()``, or the error it raised: one failure must not cost the rest of
    a short GPU lease; an FP8 row on a GPU without FP8 tensor cores records why it is skipped.
    Frees the GPU memory the measurement held."""
    skipped = fp8_unsupported(dev) if "fp8" in key else None
    try:
        row = {"skipped": skipped} if skipped else measure()
    except Exception as error:  # noqa: BLE001 - recorded and printed, the run goes on
        row = {"error": f"{type(error).__name__}: {error}"[:1000]}
        traceback.print_exc(limit=-3)
    section[key] = row
    say(f"{key:44s} " + " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _time_once(fn: Callable[[], object]) -> float:
    """Milliseconds of one call: the smoke run's stand-in for ``do_bench``, which needs CUDA."""
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def time_layers(smoke: bool, dev: str, bench: Callable, report: dict) -> None:
    """Each backend at each shape, forward and forward+backward, with ratios to ``torch``."""
    dtype = torch.float32 if smoke else torch.bfloat16
    for name, case in (SMOKE_CASES if smoke else PAPER_CASES).items():
        # Candidates beside the defaults at the shapes of their goals: FP8 weights N-major (quantize_fp8
        # lays them out K-major) and the layer's switches (SWITCHES).
        layouts = ("fp8-nmajor",) if smoke or name.startswith("XL/2-8E2A") else ()
        at_goal = smoke or name.startswith(("XL/2-8E2A", "S/2-16E2A"))
        switch_candidates = tuple(
            f"triton-{variant}"
            for variant in SWITCHES
            if at_goal and NEEDS.get(variant, lambda device: True)(torch.device(dev))
        )
        designs = ("triton-tiled",)  # "triton" autotunes among every design: each GEMM launch picks its own
        for backend in (
            "triton", *designs, *switch_candidates, "torch", "dense-eq", "expert-choice", "fp8", *layouts, "fp8-train"
        ):  # fmt: skip

            def measure():
                row = {}
                for backward in (False,) if backend.startswith("fp8") and backend != "fp8-train" else (False, True):
                    fn = layer_fn(backend, case, backward, dev, dtype)
                    part = "fwd+bwd" if backward else "fwd"
                    row[f"{part} ms"] = bench(fn)
                    row[f"host {part} ms"] = host_ms(fn, calls=1 if smoke else 10)
                    if not smoke:
                        row[f"peak MiB {part}"] = peak_memory_mb(fn)
                    if not smoke and not backward:
                        row["fwd graph ms"] = graphed_ms(fn, bench)
                dims = (case[key] for key in ("T", "D", "H", "E", "k"))
                row["TFLOP/s fwd"] = layer_flops(*dims) / row["fwd ms"] / 1e9
                return row

            guarded(report["timings"], f"{name} | {backend}", measure, dev)
        for base_name, compared in (
            (
                "torch",
                ("triton", *designs, *switch_candidates, "dense-eq", "expert-choice", "fp8", *layouts, "fp8-train"),
            ),
            ("triton", (*designs, *switch_candidates, "fp8", *layouts, "fp8-train")),
        ):
            base = report["timings"][f"{name} | {base_name}"]
            for backend in compared:
                row = report["timings"][f"{name} | {backend}"]
                for part in ("fwd", "fwd+bwd", "fwd graph"):
                    if isinstance(row.get(f"{part} ms"), float) and isinstance(base.get(f"{part} ms"), float):
                        row[f"{part} / {base_name}"] = row[f"{part} ms"] / base[f"{part} ms"]


def graphed_ms(fn: Callable[[], object], bench: Callable) -> float | str:
    """``fn`` captured in a CUDA graph and timed by its replays: its GPU time without the Python
    around the launches (which a model's previous layers hide, and a single timed call does not).
    The error, as text, if it cannot be captured."""
    try:
        replay = cuda_graphed(lambda x, t: fn())
        unused = torch.zeros(1, device="cuda")
        replay(unused, unused)  # warm-up and capture
        return bench(lambda: replay(unused, unused))
    except Exception as error:  # noqa: BLE001 - the row keeps its other timings
        return f"{type(error).__name__}: {error}"[:300]


def host_ms(fn: Callable[[], object], calls: int = 10) -> float:
    """Milliseconds of Python per call of ``fn``: the time to issue its work, not to run it. When
    it exceeds the GPU time, the GPU waits on the host (CUDA graphs remove it). ``fn`` is warm."""
    sync()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - started
    sync()
    return elapsed / calls * 1e3


# The shapes whose forward+backward is broken down kernel by kernel.
PROFILE_CASES = ("XL/2-8E2A T=16384", "S/2-16E2A T=32768", "XL sampling T=4096")


# Dense tensor-core peaks (TFLOP/s) per card, bf16/fp16, by a part of its name; FP8 doubles them
# (the A100 has none).
PEAK_TFLOPS = {
    "H100 80GB HBM3": 989.4, "H200": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "A100": 312.0, "B200": 2250.0,
}  # fmt: skip


def gemm_rates(trace, calls: int, smoke: bool) -> dict[str, dict[str, float]]:
    """Each grouped GEMM launch of a traced call (``grouped_mm``'s profiler ranges, named with its
    kernel, epilogue and sizes): ms per call (its kernels' time on the GPU), TFLOP/s and fraction
    of the card's peak. Read from the host-side ranges (the GPU-side copies of a range are not
    counted twice)."""
    card = "" if smoke else torch.cuda.get_device_name()
    peak = next((tflops for name, tflops in PEAK_TFLOPS.items() if name in card), None)
    totals: dict[str, list[float]] = {}
    for event in trace.events():
        if event.name.startswith("moe_kernels.") and event.device_type == torch.autograd.DeviceType.CPU:
            ms = (event.cpu_time_total if smoke else event.device_time_total) / 1e3
            label, flops = event.name.removeprefix("moe_kernels.").rsplit(" flops=", 1)
            total = totals.setdefault(label, [0.0, 0, 0])
            total[0], total[1], total[2] = total[0] + ms, total[1] + 1, total[2] + int(flops)
    rates = {}
    for label, (ms, launches, flops) in sorted(totals.items(), key=lambda item: -item[1][0]):
        row = {"ms": ms / calls, "launches": launches / calls, "TFLOP/s": flops / max(ms, 1e-9) / 1e9}
        if peak:
            row["of peak"] = row["TFLOP/s"] / (peak * (2 if "_fp8" in label else 1))
        rates[label] = row
    return rates


def profile_layers(smoke: bool, dev: str, report: dict, top: int = 12) -> None:
    """Where one forward+backward of the ``triton`` layer spends its time, kernel by kernel
    (operator by operator on the CPU), from ``torch.profiler``: ms per call, largest first; at
    the first shape the ``fp8-train`` layer's too (on the GPU)."""
    from torch.profiler import ProfilerActivity, profile

    dtype = torch.float32 if smoke else torch.bfloat16
    cases = SMOKE_CASES if smoke else {name: PAPER_CASES[name] for name in PROFILE_CASES}
    calls = 1 if smoke else 5
    for index, (name, case) in enumerate(cases.items()):
        for backend in ("triton", "triton-prescaled", "fp8-train") if index == 0 and not smoke else ("triton",):

            def measure():
                fn = layer_fn(backend, case, True, dev, dtype)
                fn()  # compiled and autotuned outside the trace
                sync()
                with profile(activities=[ProfilerActivity.CPU if smoke else ProfilerActivity.CUDA]) as trace:
                    for _ in range(calls):
                        fn()
                    sync()
                field = "self_cpu_time_total" if smoke else "self_device_time_total"
                events = [(event.key, getattr(event, field) / 1e3 / calls) for event in trace.key_averages()]
                # On the GPU a launch's kernel time shows twice: as its kernel and as its range.
                kept = [e for e in events if e[1] > 0 and (smoke or not e[0].startswith("moe_kernels."))]
                events = sorted(kept, key=lambda e: -e[1])
                return (
                    {"total ms": sum(ms for _, ms in events)}
                    | {key[:80]: ms for key, ms in events[:top]}
                    | {"gemms": gemm_rates(trace, calls, smoke)}
                )

            guarded(report["profile"], f"{name} | {backend} fwd+bwd", measure, dev)


FIRST_STEP = ("DiT-MoE-S/2-8E2A", 256, "bf16")
SMOKE_FIRST_STEP = ("DiT-MoE-Ti/2-4E2A", 4, "tf32")


def first_step(smoke: bool) -> dict:
    """In a fresh process: build ``FIRST_STEP``'s model and run one training step; how many launch
    keys the autotuners tuned."""
    model_name, batch, precision = SMOKE_FIRST_STEP if smoke else FIRST_STEP
    dev = "cpu" if smoke else "cuda"
    training_step(model_name, batch, "torch" if smoke else "triton", precision, dev, smoke)()
    sync()
    return {"keys tuned": sum(len(kernel.cache) for kernel in TUNED_KERNELS.values())}


def time_first_step(smoke: bool, table: Path, report: dict, timeout_s: float = 240) -> None:
    """``first_step`` in a child process with an empty Triton cache, autotuning, then with ``table``:
    the seconds from starting the process (imports included) to the end of its step."""
    for label, setting in (("autotuned", "off"), ("with table", str(table))):

        def measure(setting=setting):
            if setting != "off" and not Path(setting).is_file():
                raise FileNotFoundError(f"no table at {setting}: run the layers or training part first")
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, TABLE_ENV: setting, "TRITON_CACHE_DIR": cache}
                command = [sys.executable, "-m", "benchmarks.gpu_check", "--first-step-child", *["--smoke"] * smoke]
                start = time.perf_counter()
                child = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
                seconds = time.perf_counter() - start
            if child.returncode:
                raise RuntimeError(child.stderr.strip().splitlines()[-1] if child.stderr.strip() else "failed")
            return {"seconds": seconds, **json.loads(child.stdout.strip().splitlines()[-1])}

        guarded(report["first step"], label, measure)
    rows = report["first step"]
    if all("seconds" in rows.get(label, {}) for label in ("autotuned", "with table")):
        rows["with table"]["/ autotuned"] = rows["with table"]["seconds"] / rows["autotuned"]["seconds"]


class DesignTimings:
    """Every design's best time at every launch key the GEMM autotuners benchmark while
    ``recording`` (Triton keeps the timings of the last key only): ``rows[kernel][key] =
    {design: ms}``, the side-by-side comparison of the designs launch by launch."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, dict[str, float]]] = {}

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        kernels = {name: TUNED_KERNELS[name] for name in tuning.DESIGNED_KERNELS}
        for name, kernel in kernels.items():
            kernel.run = self._recorded(name, kernel, kernel.run)
        try:
            yield
        finally:
            for kernel in kernels.values():
                del kernel.run  # the class's own again

    def _recorded(self, name: str, kernel: triton.runtime.Autotuner, run: Callable) -> Callable:
        def recorded(*args, **kwargs):
            before = set(kernel.cache)
            out = run(*args, **kwargs)
            timings = getattr(kernel, "configs_timings", None) or {}
            for key in set(kernel.cache) - before:
                best = {}
                for config, times in timings.items():
                    ms = times[0] if isinstance(times, (list, tuple)) else times
                    design = tuning.design_of(config)
                    best[design] = min(best.get(design, float("inf")), float(ms))
                if best:
                    self.rows.setdefault(name, {})[tuning.cache_key_text(kernel, key)] = best
            return out

        return recorded

    def summary(self) -> dict[str, dict[str, float | int]]:
        """Per kernel: the launches timed with both designs, those where ``tma`` won, and the
        median of tiled / tma (above 1: tma faster)."""
        result = {}
        for name, rows in self.rows.items():
            both = [row for row in rows.values() if {"tiled", "tma"} <= set(row)]
            if both:
                ratios = sorted(row["tiled"] / row["tma"] for row in both)
                result[name] = {
                    "launches": len(both),
                    "tma won": sum(ratio > 1 for ratio in ratios),
                    "median tiled / tma": ratios[len(ratios) // 2],
                }
        return result


def autotuned() -> dict[str, dict[str, dict[str, int]]]:
    """The config the autotuner chose for each key it tuned, per GEMM kernel: which tiles won, and
    where the wgrad kernel's candidates all lose, what to try next."""
    return tuned_table(TUNED_KERNELS)


def summary(report: dict) -> str:
    """The lines a reader needs first: checks, layer ratios, training and sampling."""
    lines = [f"{report['card']} | torch {report['torch']} | triton {report['triton']}"]
    lines += [
        f"check {label}: {result if result == 'ok' else f'{len(result)} failures'}"
        for label, result in report["checks"].items()
    ]
    for key, row in report["timings"].items():
        if key.endswith(("triton", "triton-tiled", "triton-prescaled", "triton-saved-out", "dense-eq")):
            ratios = " ".join(
                f"{part} {row[f'{part} / torch']:.2f}x"
                for part in ("fwd", "fwd graph", "fwd+bwd")
                if f"{part} / torch" in row
            )
            lines.append(f"{key:36s} {ratios or row.get('error', '')}")
    for kernel, row in report.get("designs", {}).items():
        lines.append(
            f"designs {kernel}: tma won {row['tma won']} of {row['launches']} launches timed with both "
            f"(median tiled / tma {row['median tiled / tma']:.2f}x)"
        )
    for key, profile in report.get("profile", {}).items():
        for gemm, row in profile.get("gemms", {}).items():
            peak = f" {row['of peak']:.0%} of peak" if "of peak" in row else ""
            lines.append(f"profile {key} {gemm}: {row['ms']:.3f} ms {row['TFLOP/s']:.0f} TFLOP/s{peak}")
    for section in ("training", "first step", "sampling"):
        for key, row in report.get(section, {}).items():
            lines.append(
                f"{section} {key:40s} "
                + " ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            )
    return "\n".join(lines)


PARTS = ("checks", "layers", "profile", "training", "first-step", "sampling")


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--smoke", action="store_true", help="run every step on CPU, tiny, through the Triton interpreter")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run, in order")
    p.add_argument(
        "--checks", default=",".join(CHECK_DTYPES), help=f"the dtypes the checks run in, of {list(CHECK_DTYPES)}"
    )
    p.add_argument(
        "--table",
        default="off",
        help="tables of tuned configs: off (autotune every launch; the default), shipped, or a table's path",
    )
    p.add_argument(
        "--tables",
        default=None,
        help="folder of the table written (default: OUT/configs); give runs of one lease the same one to add up",
    )
    p.add_argument("--first-step-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.first_step_child:
        print(json.dumps(first_step(args.smoke)))
        return Path()
    if args.table != "shipped":
        os.environ[TABLE_ENV] = args.table
    if args.smoke and not INTERPRET:
        p.error("--smoke runs the kernels through the interpreter: set TRITON_INTERPRET=1")
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device; --smoke runs the script on CPU")
    parts, checks = args.parts.split(","), args.checks.split(",")
    if unknown := set(parts) - set(PARTS):
        p.error(f"unknown parts {sorted(unknown)}")
    if unknown := set(checks) - set(CHECK_DTYPES):
        p.error(f"unknown check dtypes {sorted(unknown)}")
    dev = "cpu" if args.smoke else "cuda"
    card = "smoke (CPU, interpreter)" if args.smoke else torch.cuda.get_device_name()
    report = {
        "card": card,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "autotune": AUTOTUNE,
        "checks": {},
        "check errors": {},
        "timings": {},
        "profile": {},
        "training": {},
        "first step": {},
        "sampling": {},
    }
    table = Path(args.tables or Path(args.out) / "configs") / f"{device_slug(card)}.json"
    designs = DesignTimings()
    bench = _time_once if args.smoke else cuda_time_ms
    for part in parts:
        say(f"part {part}")
        if part == "checks":
            # The interpreter's bf16 tl.dot is wrong, so the smoke run checks fp32 only.
            # Each design of the GEMM kernels alone: the autotuner (or MOE_KERNELS_AUTOTUNE=0) picks one otherwise.
            for dtype_label in ("fp32",) if args.smoke else checks:
                for design in tuning.DESIGNS:
                    label = dtype_label if design == "tiled" else f"{dtype_label} {design}"
                    tiny = dict(T=45, D=16, H=24, group_sizes=(0, 7, 1, 0, 12, 5, 9, 3))
                    with tuning.use_design(design):
                        failures, errors = check(dtype_label, dev, **tiny) if args.smoke else check(dtype_label)
                    report["checks"][label] = failures or "ok"
                    report["check errors"][label] = errors
                    say(
                        f"check {label}: {'ok' if not failures else failures} (largest relative error "
                        f"{max(errors.values()):.1e}, in {max(errors, key=errors.get)})"
                    )
        elif part == "layers":
            with designs.recording():
                time_layers(args.smoke, dev, bench, report)
            report["design timings"], report["designs"] = designs.rows, designs.summary()
        elif part == "profile":
            profile_layers(args.smoke, dev, report)
        elif part == "training":
            time_training(args.smoke, dev, bench, report)
        elif part == "first-step":
            time_first_step(args.smoke, table if table.is_file() else TABLES / table.name, report)
        else:
            time_sampling(args.smoke, dev, bench, report)
        report["seconds"] = time.time() - STARTED
        report["autotuned"] = autotuned()
        path = _save(report, args.out, card)
        write_table(table, TUNED_KERNELS, card)
    print(summary(report), flush=True)
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
