"""Compile every Triton kernel of moe_kernels for the GPUs users have (A100 ``sm_80``, H100/H200
``sm_90a``, B200 ``sm_100a``), on a machine without one.

The interpreter that runs the kernels in the tests accepts programs the GPU compiler rejects
(mixed-dtype ``tl.dot``, layouts, shared memory), so a kernel can pass every test here and still
fail to build on the GPU. This module closes that gap in two steps:

1. ``record_launches`` runs a small workload through the public ops under the interpreter and
   records each distinct kernel launch: argument types, ``tl.constexpr`` values and the
   specialization Triton's JIT would give it on the GPU.
2. ``compile_launches`` builds each one for a target (``TARGETS``) with Triton's NVIDIA backend and the
   ``ptxas`` it ships, in processes started without the interpreter: with the smallest autotune
   config (the one the autotuner can always fall back on), or with every config the GPU's
   autotuner would compile for that launch (its candidates after ``early_config_prune``, run as
   on the target: its shared memory, no table of tuned configs), reading registers and spills
   from ``ptxas`` and, from the machine code, whether any spill sits inside a loop.

    python -m benchmarks.gpu_compile [--target sm_80|sm_90a|sm_100a]   # the table of kernels x configs

Its public interface: ``record_launches``, ``compile_launches``, ``gpu_candidates``, ``moe_workload``,
``table``, ``summary``, and for the machine code ``ptxas_report``, ``disassemble``, ``count_loop_spills``,
``longest_loop_opcodes`` and ``TARGETS``; ``tests/moe_kernels/test_gpu_compile.py``
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

# The GPUs compiled for, by ptxas's name for the architecture (``a``: its architecture-specific
# features, wgmma and TMA on Hopper, tcgen05 on Blackwell): compute capability and the shared
# memory one block may use (A100 163 KiB, Hopper and Blackwell 227 KiB).
TARGETS = {"sm_80": (80, 166912), "sm_90a": (90, 232448), "sm_100a": (100, 232448)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Triton's names of the pointer types the pruning reads, as torch dtypes.
_POINTEES = {**DTYPES, "fp8e4nv": torch.float8_e4m3fn, "i32": torch.int32, "i64": torch.int64}


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


def _ptxas(target: str) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(TARGETS[target][0]).path


def ptxas_report(ptx: str, target: str = "sm_90a") -> dict:
    """Registers and spill bytes per thread that ptxas reports for ``ptx`` on ``target``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [_ptxas(target), "-v", f"--gpu-name={target}", path, "-o", path + ".o"],
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


def disassemble(cubin: bytes, target: str = "sm_90a") -> str | None:
    """The kernel's SASS, from the ``nvdisasm`` beside Triton's ptxas (None without it)."""
    nvdisasm = os.path.join(os.path.dirname(_ptxas(target)), "nvdisasm")
    if not os.path.isfile(nvdisasm):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout


def _machine_code(cubin: bytes, target: str) -> dict:
    """From the kernel's SASS: its spill instructions inside loops (``count_loop_spills``), its
    TMA loads (``UTMALDG``), those that gather rows (Blackwell's ``UTMALDG.2D.GATHER4``), its TMA
    stores (``UTMASTG``) and the instructions of its K loop (``k_loop_opcodes``); None each
    without nvdisasm."""
    sass = disassemble(cubin, target)
    if sass is None:
        keys = ("loop_spills", "k_loop_spills", "tma_loads", "tma_gathers", "tma_stores", "k_step")
        return dict.fromkeys(keys)
    return {
        "loop_spills": count_loop_spills(sass),
        "k_loop_spills": count_k_loop_spills(sass),
        "tma_loads": len(re.findall(r"\bUTMALDG\b", sass)),
        "tma_gathers": len(re.findall(r"\bUTMALDG\.\w+\.GATHER4\b", sass)),
        "tma_stores": len(re.findall(r"\bUTMASTG\b", sass)),
        "k_step": sum(k_loop_opcodes(sass).values()) or None,
    }


def _instructions_and_loops(sass: str) -> tuple[list[tuple[int, str]], list[tuple[int, int]]]:
    """``sass``'s (``nvdisasm -c`` output) instructions as ``(address, text)``, and its loops as
    ``(start, end)`` addresses: a backward ``BRA`` and the label it jumps to, where the code
    between can run on into the branch. ptxas places the retry of a barrier wait after the
    kernel's last ``EXIT`` and branches from there back to the wait: a backward branch over an
    unconditional ``EXIT`` is that return, not a loop."""
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
    exits = [address for address, text in instructions if re.match(r"EXIT\b", text)]
    loops = [
        (labels[target], address)
        for address, target in branches
        if labels.get(target, address) < address and not any(labels[target] <= e < address for e in exits)
    ]
    return instructions, loops


def count_loop_spills(sass: str) -> int:
    """The ``STL``/``LDL`` instructions of ``sass`` (``nvdisasm -c`` output) that lie inside a loop."""
    instructions, loops = _instructions_and_loops(sass)
    spills = [address for address, text in instructions if re.search(r"\b(STL|LDL)\b", text)]
    return sum(any(start <= a <= end for start, end in loops) for a in spills)


def _opcode(text: str) -> str:
    """An instruction's opcode with its modifiers (``HGMMA.64x128x16.F32.BF16``), predicate dropped."""
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def _opcodes(instructions: list[tuple[int, str]], start: int, end: int) -> dict[str, int]:
    opcodes = [_opcode(text).split(".")[0] for a, text in instructions if start <= a <= end]
    return dict(collections.Counter(opcodes).most_common())


def longest_loop_opcodes(sass: str) -> dict[str, int]:
    """How many instructions of each opcode (``LDGSTS``, ``STS``, ``HGMMA``...: predicates and
    modifiers dropped) the longest loop of ``sass`` holds: a GEMM kernel's K loop."""
    instructions, loops = _instructions_and_loops(sass)
    if not loops:
        return {}
    return _opcodes(instructions, *max(loops, key=lambda loop: loop[1] - loop[0]))


def _k_loop(sass: str) -> tuple[list[tuple[int, str]], tuple[int, int] | None]:
    """``sass``'s instructions and its K loop: the innermost loop that holds a tensor-core
    instruction (``HMMA``, ``HGMMA``, Blackwell's ``UTC*MMA``) or, in a kernel without one (dots
    on CUDA cores), an ``FFMA``; also inside a persistent kernel's loop over tiles. None where no
    loop multiplies."""
    instructions, loops = _instructions_and_loops(sass)
    opcodes = {a: _opcode(text) for a, text in instructions if text}
    multiplies = [a for a, op in opcodes.items() if op.split(".")[0].endswith("MMA")]  # not HFMA2.MMA, a move
    multiplies = multiplies or [a for a, op in opcodes.items() if op.startswith("FFMA")]
    # Blackwell issues each MMA from one elected thread, in a loop of its own that branches back
    # while any thread has not issued (``BRA.U.ANY``): not a loop over K.
    loops = [(s, e) for s, e in loops if not opcodes[e].startswith("BRA.U.ANY")]
    with_mma = [(s, e) for s, e in loops if any(s <= a <= e for a in multiplies)]
    return instructions, min(with_mma, key=lambda loop: loop[1] - loop[0]) if with_mma else None


def k_loop_opcodes(sass: str) -> dict[str, int]:
    """The opcodes of the K loop of ``sass`` (``_k_loop``): a GEMM's K step. Empty where no loop multiplies."""
    instructions, loop = _k_loop(sass)
    return {} if loop is None else _opcodes(instructions, *loop)


def count_k_loop_spills(sass: str) -> int:
    """The ``STL``/``LDL`` instructions inside the K loop of ``sass``: spills paid on every K step
    (a persistent kernel's epilogue spills sit in its loop over tiles, once per tile)."""
    opcodes = k_loop_opcodes(sass)
    return opcodes.get("STL", 0) + opcodes.get("LDL", 0)


def _mma_kind(ptx: str) -> str:
    """Which tensor-core instruction the kernel's dots became: Blackwell's tensor-memory MMA,
    Hopper's asynchronous warpgroup MMA, the per-warp MMA (Ampere's), or none (CUDA-core FMAs)."""
    if "tcgen05.mma" in ptx:
        return "tcgen05"
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    return "mma" if "mma.sync" in ptx else "none"


def _compile_one(launch: dict, full_report: bool, target: str, designs: list[str] | None = None) -> list[dict]:
    """Compile one recorded launch with the smallest config of each design its pruning keeps or,
    for ``full_report``, with every config the GPU's autotuner compiles for it (``gpu_candidates``;
    of ``designs`` only, if given), adding ptxas's register and spill counts and what the machine code shows (this
    process must have imported triton without the interpreter)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.autotuner import Autotuner

    from moe_kernels.tuning import DESIGNS, design_of, smallest_of_each_design

    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    launch = launch | {"constants": _as_launched_on(launch["constants"], target)}
    # Strides Triton cannot prove 16-byte aligned rule out vectorised loads (and TMA).
    aligned = all(
        name in launch["attrs"]
        for name, kind in launch["signature"].items()
        if name.startswith("stride") and kind != "constexpr"
    )
    configs = kernel.configs if isinstance(kernel, Autotuner) else [None]
    if configs[0] is not None:
        # As the GPU's pruning does: no persistent design without TMA (before Hopper) or where
        # the launcher found b unreadable by TMA (B_TMA).
        tma = launch["constants"].get("B_TMA", False) and TARGETS[target][0] >= 90
        configs = [c for c in configs if (tma or design_of(c) != "tma") and design_of(c) in (designs or DESIGNS)]
        configs = gpu_candidates(kernel, configs, launch, target)
        configs = configs if full_report else smallest_of_each_design(configs)
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    gpu = GPUTarget("cuda", TARGETS[target][0], 32)
    backend = make_backend(gpu)
    attrs = {(kernel.arg_names.index(name),): backend.parse_attr(desc) for name, desc in launch["attrs"].items()}
    results = []
    for config in configs:
        constants = dict(launch["constants"])
        options = {"num_warps": 4, "num_stages": 3} | launch["options"]  # Triton's defaults
        if config is not None:  # the interpreter's config, recorded, gives way to the GPU's
            constants |= config.kwargs
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        result = {
            "target": target,
            "kernel": launch["kernel"],
            "dtype": next(t[1:] for t in launch["signature"].values() if t.startswith("*")),
            "constants": launch["constants"],
            "aligned": aligned,
            "config": {**(config.kwargs if config else {}), **options},
        }
        try:
            source = ASTSource(kernel, launch["signature"], constants, attrs)
            compiled = triton.compile(source, target=gpu, options=options)
            result |= {"ok": True, "shared_bytes": compiled.metadata.shared}
            if full_report:
                ptx = compiled.asm["ptx"]
                result |= (
                    ptxas_report(ptx, target) | {"mma": _mma_kind(ptx)} | _machine_code(compiled.asm["cubin"], target)
                )
        except Exception as error:  # noqa: BLE001 - every failure is reported with its launch
            result |= {"ok": False, "error": f"{type(error).__name__}: {error}"[:2000]}
        results.append(result)
    return results


def _as_launched_on(constants: dict, target: str) -> dict:
    """A launch's constexprs (recorded under the interpreter, which has every TMA feature) as the
    launcher sets them on ``target``: gathered rows read by TMA only where TMA gathers (Blackwell)."""
    from moe_kernels.tuning import TMA_GATHER_CAPABILITY

    gathers = divmod(TARGETS[target][0], 10) >= TMA_GATHER_CAPABILITY
    if constants.get("GATHER_A") and constants.get("A_TMA") and not gathers:
        return constants | {"A_TMA": False}
    return constants


def gpu_candidates(kernel, configs: list, launch: dict, target: str) -> list:
    """The configs ``kernel``'s autotuner compiles for ``launch`` on ``target``: its
    ``early_config_prune`` given the launch's pointer dtypes (as empty meta tensors), its strides
    (16 where Triton specialized them as divisible by 16, else 24), its constexprs, and the
    target's compute capability and shared memory."""
    from moe_kernels import tuning

    prune = getattr(kernel, "early_config_prune", None)
    if prune is None:
        return configs
    named = {
        name: torch.empty(0, dtype=_POINTEES[kind[1:]], device="meta")
        for name, kind in launch["signature"].items()
        if kind[1:] in _POINTEES and kind.startswith("*")
    }
    named |= {
        name: 16 if name in launch["attrs"] else 24
        for name, kind in launch["signature"].items()
        if name.startswith("stride") and kind != "constexpr"
    }
    compute, shared = TARGETS[target]
    with (
        mock.patch.object(tuning, "shared_memory_limit", lambda device: shared),
        mock.patch.object(tuning, "capability", lambda device: divmod(compute, 10)),
    ):
        return prune(configs, named, **launch["constants"])


def compile_launches(
    launches: list[dict],
    full_report: bool = True,
    triton_dir: str | None = None,
    timeout: float | None = 1800,
    target: str = "sm_90a",
    designs: list[str] | None = None,
) -> list[dict]:
    """Compile ``launches`` (from ``record_launches``) for ``target`` (a key of ``TARGETS``) in a
    fresh process without the interpreter; one result per launch and config compiled (see
    ``_compile_one``; ``designs``: only the GEMM kernels' configs of these designs), in order.
    ``triton_dir``: a directory holding another Triton to compile with; ``timeout``: seconds
    for all of it (None: no limit)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_dir, root, os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_compile", "--compile"],
        input=json.dumps({"launches": launches, "full_report": full_report, "target": target, "designs": designs}),
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


def nvidia_backend_missing(target: str = "sm_90a") -> str | None:
    """Why kernels cannot be compiled for the GPU here, or None when they can. These are Triton
    internals, so a Triton that moves them is reported, not crashed on."""
    try:
        from triton._C.libtriton import native_specialize_impl  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.compiler import ASTSource, make_backend  # noqa: F401

        ptxas = get_ptxas(TARGETS[target][0]).path
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
        # The backward with dL/dy gathered and weighted once (tuning.PRESCALED_BACKWARD): its plain
        # GEMMs; the GEMMs scattering their rows to slot order (tuning.GATHER_COMBINE off).
        for switch, value in (("PRESCALED_BACKWARD", True), ("GATHER_COMBINE", False)):
            layer = MoE(32, 32, num_experts=4, top_k=2, backend="triton").to(dtype)
            with mock.patch.object(tuning, switch, value):
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
    "B_TRANSPOSED",
)


def table(results: list[dict]) -> str:
    """A markdown table of ``compile_launches`` results; fits the target's limits or says why not."""
    lines = [
        "kernel | dtype | variant | aligned | config | compiles | tensor cores | registers | spill bytes | spills in loops"
        " | K-loop spills | TMA loads | TMA stores | K step | shared KiB",
        "---|---|---|---|---|---|---|---|---|---|---|---|---|---|---",
    ]
    for r in results:
        variant = " ".join(
            f"{k}={r['constants'][k]}" for k in _VARIANT_KEYS if r["constants"].get(k) not in (None, False)
        )
        config = " ".join(f"{k}={v}" for k, v in r["config"].items())
        head = f"{r['kernel']} | {r['dtype']} | {variant} | {'yes' if r['aligned'] else 'no'} | {config}"
        if not r["ok"]:
            lines.append(f"{head} | **no**: {r['error'].splitlines()[0][:160]} | | | | | | | | |")
            continue
        shared = f"{r['shared_bytes'] / 1024:.0f}" + (
            " (over the limit)" if r["shared_bytes"] > TARGETS[r["target"]][1] else ""
        )
        code = " | ".join(
            "?" if r.get(key) is None else str(r[key])
            for key in ("loop_spills", "k_loop_spills", "tma_loads", "tma_stores", "k_step")
        )
        lines.append(f"{head} | yes | {r['mma']} | {r['registers']} | {r['spill_bytes']} | {code} | {shared}")
    return "\n".join(lines)


def _persistent_line(persistent: list[dict], results: list[dict], mma: str, target: str) -> str:
    """The TMA design in one line: TMA loads, spills, and its K step beside the tiled design's
    at the same launch and tiles (the median of the ratios)."""
    if not persistent:
        return f"- The TMA design is left out on {target}, as the GPU's pruning leaves it out: no TMA."
    tiled = {
        (r["kernel"], json.dumps(r["constants"], sort_keys=True), json.dumps({**r["config"], "TMA": True})): r
        for r in results
        if r["ok"] and r["config"].get("TMA") is False
    }
    ratios = []
    for r in persistent:
        twin = tiled.get((r["kernel"], json.dumps(r["constants"], sort_keys=True), json.dumps(r["config"])))
        if twin and twin.get("k_step") and r.get("k_step"):
            ratios.append(r["k_step"] / twin["k_step"])
    ratio = f"{sorted(ratios)[len(ratios) // 2]:.2f}x" if ratios else "?"
    return (
        f"- The TMA design (TMA=True; the row kernel persistent): {len(persistent)} aligned {mma} pairs that fit; "
        f"{sum(bool(r['tma_loads']) for r in persistent)} load by TMA (`UTMALDG` in the SASS), "
        f"{sum(bool(r.get('tma_gathers')) for r in persistent)} of them gathering rows by TMA "
        "(`UTMALDG.2D.GATHER4`: the gathered launches, on Blackwell only), "
        f"{sum(bool(r.get('tma_stores')) for r in persistent)} store by TMA (`UTMASTG`: those whose output rows "
        "are not scattered), "
        f"{sum(bool(r.get('k_loop_spills')) for r in persistent)} spill inside the K loop (*K-loop spills*; those in "
        f"its loop over tiles, {sum(bool(r['loop_spills']) for r in persistent)}, are the epilogue's, once per tile); "
        "its K step (*K step*: the "
        f"instructions of the innermost loop holding the MMA) is {ratio} the tiled design's at the same launch "
        f"and tiles (median of {len(ratios)} pairs)."
    )


def summary(results: list[dict]) -> str:
    """What a reader of the table needs first: what compiled, what cannot launch, what spills."""
    target = results[0]["target"]
    limit = TARGETS[target][1]
    mma = {"sm_80": "mma", "sm_90a": "wgmma", "sm_100a": "tcgen05"}[target]
    compiled = [r for r in results if r["ok"]]
    too_big = [r for r in compiled if r["shared_bytes"] > limit]
    half = [r for r in compiled if r["aligned"] and r["dtype"] in ("bf16", "fp16") and "grouped" in r["kernel"]]
    spilling = [r for r in half if r["spill_bytes"]]
    tensor_core = [
        r
        for r in compiled
        if r["aligned"] and "grouped" in r["kernel"] and r["mma"] == mma and r["shared_bytes"] <= limit
    ]
    persistent = [r for r in tensor_core if r["config"].get("TMA")]
    tiled = [r for r in tensor_core if not r["config"].get("TMA")]
    loop_spilling = [r for r in tiled if r["loop_spills"]]
    fastest = [r for r in half if r["mma"] == mma]
    gemms = [r for r in compiled if "grouped" in r["kernel"] and r["shared_bytes"] <= limit]
    k_spilling = [r for r in gemms if r.get("k_loop_spills")]
    unfound = [r for r in gemms if r.get("k_step") is None and r.get("loop_spills")]
    return "\n".join(
        [
            (
                f"Every launch of the public ops' forward and backward (`moe_workload`), compiled for "
                f"{target} by Triton {results[0]['triton']} with each config its autotuner compiles there (the "
                "candidates its pruning keeps at the target's shared memory): "
                f"`python -m benchmarks.gpu_compile --target {target}`."
            ),
            "",
            f"- {len(compiled)} of {len(results)} launch x config pairs compile.",
            (
                f"- {len(too_big)} need more shared memory than the target's {limit // 1024} KiB: the pruning's "
                "estimate (the pipeline's tiles) let them through, the compiled kernel needs more; the autotuner "
                "skips a config that cannot launch."
            ),
            (
                f"- {len(fastest)} of the {len(half)} aligned bf16/fp16 GEMM pairs use {mma}; {len(spilling)} spill registers "
                "(spill bytes per thread, from ptxas)."
            ),
            (
                f"- {len(loop_spilling)} of the {len(tiled)} aligned {mma} GEMM pairs (bf16, fp16, TF32) of the tiled "
                "design that fit in shared memory spill inside a loop. *spills in loops* counts the spill instructions "
                "(`STL`/`LDL` in the SASS, from `nvdisasm`) between a backward branch and its target: in the tiled "
                "design those run on every K step; the others, after the loop, once per tile."
            ),
            _persistent_line(persistent, results, mma, target),
            (
                f"- **{len(k_spilling)} of the {len(gemms)} GEMM pairs that fit (every design, dtype and launch, "
                "aligned or not) spill inside their K loop** (*K-loop spills*: the innermost loop holding the MMA, "
                "or the FFMA where the dots run on CUDA cores); the pruning drops the configs that do, per "
                f"launch and GPU generation. {len(unfound)} spill in a loop where no K loop was found."
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
        count = len(job["launches"])
        with ProcessPoolExecutor(max(1, min(count, os.cpu_count() or 1))) as pool:
            done = pool.map(
                _compile_one,
                job["launches"],
                [job["full_report"]] * count,
                [job["target"]] * count,
                [job.get("designs")] * count,
            )
            results = [result for results in done for result in results]
        json.dump({"triton": triton.__version__, "results": results}, sys.stdout)
        return
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_compile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", choices=sorted(TARGETS), default="sm_90a", help="the GPU architecture")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=sorted(DTYPES),
        default=sorted(DTYPES),
        help="the workload's dtypes (fp32 runs with IEEE and TF32 products); bf16 alone, the GPUs' training "
        "dtype, takes about a quarter of the time",
    )
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument(
        "--triton", metavar="DIR", help="compile with the Triton in DIR (pip install --target DIR triton==3.6.0)"
    )
    args = parser.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from moe_kernels.fp8 import FP8_CAPABILITY  # after the interpreter is chosen: moe_kernels reads it

    dtypes = tuple(DTYPES[name] for name in args.dtypes)
    launches = record_launches(moe_workload(dtypes, tf32="fp32" in args.dtypes))
    note = ""
    if divmod(TARGETS[args.target][0], 10) < FP8_CAPABILITY:  # the launcher refuses FP8 there in one line
        launches = [launch for launch in launches if "fp8" not in launch["kernel"]]
        note = f"\n- The FP8 kernel's launches are left out: {args.target} has no e4m3 tensor cores (a launch says so)."
    # Every config the pruning keeps, of every launch: 6-16 minutes on two cores for every dtype, so no time limit here.
    results = compile_launches(launches, triton_dir=args.triton, target=args.target, timeout=None)
    if sorted(args.dtypes) != sorted(DTYPES):
        note += f"\n- Only the {', '.join(args.dtypes)} launches (`--dtypes {' '.join(args.dtypes)}`)."
    text = f"{summary(results)}{note}\n\n{table(results)}\n"
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
