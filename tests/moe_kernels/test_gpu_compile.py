"""Every kernel launch of the public ops also compiles for a Hopper GPU (sm_90a), an A100 and a
B200, with the Triton installed here, although no GPU is present: the interpreter alone would
accept kernels that the GPU compiler rejects."""

import pytest
import torch

from benchmarks.gpu_compile import (
    TARGETS,
    compile_launches,
    count_k_loop_spills,
    count_loop_spills,
    gpu_candidates,
    k_loop_opcodes,
    longest_loop_opcodes,
    moe_workload,
    nvidia_backend_missing,
    record_launches,
)
from moe_kernels import grouped_mm, tuning
from moe_kernels.backend import INTERPRET
from moe_kernels.grouped_mm import grouped_mm_triton
from moe_kernels.grouped_mm_kernels import grouped_mm_kernel
from moe_kernels.tuning import SHARED_MEMORY_LIMIT

_NO_COMPILER = nvidia_backend_missing()
pytestmark = [
    pytest.mark.skipif(
        not INTERPRET, reason="records launches through the interpreter; on a GPU the tests compile the kernels anyway"
    ),
    pytest.mark.skipif(_NO_COMPILER is not None, reason=str(_NO_COMPILER)),
]


def test_every_launch_compiles_for_hopper():
    # bf16 (fp16 lowers alike) and fp32 with TF32 products (the trainer's default). fp32 with
    # IEEE products (CUDA-core dots, half this test's time) and every autotune config beyond the
    # smallest, the one the autotuner can always fall back on, are left to `python -m
    # benchmarks.gpu_compile`, whose tables are committed.
    launches = record_launches(moe_workload((torch.bfloat16,)))
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


NESTED = """
.L_x_0:
        /*0000*/                   UTMALDG.2D [UR8], [UR4] ;
.L_x_1:
        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0020*/              @!P5 BRA `(.L_x_1) ;
        /*0030*/                   STG.E [R2], R24 ;
        /*0038*/                   STL [R1], R24 ;
        /*0040*/              @P0 BRA `(.L_x_0) ;
        /*0050*/                   EXIT ;
"""


def test_the_k_loop_is_the_innermost_loop_that_multiplies():
    """A persistent kernel's loop over tiles holds its K loop: the K step is the inner one, and a
    spill in the outer loop (the epilogue's) is paid once per tile, not per K step."""
    assert k_loop_opcodes(NESTED) == {"HGMMA": 1, "BRA": 1}
    assert longest_loop_opcodes(NESTED)["UTMALDG"] == 1
    assert k_loop_opcodes(SASS) == {"LDL": 1, "HGMMA": 1, "BRA": 1}
    assert (count_loop_spills(NESTED), count_k_loop_spills(NESTED), count_k_loop_spills(SASS)) == (1, 0, 1)


RETRY = """
        /*0000*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P6, [UR25], R2 ;
        /*0010*/              @!P6 BRA `(.L_x_9) ;
.L_x_19:
        /*0020*/                   STL [R1], R24 ;
        /*0030*/                   STG.E [R2], R24 ;
        /*0040*/                   EXIT ;
.L_x_9:
        /*0050*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P6, [UR25], R2 ;
        /*0060*/              @!P6 BRA `(.L_x_9) ;
        /*0070*/                   BRA `(.L_x_19) ;
"""


def test_a_waits_retry_path_is_not_a_loop():
    """ptxas puts a barrier wait's retry after the kernel's last EXIT and branches back to the
    wait from there: the epilogue between is run once, its spill is not in a loop."""
    assert count_loop_spills(RETRY) == 0
    assert longest_loop_opcodes(RETRY) == {"SYNCS": 1, "BRA": 1}


CUDA_CORES = """
.L_x_0:
        /*0000*/                   LDS.128 R4, [R2] ;
        /*0010*/                   FFMA R8, R4, R5, R8 ;
        /*0020*/                   LDL R9, [R1] ;
        /*0030*/              @P0 BRA `(.L_x_0) ;
        /*0040*/                   EXIT ;
"""


ELECTED = """
.L_x_0:
        /*0000*/                   UTMALDG.2D [UR8], [UR4] ;
        /*0010*/                   LDL R9, [R1] ;
.L_x_1:
        /*0020*/               @P2 ELECT P1, URZ, PT ;
        /*0030*/                   @UP3 UTCHMMA tmem[UR5], gdesc[UR16], tmem[UR20], tmem[UR8], idesc[UR9], !UPT ;
        /*0040*/               @P2 BRA.U.ANY `(.L_x_1) ;
        /*0050*/              @P0 BRA `(.L_x_0) ;
        /*0060*/                   EXIT ;
"""


def test_blackwells_elected_mma_issue_is_not_the_k_loop():
    """Blackwell issues each MMA from one elected thread in a loop of its own (a predicated
    ``UTC*MMA``, ``BRA.U.ANY`` back): the K loop is the loop around it."""
    assert k_loop_opcodes(ELECTED) == {"UTMALDG": 1, "LDL": 1, "ELECT": 1, "UTCHMMA": 1, "BRA": 2}
    assert count_k_loop_spills(ELECTED) == 1


def test_a_cuda_core_kernels_k_loop_is_the_loop_of_its_ffmas():
    """Where the dots run on CUDA cores there is no MMA: the K loop is the innermost loop of FFMAs."""
    assert k_loop_opcodes(CUDA_CORES) == {"LDS": 1, "FFMA": 1, "LDL": 1, "BRA": 1}
    assert count_k_loop_spills(CUDA_CORES) == 1


def test_the_tables_compile_the_configs_the_gpus_pruning_keeps():
    """An fp32 GEMM with TF32 products (4-byte tiles): the A100's 163 KiB of shared memory keep
    fewer of the candidates than Hopper's 227 KiB, each fitting its target."""
    offsets = torch.tensor([10, 24], dtype=torch.int32)
    saved, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, True
    try:
        (launch,) = record_launches(lambda: grouped_mm_triton(torch.randn(24, 32), torch.randn(2, 32, 64), offsets))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert launch["constants"]["PRECISION"] == "tf32"
    kernel = grouped_mm_kernel
    while not hasattr(kernel, "early_config_prune"):
        kernel = kernel.fn
    kept = {target: gpu_candidates(kernel, tuning.ROW_GPU_CONFIGS, launch, target) for target in ("sm_80", "sm_90a")}
    for target, configs in kept.items():
        sizes = [c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * 4 for c in configs]
        assert configs and max(sizes) <= TARGETS[target][1], target
    assert {id(c) for c in kept["sm_80"]} < {id(c) for c in kept["sm_90a"]}


def test_the_tables_prune_for_each_targets_generation_and_alignment():
    """The tables run the pruning as each target's GPU would: a bf16 SwiGLU forward on the A100
    (its accumulators in registers) keeps fewer tiles than on Hopper, and strides Triton did not
    specialize as multiples of 16 keep the tiled design at 64x64."""
    offsets = torch.tensor([10, 24], dtype=torch.int32)
    a, b = torch.randn(24, 32, dtype=torch.bfloat16), torch.randn(2, 32, 64, dtype=torch.bfloat16)
    (launch,) = record_launches(lambda: grouped_mm_triton(a, b, offsets))
    kernel = grouped_mm_kernel
    while not hasattr(kernel, "early_config_prune"):
        kernel = kernel.fn
    glu = launch | {"constants": launch["constants"] | {"GLU": True, "EPILOGUE": "act"}}
    shapes = lambda configs: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in configs}  # noqa: E731
    tiled = [c for c in tuning.ROW_GPU_CONFIGS if tuning.design_of(c) == "tiled"]
    assert shapes(gpu_candidates(kernel, tiled, glu, "sm_80")) == {(128, 128, 8), (64, 64, 4)}
    assert (128, 64, 4) in shapes(gpu_candidates(kernel, tiled, glu, "sm_90a"))
    unaligned = launch | {"attrs": {k: v for k, v in launch["attrs"].items() if not k.startswith("stride")}}
    assert shapes(gpu_candidates(kernel, tiled, unaligned, "sm_90a")) == {(64, 64, 4)}


@pytest.mark.parametrize("target", ["sm_80", "sm_100a"])
def test_the_grouped_gemms_compile_for_the_a100_and_the_b200(target):
    """The GEMM kernels' bf16 launches also build for an A100 (``mma.sync``; it has no FP8 tensor
    cores, which the launcher says in one line) and a B200; `python -m benchmarks.gpu_compile
    --target sm_80|sm_100a` compiles every launch with every config."""
    launches = [
        launch
        for launch in record_launches(moe_workload((torch.bfloat16,), tf32=False))
        if launch["kernel"].startswith("grouped") and (target != "sm_80" or "fp8" not in launch["kernel"])
    ]
    assert {"grouped_mm_kernel", "grouped_wgrad_kernel"} <= {launch["kernel"] for launch in launches}
    results = compile_launches(launches, full_report=False, target=target)
    failures = [f"{r['kernel']} {r['constants']}: {r['error']}" for r in results if not r["ok"]]
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("target, mma", [("sm_90a", "wgmma"), ("sm_100a", "tcgen05")])
def test_the_persistent_design_loads_by_tma_on_hopper_and_blackwell(target, mma):
    """The persistent row kernel's machine code holds TMA loads (``UTMALDG``), TMA stores
    (``UTMASTG``) and the target's asynchronous MMA, forward (weights N-contiguous) and for the
    input gradient (the transposed weights, K-contiguous), at each of its tiles, with no spill
    inside its K loop; gathered rows by TMA gathers (``UTMALDG.2D.GATHER4``) on Blackwell only.
    (The weight gradient's TMA stores are in the committed tables: every launch there compiles.)"""

    def workload():
        x = torch.randn(80, 64, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(4, 64, 128, dtype=torch.bfloat16, requires_grad=True)
        offsets = torch.tensor([16, 16, 64, 80], dtype=torch.int32)
        y = grouped_mm(x, w, offsets, backend="triton")
        y.backward(torch.randn_like(y))
        grouped_mm_triton(x.detach(), w.detach(), offsets, a_rows=torch.randperm(80, dtype=torch.int32))

    launches = [launch for launch in record_launches(workload) if launch["kernel"] == "grouped_mm_kernel"]
    assert {launch["constants"]["B_TRANSPOSED"] for launch in launches} == {False, True}
    results = compile_launches(launches, target=target, designs=["tma"])
    assert results and all(r["config"]["TMA"] for r in results)
    shown = [(r["ok"], r["mma"], r["tma_loads"] > 0, r["tma_stores"] > 0, r["k_loop_spills"]) for r in results]
    assert shown == [(True, mma, True, True, 0)] * len(results), shown
    gathers = {r["constants"]["GATHER_A"]: r["tma_gathers"] > 0 for r in results}
    assert gathers == {False: False, True: target == "sm_100a"}
