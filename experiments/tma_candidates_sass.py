"""The newest kernel candidates compiled here for a GPU (no GPU needed): the FP8 grouped GEMM in
both designs, and the bf16 input-gradient GEMM whose epilogue also gives the routing weights'
gradient (``tuning.WEIGHT_GRAD_IN_EPILOGUE``), every autotune config of each.

    python experiments/tma_candidates_sass.py [--target sm_90a|sm_100a] [--triton DIR] [--out FILE]

Records, through the Triton interpreter, the launches of a SwiGLU layer trained in FP8, trained in
bf16 (its input-gradient GEMMs) and served with FP8-stored experts; compiles them with
``benchmarks.gpu_compile`` and prints a markdown table per launch and config: registers, spill
bytes, spill instructions inside loops and inside the K loop, TMA loads, the MMA instruction and
the K loop's length in instructions.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ("registers", "spill_bytes", "loop_spills", "k_loop_spills", "tma_loads", "mma", "k_step")


def _workload() -> None:
    import moe_kernels as mk

    torch.manual_seed(0)
    T, D, H, E, k = 64, 128, 128, 4, 2
    for precision in ("fp8", None):
        x = torch.randn(T, D, dtype=torch.bfloat16, requires_grad=True)
        weights = torch.rand(T, k, requires_grad=True)
        experts = torch.randint(0, E, (T, k))
        w_in = (torch.randn(E, D, 2 * H) / 8).bfloat16().requires_grad_()
        w_out = (torch.randn(E, H, D) / 8).bfloat16().requires_grad_()
        y = mk.moe_ffn(x, weights, experts, w_in, w_out, "swiglu", backend="triton", precision=precision)
        y.float().square().sum().backward()
    layer = mk.MoE(D, H, E, k, num_shared_experts=0, backend="triton").bfloat16().eval()
    layer.to_fp8()
    with torch.no_grad():
        layer(torch.randn(T, D, dtype=torch.bfloat16))


def markdown(results: list[dict]) -> str:
    """One row per launch and config."""
    lines = [
        "| kernel | epilogue | GLU | weights' grad | A by TMA | design | tile (warps) | " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * (7 + len(COLUMNS)),
    ]
    for r in results:
        c, cfg = r["constants"], r["config"]
        tile = f"{cfg.get('BLOCK_M')}x{cfg.get('BLOCK_N')}x{cfg.get('BLOCK_K')} ({cfg.get('num_warps')})"
        cells = [str(r.get(name)) for name in COLUMNS] if r["ok"] else [r["error"][:80]] + [""] * (len(COLUMNS) - 1)
        lines.append(
            f"| {r['kernel']} | {c.get('EPILOGUE')} | {c.get('GLU')} | {c.get('SCALE_GRAD')} | {c.get('A_TMA')} | "
            f"{'tma' if cfg.get('TMA') else 'tiled'} | {tile} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    from benchmarks.gpu_compile import TARGETS, compile_launches, record_launches

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=sorted(TARGETS), default="sm_90a")
    p.add_argument("--triton", metavar="DIR", help="compile with the Triton in DIR (pip install --target DIR ...)")
    p.add_argument("--out", help="also write the table here")
    args = p.parse_args(argv)
    launches = [
        launch
        for launch in record_launches(_workload)
        if launch["kernel"] == "grouped_mm_fp8_kernel" or launch["constants"].get("EPILOGUE") == "act_grad"
    ]
    results = compile_launches(launches, target=args.target, triton_dir=args.triton, timeout=None)
    text = (
        f"{args.target}, Triton {results[0]['triton']}: {sum(r['ok'] for r in results)} of {len(results)} compile\n\n"
    )
    text += markdown(results) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, ROOT)
    main()
