"""Every kernel launch of the public ops also compiles for a Hopper GPU (sm_90a), with the
Triton installed here, although no GPU is present: the interpreter alone would accept kernels
that the GPU compiler rejects."""

import pytest
import torch

from benchmarks.hopper_compile import (
    compile_launches,
    count_loop_spills,
    longest_loop_opcodes,
    moe_workload,
    nvidia_backend_missing,
    record_launches,
)
from moe_kernels.backend import INTERPRET
from moe_kernels.tuning import SHARED_MEMORY_LIMIT

_NO_COMPILER = nvidia_backend_missing()
pytestmark = [
    pytest.mark.skipif(
        not INTERPRET, reason="records launches through the interpreter; on a GPU the tests compile the kernels anyway"
    ),
    pytest.mark.skipif(_NO_COMPILER is not None, reason=str(_NO_COMPILER)),
]


def test_every_launch_compiles_for_hopper():
    # fp16 lowers like bf16; fp32 runs with IEEE and with TF32 products. Only the smallest
    # autotune config, the one the autotuner can always fall back on, keeps this short;
    # `python -m benchmarks.hopper_compile` compiles them all.
    launches = record_launches(moe_workload((torch.float32, torch.bfloat16)))
    kernels = {launch["kernel"] for launch in launches}
    assert {
        "_topk_gating_kernel",
        "_topk_gating_backward_kernel",
        "_expert_stats_kernel",
        "_rank_kernel",
        "_scan_kernel",
        "_scatter_kernel",
        "grouped_mm_kernel",
        "grouped_wgrad_kernel",
        "_combine_kernel",
        "_combine_weight_grad_kernel",
        "_weighted_rows_kernel",
        "_select_kernel",
        "_scatter_grad_kernel",
        "grouped_mm_fp8_kernel",
    } <= kernels
    assert {launch["constants"].get("VARLEN") for launch in launches} >= {False, True}
    assert {launch["constants"].get("PRECISION") for launch in launches} >= {"ieee", "tf32"}
    results = compile_launches(launches, full_report=False)
    failures = [f"{r['kernel']} {r['dtype']} {r['constants']}: {r['error']}" for r in results if not r["ok"]]
    assert not failures, "\n\n".join(failures)
    too_big = [r for r in results if r["shared_bytes"] > SHARED_MEMORY_LIMIT]
    assert not too_big, (
        f"even the smallest config of these launches needs more shared memory than Hopper has: {too_big}"
    )


def test_launches_are_recorded_with_the_jit_specialization():
    from moe_kernels import grouped_mm

    def workload():
        x = torch.randn(20, 32, requires_grad=False)
        grouped_mm(x, torch.randn(3, 32, 48), torch.tensor([5, 5, 20], dtype=torch.int32), backend="triton")

    (launch,) = record_launches(workload)
    assert launch["kernel"] == "grouped_mm_kernel"
    signature, constants, attrs = launch["signature"], launch["constants"], launch["attrs"]
    assert signature["a_ptr"] == "*fp32" and attrs["a_ptr"] == "D"
    assert signature["K"] == "i32" and attrs["K"] == "D"
    assert signature["E"] == "i32" and "E" not in attrs  # 3 is not a multiple of 16
    assert signature["stride_bn"] == "constexpr" and constants["stride_bn"] == 1  # Triton folds 1s
    assert signature["EPILOGUE"] == "constexpr" and constants["EPILOGUE"] == "none"


SASS = """
        /*0000*/                   STL [R1], R2 ;
.L_x_1:
        /*0010*/                   LDL R2, [R1] ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0030*/              @!P5 BRA `(.L_x_1) ;
        /*0040*/                   STL.64 [R1+0x8], R4 ;
        /*0050*/                   BRA `(.L_x_2) ;
.L_x_2:
        /*0060*/                   LDL.64 R4, [R1+0x8] ;
        /*0070*/                   EXIT ;
"""


def test_spills_are_counted_inside_loops_only():
    assert count_loop_spills(SASS) == 1


def test_the_longest_loop_is_counted_by_opcode():
    assert longest_loop_opcodes(SASS) == {"LDL": 1, "HGMMA": 1, "BRA": 1}  # predicate and modifiers dropped
    assert longest_loop_opcodes("        /*0000*/                   EXIT ;") == {}
