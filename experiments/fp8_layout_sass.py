"""The FP8 grouped GEMM's K loop with its weights N-major and K-major, compiled for sm_90a here
(no GPU): which layout lets the weight tiles arrive by asynchronous copies.

    python experiments/fp8_layout_sass.py [--triton DIR]   # DIR: another Triton to compile with

Records the FP8 forward's two GEMMs (SwiGLU with its pre-activation stored, then the second
projection) on e4m3 weights laid out both ways, through the Triton interpreter; compiles each
with the FP8 autotune candidates for sm_90a; and counts the instructions of each kernel's K loop
by opcode in the machine code (``nvdisasm``): ``LDGSTS`` are asynchronous global-to-shared
copies, ``LDG``/``STS``/``PRMT`` a tile loaded into registers, permuted and stored. Prints a
markdown table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [(128, 128, 128, 8, 3), (64, 128, 128, 8, 3), (128, 64, 128, 8, 3)]
OPCODES = ("LDGSTS", "LDG", "STS", "LDS", "PRMT", "F2FP", "SHFL", "BAR")


def _workload() -> None:
    from moe_kernels.fp8 import quantize_blocks
    from moe_kernels.grouped_mm import grouped_mm_act, grouped_mm_triton

    torch.manual_seed(0)
    E, D, H, T = 4, 256, 256, 64
    x = torch.randn(T, D, dtype=torch.bfloat16)
    offsets = torch.tensor([16, 32, 48, 64], dtype=torch.int32)
    (w_in, s_in), (w_out, s_out) = quantize_blocks(torch.randn(E, D, 2 * H)), quantize_blocks(torch.randn(E, H, D))
    for w_in, w_out in ((w_in.contiguous(), w_out.contiguous()), (w_in, w_out)):  # N-major, then K-major
        h, _ = grouped_mm_act(x, w_in, offsets, "swiglu", save_preact=True, b_scale=s_in)
        grouped_mm_triton(h, w_out, offsets, b_scale=s_out)


def record() -> list[dict]:
    from benchmarks.gpu_compile import record_launches

    return [launch for launch in record_launches(_workload) if launch["kernel"] == "grouped_mm_fp8_kernel"]


def compile_rows(launches: list[dict]) -> list[dict]:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    from benchmarks.gpu_compile import TARGETS, disassemble, longest_loop_opcodes, ptxas_report

    target = GPUTarget("cuda", TARGETS["sm_90a"][0], 32)
    backend = make_backend(target)
    rows = []
    for launch in launches:
        kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"]).fn
        attrs = {(kernel.arg_names.index(n),): backend.parse_attr(d) for n, d in launch["attrs"].items()}
        layout = "K-major" if launch["signature"]["stride_bk"] == "constexpr" else "N-major"  # the stride of 1
        for m, n, k, warps, stages in CONFIGS:
            constants = launch["constants"] | {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}
            options = {"num_warps": warps, "num_stages": stages}
            compiled = triton.compile(ASTSource(kernel, launch["signature"], constants, attrs), target, options)
            opcodes = longest_loop_opcodes(disassemble(compiled.asm["cubin"]) or "")
            rows.append(
                {
                    "GEMM": "SwiGLU (first)" if launch["constants"]["EPILOGUE"] == "act" else "second",
                    "weights": layout,
                    "tile": f"{m}x{n}x{k} w{warps} s{stages}",
                    "shared KiB": compiled.metadata.shared // 1024,
                    **ptxas_report(compiled.asm["ptx"]),
                    "K-loop instructions": sum(opcodes.values()),
                    **{op: opcodes.get(op, 0) for op in OPCODES},
                }
            )
    return rows


def main() -> None:
    if "--record" in sys.argv:
        print(json.dumps(record()))
        return
    if "--compile" in sys.argv:
        import triton

        print(json.dumps({"triton": triton.__version__, "rows": compile_rows(json.load(sys.stdin))}))
        return
    triton_dir = sys.argv[sys.argv.index("--triton") + 1] if "--triton" in sys.argv else None

    def env(*paths: str | None, **values: str) -> dict:
        path = os.pathsep.join(filter(None, (*paths, os.environ.get("PYTHONPATH"))))
        return dict(os.environ, PYTHONPATH=path, **values)

    me = [sys.executable, os.path.abspath(__file__)]
    launches = subprocess.run(
        [*me, "--record"], env=env(ROOT, TRITON_INTERPRET="1"), capture_output=True, text=True, check=True
    ).stdout
    compiled = subprocess.run(
        [*me, "--compile"], input=launches, capture_output=True, text=True, check=True,
        env=env(triton_dir, ROOT, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1"),
    ).stdout  # fmt: skip
    report = json.loads(compiled)
    rows = report["rows"]
    print(f"FP8 forward GEMMs compiled for sm_90a by Triton {report['triton']}: the K loop's instructions by opcode")
    print("(`python experiments/fp8_layout_sass.py`).\n")
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for row in sorted(rows, key=lambda r: (r["GEMM"], r["tile"], r["weights"])):
        print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
