"""Compile every Triton kernel of moe_kernels for a Hopper GPU, on a machine without one.

The interpreter that runs the kernels in the tests accepts programs the GPU compiler rejects
(mixed-dtype ``tl.dot``, layouts, shared memory), so a kernel can pass every test here and still
fail to build on the GPU. This module closes that gap in two steps:

1. ``record_launches`` runs a small workload through the public ops under the interpreter and
   records each distinct kernel launch: argument types, ``tl.constexpr`` values and the
   specialization Triton's JIT would give it on the GPU.
2. ``compile_launches`` builds each one for ``sm_90a`` with Triton's NVIDIA backend and the
   ``ptxas`` it ships, in processes started without the interpreter: with the smallest autotune
   config (the one the autotuner can always fall back on), or with every config the GPU
   autotuner would try, reading registers and spills from ``ptxas`` and, from the machine
   code, whether any spill sits inside a loop.

    python -m benchmarks.hopper_compile      # the table of kernels x configs

Its public interface: ``record_launches``, ``compile_launches``, ``moe_workload``, ``table``,
``summary``, and for the machine code ``ptxas_report``, ``disassemble``, ``count_loop_spills``,
``longest_loop_opcodes`` and ``TARGET_CAPABILITY``; ``tests/moe_kernels/test_hopper_compile.py``
and ``experiments/`` use them.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from unittest import mock

import torch

TARGET_CAPABILITY = 90


def _specialize(value) -> tuple[str, str | None]:
    """Triton's own launch-time specialization of an argument: its signature type, or
    "constexpr" (None, and integers equal to 1), and "D" when divisible by 16 (or 16-byte aligned)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)
    return kind, attr if isinstance(attr, str) else None


def record_launches(workload: Callable[[], None]) -> list[dict]:
    """Run ``workload`` (interpreter mode) and return its distinct kernel launches, each
    ``{"module", "kernel", "signature": {arg: type or "constexpr"}, "constants": {arg: value},
    "attrs": {arg: "D" if divisible by 16}, "options": {num_warps, num_stages if given}}``."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: dict[str, dict] = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        values = dict(zip(self.arg_names, args)) | {k: v for k, v in kwargs.items() if k in self.arg_names}
        parameters = inspect.signature(self.fn).parameters.values()
        constexpr_args = {p.name for p in parameters if "constexpr" in str(p.annotation)}  # Triton's own rule
        signature, constants, attrs = {}, {}, {}
        for name in self.arg_names:
            kind, attr = ("constexpr", None) if name in constexpr_args else _specialize(values[name])
            signature[name] = kind
            if kind == "constexpr":
                constants[name] = values[name]
            elif attr:
                attrs[name] = attr
        launch = {
            "module": self.fn.__module__,
            "kernel": self.fn.__name__,
            "signature": signature,
            "constants": constants,
            "attrs": attrs,
            "options": {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs},
        }
        launches.setdefault(json.dumps(launch, sort_keys=True), launch)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        workload()
    finally:
        InterpretedFunction.run = run
    return list(launches.values())


def ptxas_report(ptx: str) -> dict:
    """Registers and spill bytes per thread that ptxas reports for ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [get_ptxas(TARGET_CAPABILITY).path, "-v", f"--gpu-name=sm_{TARGET_CAPABILITY}a", path, "-o", path + ".o"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {
        "registers": int(registers.group(1)) if registers else None,
        "spill_bytes": int(spills.group(1)) if spills else 0,
    }


def disassemble(cubin: bytes) -> str | None:
    """The kernel's SASS, from the ``nvdisasm`` beside Triton's ptxas (None without it)."""
    from triton.backends.nvidia.compiler import get_ptxas

    nvdisasm = os.path.join(os.path.dirname(get_ptxas(TARGET_CAPABILITY).path), "nvdisasm")
    if not os.path.isfile(nvdisasm):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout


def _spills_in_loops(cubin: bytes) -> int | None:
    """How many of the kernel's spill instructions (``STL``/``LDL`` in its SASS) sit inside a
    loop, that is between a backward branch and its target: those run on every K step; the
    others once per program. None without nvdisasm."""
    sass = disassemble(cubin)
    return None if sass is None else count_loop_spills(sass)


def _instructions_and_loops(sass: str) -> tuple[list[tuple[int, str]], list[tuple[int, int]]]:
    """``sass``'s (``nvdisasm -c`` output) instructions as ``(address, text)``, and its loops as
    ``(start, end)`` addresses: a backward ``BRA`` and the label it jumps to."""
    labels, branches, instructions, pending = {}, [], [], []
    for line in sass.splitlines():
        if label := re.match(r"^(\.L\w+):", line):
            pending.append(label.group(1))
        elif instruction := re.search(r"/\*([0-9a-f]+)\*/\s+(.*)", line):
            address, text = int(instruction.group(1), 16), instruction.group(2)
            labels.update(dict.fromkeys(pending, address))
            pending = []
            if target := re.search(r"\bBRA\b.*`\((\.L\w+)\)", text):
                branches.append((address, target.group(1)))
            instructions.append((address, text))
    loops = [(labels[target], address) for address, target in branches if labels.get(target, address) < address]
    return instructions, loops


def count_loop_spills(sass: str) -> int:
    """The ``STL``/``LDL`` instructions of ``sass`` (``nvdisasm -c`` output) that lie inside a loop."""
    instructions, loops = _instructions_and_loops(sass)
    spills = [address for address, text in instructions if re.search(r"\b(STL|LDL)\b", text)]
    return sum(any(start <= a <= end for start, end in loops) for a in spills)


def longest_loop_opcodes(sass: str) -> dict[str, int]:
    """How many instructions of each opcode (``LDGSTS``, ``STS``, ``HGMMA``...: predicates and
    modifiers dropped) the longest loop of ``sass`` holds: a GEMM kernel's K loop."""
    instructions, loops = _instructions_and_loops(sass)
    if not loops:
        return {}
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    opcodes = [
        re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0] for a, text in instructions if start <= a <= end
    ]
    return dict(collections.Counter(opcodes).most_common())


def _mma_kind(ptx: str) -> str:
    """Which tensor-core instruction the kernel's dots became: Hopper's asynchronous warpgroup
    MMA, the older per-warp MMA, or none (CUDA-core FMAs)."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    return "mma" if "mma.sync" in ptx else "none"


def _compile_one(launch: dict, full_report: bool) -> list[dict]:
    """Compile one recorded launch with its smallest autotune config or, for ``full_report``, with
    every config the GPU autotuner would try, adding ptxas's register and spill counts (this
    process must have imported triton without the interpreter)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.autotuner import Autotuner

    from moe_kernels.tuning import pipeline_size

    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    configs = kernel.configs if isinstance(kernel, Autotuner) else [None]
    if not full_report and configs[0] is not None:
        configs = [min(configs, key=pipeline_size)]
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    target = GPUTarget("cuda", TARGET_CAPABILITY, 32)
    backend = make_backend(target)
    attrs = {(kernel.arg_names.index(name),): backend.parse_attr(desc) for name, desc in launch["attrs"].items()}
    results = []
    for config in configs:
        constants = dict(launch["constants"])
        options = {"num_warps": 4, "num_stages": 3} | launch["options"]  # Triton's defaults
        if config is not None:  # the interpreter's config, recorded, gives way to the GPU's
            constants |= config.kwargs
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        result = {
            "kernel": launch["kernel"],
            "dtype": next(t[1:] for t in launch["signature"].values() if t.startswith("*")),
            "constants": launch["constants"],
            # Strides Triton cannot prove 16-byte aligned rule out vectorised loads.
            "aligned": all(
                name in launch["attrs"]
                for name, kind in launch["signature"].items()
                if name.startswith("stride") and kind != "constexpr"
            ),
            "config": {**(config.kwargs if config else {}), **options},
        }
        try:
            source = ASTSource(kernel, launch["signature"], constants, attrs)
            compiled = triton.compile(source, target=target, options=options)
            result |= {"ok": True, "shared_bytes": compiled.metadata.shared}
            if full_report:
                result |= ptxas_report(compiled.asm["ptx"]) | {
                    "mma": _mma_kind(compiled.asm["ptx"]),
                    "loop_spills": _spills_in_loops(compiled.asm["cubin"]),
                }
        except Exception as error:  # noqa: BLE001 - every failure is reported with its launch
            result |= {"ok": False, "error": f"{type(error).__name__}: {error}"[:2000]}
        results.append(result)
    return results


def compile_launches(
    launches: list[dict], full_report: bool = True, triton_dir: str | None = None, timeout: float = 1800
) -> list[dict]:
    """Compile ``launches`` (from ``record_launches``) for sm_90a in a fresh process without the
    interpreter; one result per launch and config compiled (see ``_compile_one``), in order.
    ``triton_dir``: a directory holding another Triton package to compile with."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_dir, root, os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.hopper_compile", "--compile"],
        input=json.dumps({"launches": launches, "full_report": full_report}),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=root,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"the compile process failed:\n{done.stderr[-4000:]}")
    report = json.loads(done.stdout)
    return [result | {"triton": report["triton"]} for result in report["results"]]


def nvidia_backend_missing() -> str | None:
    """Why kernels cannot be compiled for the GPU here, or None when they can. These are Triton
    internals, so a Triton that moves them is reported, not crashed on."""
    try:
        from triton._C.libtriton import native_specialize_impl  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.compiler import ASTSource, make_backend  # noqa: F401

        ptxas = get_ptxas(TARGET_CAPABILITY).path
    except Exception as error:  # noqa: BLE001 - any failure means no compiler to test with
        return f"Triton's NVIDIA backend, its ptxas or the internals used here are unavailable: {error!r}"
    return None if os.path.isfile(ptxas) else f"no ptxas at {ptxas}"


def moe_workload(
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16), tf32: bool = True
) -> Callable[[], None]:
    """Forward and backward of every public op, in each dtype, on tiny CPU tensors; with ``tf32``,
    fp32 once more with TF32 products (the trainer's default), which lowers ``tl.dot`` differently."""
    from moe_kernels import MoE, balance_loss, grouped_mm, swiglu_activation, topk_gating, tuning

    def run_ops(dtype: torch.dtype) -> None:
        # SwiGLU, GELU, an upcycled DiT's experts: GELU-tanh with biases (BIAS, BIAS_GRAD), relu²,
        # and SwiGLU with every option (clamp, sigmoid scale, up offset, softcaps: GPT-OSS-like).
        every_option = swiglu_activation(limit=7.0, alpha=1.702, up_offset=1.0, gate_softcap=4.0, up_softcap=25.0)
        for activation, biases in (
            ("swiglu", False), ("gelu", False), ("gelu_tanh", True), ("relu2", False), (every_option, True)
        ):  # fmt: skip
            layer = MoE(
                32, 32, num_experts=4, top_k=2, activation=activation, backend="triton", expert_biases=biases
            ).to(dtype)
            x = torch.randn(24, 32, dtype=dtype, requires_grad=True)
            out = layer(x)
            (out.float().square().mean() + layer.aux_loss).backward()
        # The backward with dL/dy gathered and weighted once (tuning.PRESCALED_BACKWARD): its plain GEMMs.
        layer = MoE(32, 32, num_experts=4, top_k=2, backend="triton").to(dtype)
        with mock.patch.object(tuning, "PRESCALED_BACKWARD", True):
            layer(torch.randn(24, 32, dtype=dtype, requires_grad=True)).float().square().mean().backward()
        # Expert choice: its selection and scatter kernels, and the combine with per-token counts.
        layer = MoE(32, 32, num_experts=4, top_k=2, router="expert-choice", group_size=12, backend="triton")
        layer.to(dtype)(torch.randn(2, 12, 32, dtype=dtype, requires_grad=True)).float().square().mean().backward()
        logits = torch.randn(24, 4, dtype=dtype, requires_grad=True)
        _, experts, probs = topk_gating(logits, 2, normalize=True, backend="triton")
        balance_loss(probs, experts, 4, backend="triton").backward()
        # DeepSeek-V3's routing: sigmoid scores, a selection bias, group-limited top-k, scaling.
        weights, _, _ = topk_gating(
            logits,
            2,
            normalize=True,
            backend="triton",
            score="sigmoid",
            bias=torch.zeros(4),
            num_groups=2,
            topk_groups=1,
            scale=2.5,
        )
        weights.sum().backward()
        # FP8 experts, trained (precision="fp8": the first GEMM storing its pre-activation, the
        # input gradients on transposed e4m3 weights) and stored (to_fp8, inference).
        for activation, biases in (("swiglu", False), ("gelu_tanh", True)):
            layer = MoE(
                32, 32, num_experts=4, top_k=2, activation=activation, backend="triton", expert_biases=biases,
                precision="fp8",
            ).to(dtype)  # fmt: skip
            layer(torch.randn(24, 32, dtype=dtype, requires_grad=True)).float().square().mean().backward()
            with torch.no_grad():
                layer.eval().to_fp8()(torch.randn(24, 32, dtype=dtype))
        for k, n in ((32, 48), (16, 24)):  # 16-byte aligned rows, as at real sizes, and not
            x = torch.randn(20, k, dtype=dtype, requires_grad=True)
            w = torch.randn(3, k, n, dtype=dtype, requires_grad=True)
            y = grouped_mm(x, w, torch.tensor([5, 5, 20], dtype=torch.int32), backend="triton")
            y.backward(torch.randn_like(y))  # a dense gradient: sum()'s would have stride 0

    def run() -> None:
        for dtype in dtypes:
            run_ops(dtype)
        if tf32:
            saved = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                run_ops(torch.float32)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = saved

    return run


_VARIANT_KEYS = (
    "EPILOGUE",
    "ACTIVATION",
    "GLU",
    "CLAMP",
    "UP_OFFSET",
    "GATE_CAP",
    "STORE_PREACT",
    "GATHER_A",
    "GATHER_B",
    "SCATTER_C",
    "SCALE",
    "BIAS",
    "BIAS_GRAD",
    "PRECISION",
)


def table(results: list[dict]) -> str:
    """A markdown table of ``compile_launches`` results; fits Hopper's limits or says why not."""
    from moe_kernels.tuning import SHARED_MEMORY_LIMIT

    lines = [
        "kernel | dtype | variant | aligned | config | compiles | tensor cores | registers | spill bytes | spills in loops | shared KiB",
        "---|---|---|---|---|---|---|---|---|---|---",
    ]
    for r in results:
        variant = " ".join(
            f"{k}={r['constants'][k]}" for k in _VARIANT_KEYS if r["constants"].get(k) not in (None, False)
        )
        config = " ".join(f"{k}={v}" for k, v in r["config"].items())
        head = f"{r['kernel']} | {r['dtype']} | {variant} | {'yes' if r['aligned'] else 'no'} | {config}"
        if not r["ok"]:
            lines.append(f"{head} | **no**: {r['error'].splitlines()[0][:160]} | | | | |")
            continue
        shared = f"{r['shared_bytes'] / 1024:.0f}" + (
            " (over the limit)" if r["shared_bytes"] > SHARED_MEMORY_LIMIT else ""
        )
        in_loops = "?" if r["loop_spills"] is None else r["loop_spills"]
        lines.append(f"{head} | yes | {r['mma']} | {r['registers']} | {r['spill_bytes']} | {in_loops} | {shared}")
    return "\n".join(lines)


def summary(results: list[dict]) -> str:
    """What a reader of the table needs first: what compiled, what cannot launch, what spills."""
    from moe_kernels.tuning import SHARED_MEMORY_LIMIT

    compiled = [r for r in results if r["ok"]]
    too_big = [r for r in compiled if r["shared_bytes"] > SHARED_MEMORY_LIMIT]
    half = [r for r in compiled if r["aligned"] and r["dtype"] in ("bf16", "fp16") and "grouped" in r["kernel"]]
    spilling = [r for r in half if r["spill_bytes"]]
    tensor_core = [
        r
        for r in compiled
        if r["aligned"]
        and "grouped" in r["kernel"]
        and r["mma"] == "wgmma"
        and r["shared_bytes"] <= SHARED_MEMORY_LIMIT
    ]
    loop_spilling = [r for r in tensor_core if r["loop_spills"]]
    wgmma = [r for r in half if r["mma"] == "wgmma"]
    return "\n".join(
        [
            (
                f"Every launch of the public ops' forward and backward (`moe_workload`), compiled for "
                f"sm_{TARGET_CAPABILITY}a by Triton {results[0]['triton']} with each autotune config: "
                "`python -m benchmarks.hopper_compile`."
            ),
            "",
            f"- {len(compiled)} of {len(results)} launch x config pairs compile.",
            (
                f"- {len(too_big)} need more shared memory than Hopper's {SHARED_MEMORY_LIMIT // 1024} KiB; "
                "the autotuner skips those configs on the GPU."
            ),
            (
                f"- {len(wgmma)} of the {len(half)} aligned bf16/fp16 GEMM pairs use wgmma; {len(spilling)} spill registers "
                "(spill bytes per thread, from ptxas)."
            ),
            (
                f"- {len(loop_spilling)} of the {len(tensor_core)} aligned wgmma GEMM pairs (bf16, fp16, TF32) that fit in "
                "shared memory spill inside a loop. *spills in loops* counts the spill instructions (`STL`/`LDL` in "
                "the SASS, from `nvdisasm`) between a backward branch and its target: those run on every K step; "
                "the others, after the loop, once per tile."
            ),
            (
                "- *aligned*: every runtime stride is a multiple of 16 elements, as at real model sizes; the "
                "unaligned launches (rows of 16 x 24) show the fallback Triton takes without 16-byte alignment."
            ),
            (
                "- fp32 with PRECISION=ieee (torch's default `allow_tf32=False`, and `--precision fp32`) runs "
                "`tl.dot` on CUDA cores, hence its registers; PRECISION=tf32 (the trainer's default) uses tensor cores."
            ),
        ]
    )


def main() -> None:
    if sys.argv[1:] == ["--compile"]:
        import triton

        job = json.loads(sys.stdin.read())
        full_report = [job["full_report"]] * len(job["launches"])
        with ProcessPoolExecutor(max(1, min(len(job["launches"]), os.cpu_count() or 1))) as pool:
            results = [result for results in pool.map(_compile_one, job["launches"], full_report) for result in results]
        json.dump({"triton": triton.__version__, "results": results}, sys.stdout)
        return
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hopper_compile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument(
        "--triton", metavar="DIR", help="compile with the Triton in DIR (pip install --target DIR triton==3.6.0)"
    )
    args = parser.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "1")
    results = compile_launches(record_launches(moe_workload()), triton_dir=args.triton)
    text = f"{summary(results)}\n\n{table(results)}\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if not all(r["ok"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
