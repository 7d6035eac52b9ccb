"""The choices a GPU run decides: how the grouped GEMM kernels are tuned (the candidate configs
for Hopper-class GPUs, the pruning of those a launch cannot use, the switch that keeps only one,
the tables of tuned configs shipped per GPU) and the switches between kernel designs still
waiting for a GPU to time them.

The autotuner benchmarks every candidate left for a launch's key the first time it sees that
key. ``early_config_prune`` (``row_candidates``, ``fp8_candidates``, ``wgrad_candidates``) drops,
before any compile, the candidates whose software pipeline does not fit in shared memory and those
that ptxas spills inside the K loop for that launch on that GPU generation (``capability``): the
compile tables (``benchmarks/gpu_compile.py``, for sm_80, sm_90a and sm_100a) found them, and
each rule says where. fp32 with IEEE products runs on CUDA cores and has configs of its own.
``MOE_KERNELS_AUTOTUNE=0`` keeps the smallest candidate only (correctness runs compile each kernel
once); under the Triton interpreter, which cannot benchmark, one small config serves.

On a GPU with a table (``configs/<GPU name>.json``, written by ``benchmarks/gpu_check.py`` after
it autotuned on that GPU), a launch whose key the table lists compiles the config listed and
benchmarks nothing; other keys, and GPUs without a table, autotune as before.
``MOE_KERNELS_CONFIG_TABLE=off`` always autotunes; ``MOE_KERNELS_CONFIG_TABLE=<path>`` reads that
table instead (one made on your GPU by ``write_table``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import triton

from .backend import INTERPRET

# How the experts' backward reads dL/dy for the second GEMM's gradients (dh and dW_out): False,
# gathered by token and scaled by the routing weight inside the kernels; True, gathered and scaled
# once into expert-major rows (``combine.weighted_rows``, one [S, D] pass) that both GEMMs read
# plainly. The first keeps memory traffic lowest; the second spares the weight-gradient kernel
# scaling each B tile in registers on every K step (twice the K loop's instructions on sm_90a: 379
# against 179 at 64x128x128). Which is faster is for a GPU to say: ``benchmarks/gpu_check.py``
# times both.
PRESCALED_BACKWARD = False

# Where the routing weights' gradient comes from: True, the input-gradient GEMM's epilogue (each
# row's dL/dh tile before the weight scales it, dotted with h recomputed from the pre-activation:
# SonicMoE's dS = <dA', A>, one plane per column tile, summed after), so the forward saves no
# per-slot outputs (an [S, D] tensor per layer) and the backward makes no pass over them and
# dL/dy; False, that pass (``combine.combine_weight_grad``). It serves the Triton path of experts
# without an output bias, outside FP8 training, with dL/dy not prescaled (``PRESCALED_BACKWARD``
# scales it before the GEMM). ``benchmarks/gpu_check.py`` times both.
WEIGHT_GRAD_IN_EPILOGUE = True

# How the rows the experts computed reach their tokens, in the forward (y) and the input gradient
# (dx): True, the GEMM stores its expert-major rows contiguously and the combine gathers each
# token's rows (``combine(..., rows=row_of_slot)``), the backward's form in the fastest MoE kernels
# (no scattered store in a GEMM epilogue); False, the GEMM's epilogue scatters each row to its
# slot and the combine reads a token's slots contiguously. Where the forward keeps the per-slot
# outputs for the weights' gradient (an output bias, FP8 training, ``WEIGHT_GRAD_IN_EPILOGUE``
# off) they are stored in slot order either way; with one slot per token the input gradient's
# scatter lands each row on its token and needs no combine. ``benchmarks/gpu_check.py`` times both.
GATHER_COMBINE = True

# Whether the TMA design reads gathered rows (the tokens of the first GEMM, dL/dy of the
# pre-activation gradient) with TMA gathers where the GPU has them (``has_tma_gather``: Blackwell,
# ``tensor_descriptor.gather``, one row per box), instead of pointer loads. Hopper's TMA has no
# gather: there, and with this off, gathered rows keep pointer loads. ``benchmarks/gpu_check.py``
# times both on a GPU that has it.
TMA_GATHER = True

# Whether the TMA design stores its outputs that are contiguous per group by TMA (the row
# kernels' expert-major rows and pre-activation, each tile through a descriptor that ends at its
# group's last row; the weight gradients' tiles of ``[E, K, N]``), instead of pointer stores.
# ``benchmarks/gpu_check.py`` times both.
TMA_STORE = True

# ``MOE_KERNELS_AUTOTUNE=0`` keeps one config per kernel on the GPU, the smallest: correctness
# runs then compile each kernel once instead of once per candidate.
AUTOTUNE = os.environ.get("MOE_KERNELS_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


# Bytes of shared memory one block may use on Hopper (227 KiB): the autotuner's candidates are
# pruned to those whose software pipeline fits, rather than compiled only to fail at launch. A
# GPU says its own (an A100: 163 KiB); Hopper's serves where none is asked (the interpreter).
SHARED_MEMORY_LIMIT = 232448


@functools.cache
def shared_memory_limit(device: torch.device) -> int:
    """The shared memory one block may use on ``device``."""
    if device.type != "cuda":
        return SHARED_MEMORY_LIMIT
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def pipeline_size(config: triton.Config) -> int:
    """Elements a config's software pipeline holds (its tiles times its stages): the smallest
    config is the one that fits in shared memory for every dtype."""
    m, n, k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return config.num_stages * (m * k + k * n)


def autotune_configs(gpu: list[triton.Config], interpreter: list[triton.Config]) -> list[triton.Config]:
    """The autotuner's candidates: ``gpu`` (with ``MOE_KERNELS_AUTOTUNE=0``, only the smallest
    of each design and the CUDA-core ones), or under the interpreter, which cannot benchmark and
    runs every program in Python, the small ``interpreter`` configs (one per design; the pruning
    keeps one)."""
    if INTERPRET:
        return interpreter
    if AUTOTUNE:
        return gpu
    return smallest_of_each_design([c for c in gpu if not cuda_core(c)]) + [c for c in gpu if cuda_core(c)]


def _same(a: triton.Config, b: triton.Config) -> bool:
    """Whether two configs are the same tiles, warps, stages and design."""
    return (a.kwargs, a.num_warps, a.num_stages) == (b.kwargs, b.num_warps, b.num_stages)


def cuda_core(config: triton.Config) -> bool:
    """Whether ``config`` is one of the tiles for dots on CUDA cores (``CUDA_CORE_CONFIGS``)."""
    return any(_same(config, other) for other in CUDA_CORE_CONFIGS)


def smallest_of_each_design(configs: list[triton.Config]) -> list[triton.Config]:
    """The config with the smallest pipeline of each design among ``configs``: the ones that fit
    in shared memory for every dtype."""
    designs = dict.fromkeys(design_of(c) for c in configs)
    return [min((c for c in configs if design_of(c) == design), key=pipeline_size) for design in designs]


def config(block_m: int, block_n: int, block_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages
    )


def designed(config: triton.Config, design: str) -> triton.Config:
    """``config`` as a GEMM kernel config of ``design`` (one of ``DESIGNS``), its ``TMA`` field."""
    config.kwargs["TMA"] = design == "tma"
    return config


def design_of(config: triton.Config) -> str:
    return "tma" if config.kwargs.get("TMA") else "tiled"


# The grouped GEMM kernels' designs: "tiled", the design the first GPU run timed (one program per
# output tile, pointer loads), and "tma", the design of the fastest published MoE kernels: the
# operands that are contiguous per group (the weights, expert-major rows) loaded by TMA and, in
# the row kernel, one program per SM walking the tile schedule (persistent). Both are autotune
# candidates, so the autotuner (and the table it writes) picks per launch.
# ``MOE_KERNELS_DESIGN=tiled|tma`` keeps one (a correctness run of one design, or the GPU check
# timing each alone); under the interpreter and with ``MOE_KERNELS_AUTOTUNE=0`` the tiled one
# serves unless it says otherwise.
DESIGNS = ("tiled", "tma")
DESIGN = os.environ.get("MOE_KERNELS_DESIGN", "").strip().lower() or None
if DESIGN not in (None, *DESIGNS):
    raise ValueError(f"MOE_KERNELS_DESIGN={DESIGN!r}: expected one of {DESIGNS}, or unset (the autotuner picks)")
DESIGNED_KERNELS = ("grouped_mm", "grouped_mm_fp8", "grouped_wgrad")


def by_design(configs: list[triton.Config], tma: bool) -> list[triton.Config]:
    """The configs of the designs in play (``DESIGN``): the TMA one only where the launch has an
    operand TMA can read (``tma``: ``tma_ready`` on a GPU that ``has_tma``; an A100 would
    emulate the descriptors with pointer loads), and only the tiled one where nothing is
    benchmarked."""
    wanted = [DESIGN] if DESIGN else list(DESIGNS) if AUTOTUNE and not INTERPRET else ["tiled"]
    if not tma:
        wanted = ["tiled"]
    return [c for c in configs if design_of(c) in wanted] or [c for c in configs if design_of(c) == "tiled"]


@contextlib.contextmanager
def use_design(design: str | None) -> Iterator[None]:
    """Only ``design``'s configs of the GEMM kernels (None: every design) for the duration, as
    ``MOE_KERNELS_DESIGN`` would. The autotuners' choices are kept per design: those made
    outside are set aside and restored, and those made inside serve the next time it is used."""
    global DESIGN
    if design not in (None, *DESIGNS):
        raise ValueError(f"design must be one of {DESIGNS} or None, got {design!r}")
    kernels = [TUNED_KERNELS[name] for name in DESIGNED_KERNELS]
    outer = DESIGN
    for kernel in kernels:
        _CHOICES[kernel, outer] = dict(kernel.cache)
        kernel.cache.clear()
        kernel.cache.update(_CHOICES.get((kernel, design), {}))
    DESIGN = design
    try:
        yield
    finally:
        DESIGN = outer
        for kernel in kernels:
            _CHOICES[kernel, design] = dict(kernel.cache)
            kernel.cache.clear()
            kernel.cache.update(_CHOICES[kernel, outer])


# The GEMM autotuners' choices per design in play, while ``use_design`` holds another.
_CHOICES: dict[tuple[triton.runtime.Autotuner, str | None], dict] = {}


@functools.cache
def capability(device: torch.device) -> tuple[int, int]:
    """``device``'s compute capability, which the pruning reads (Hopper's, (9, 0), for a device
    that is not a GPU: the interpreter)."""
    if device.type != "cuda":
        return (9, 0)
    return torch.cuda.get_device_capability(device)


@functools.cache
def has_tma(device: torch.device) -> bool:
    """Whether ``device`` has TMA (Hopper and newer); the interpreter emulates it."""
    return device.type != "cuda" or capability(device) >= (9, 0)


# The compute capability from which TMA gathers rows (Blackwell; ptxas refuses it before sm_100).
TMA_GATHER_CAPABILITY = (10, 0)


@functools.cache
def has_tma_gather(device: torch.device) -> bool:
    """Whether ``device``'s TMA gathers rows (Blackwell and newer); the interpreter emulates it."""
    return device.type != "cuda" or capability(device) >= TMA_GATHER_CAPABILITY


def tma_ready(t: torch.Tensor) -> bool:
    """Whether a TMA descriptor can read ``t``: 16-byte aligned data, one of its last two dims
    contiguous (the last, or the one before for a transposed matrix), every other stride a
    nonzero multiple of 16 bytes. ``torch._grouped_mm`` asks the same of its operands."""
    size, strides = t.element_size(), t.stride()
    inner = t.dim() - 1 if strides[-1] == 1 else t.dim() - 2
    others = (s for d, s in enumerate(strides) if d != inner)
    return t.data_ptr() % 16 == 0 and strides[inner] == 1 and all(s != 0 and s * size % 16 == 0 for s in others)


@functools.cache
def persistent_programs(device: torch.device) -> int:
    """The persistent design's grid: one program per SM (three under the interpreter, so that
    its tests see programs walk several tiles)."""
    if device.type != "cuda":
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


# Candidates for Hopper-class GPUs, as (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).
# The tiles for fp32 with IEEE products, whose dots run on CUDA cores as unrolled FMA chains,
# which the tensor-core launches never take: the row kernel's 64x64 stepping 32 in K, and 32x32
# for the GLU forward's two accumulators; the weight gradient's 16 rows per step. On the A100
# ptxas gives a 64x64x64 tile 32 registers and thousands of spill instructions per K step (the
# sm_80 compile table), and the GLU forward spills at 64x64x32; Hopper and Blackwell at neither.
ROW_CUDA_CORE_CONFIG = designed(config(64, 64, 32, 4, 3), "tiled")
GLU_FORWARD_CUDA_CORE_CONFIG = designed(config(32, 32, 64, 4, 3), "tiled")
WGRAD_CUDA_CORE_CONFIG = designed(config(16, 64, 64, 4, 4), "tiled")
CUDA_CORE_CONFIGS = [ROW_CUDA_CORE_CONFIG, GLU_FORWARD_CUDA_CORE_CONFIG, WGRAD_CUDA_CORE_CONFIG]
# Row kernel: BLOCK_M rows x BLOCK_N columns, BLOCK_K reduction. The BLOCK_K=32 ones are for
# fp32 (TF32), whose 64-wide K steps leave room in shared memory for little more than 64x64
# tiles once a GLU loads two B tiles; ``row_candidates`` picks per launch. The persistent design
# is tried at the larger tiles, which fill an SM's tensor cores.
ROW_GPU_CONFIGS = [
    designed(config(*c), "tiled")
    for c in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
              (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4)]
] + [
    designed(config(*c), "tma")
    for c in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
              (128, 128, 32, 8, 3)]
] + [ROW_CUDA_CORE_CONFIG, GLU_FORWARD_CUDA_CORE_CONFIG]  # fmt: skip
# Weight-gradient kernel: BLOCK_K x BLOCK_N output tile, BLOCK_M rows of reduction per step.
# A step of 64 (often gathered) rows is short next to a load's latency: the 4-stage config keeps
# three steps of copies in flight.
WGRAD_GPU_CONFIGS = [
    designed(config(*c), design)
    for design in DESIGNS
    for c in [(64, 128, 128, 8, 3), (64, 128, 128, 8, 4), (64, 128, 64, 4, 4), (128, 128, 128, 8, 3),
              (64, 64, 64, 4, 4)]
] + [WGRAD_CUDA_CORE_CONFIG]  # fmt: skip
# FP8 row kernel: the K step is one scale block of 128 (the activations are quantized per step).
# Its TMA design is tried at the three larger tiles. The 8-warp 64x64 tiles serve fp32 inputs,
# whose A tile, quantized in registers, makes every other tile spill (``fp8_candidates``).
FP8_GPU_CONFIGS = (
    [
        designed(config(*c), "tiled")
        for c in [(128, 128, 128, 8, 3), (64, 128, 128, 8, 3), (128, 64, 128, 8, 3), (64, 64, 128, 4, 4)]
    ]
    + [designed(config(*c), "tma") for c in [(128, 128, 128, 8, 3), (64, 128, 128, 8, 3), (128, 64, 128, 8, 3)]]
    + [designed(config(64, 64, 128, 8, 3), design) for design in DESIGNS]
)
ROW_CONFIGS = autotune_configs(ROW_GPU_CONFIGS, [designed(config(32, 32, 32, 4, 1), design) for design in DESIGNS])
FP8_CONFIGS = autotune_configs(FP8_GPU_CONFIGS, [designed(config(32, 32, 128, 4, 1), design) for design in DESIGNS])
WGRAD_CONFIGS = autotune_configs(WGRAD_GPU_CONFIGS, [designed(config(32, 32, 32, 4, 1), design) for design in DESIGNS])
# The narrowest column tile of the row kernels: the routing weights' gradient of the input-gradient
# GEMM (``WEIGHT_GRAD_IN_EPILOGUE``) gets one plane per column tile, so at most cdiv(N, this).
# The GLU forward's CUDA-core tile never computes it.
NARROWEST_BLOCK_N = min(
    c.kwargs["BLOCK_N"] for c in [*ROW_CONFIGS, *FP8_CONFIGS] if not _same(c, GLU_FORWARD_CUDA_CORE_CONFIG)
)


def _outputs(c: triton.Config) -> int:
    """A row kernel config's outputs per tile."""
    return c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]


def _fitting(configs: list[triton.Config], element_size: int, pipeline, limit: int) -> list[triton.Config]:
    """Those of ``configs`` whose pipeline (``pipeline(config)`` elements) fits in the ``limit``
    bytes of shared memory; the smallest config if none does."""
    fitting = [c for c in configs if pipeline(c) * element_size <= limit]
    return fitting or [min(configs, key=pipeline_size)]


def _cuda_cores(configs: list[triton.Config], wanted: triton.Config, element_size: int, precision: str):
    """For fp32 with IEEE products (dots on CUDA cores), ``wanted`` if ``configs`` has it (None
    under the interpreter, whose configs are its own); otherwise None."""
    if element_size != 4 or precision != "ieee":
        return None
    return [c for c in configs if _same(c, wanted)] or None


def _tensor_core(configs: list[triton.Config]) -> list[triton.Config]:
    return [c for c in configs if not cuda_core(c)] or configs


def _clamped(launch: dict) -> bool:
    """Whether a GLU launch has GPT-OSS's clamp or softcaps in its epilogue."""
    return bool(launch["CLAMP"] or launch["GATE_CAP"] or launch["UP_CAP"])


def aligned(named_args: dict) -> bool:
    """Whether every stride argument is 1 or a multiple of 16 elements, as Triton specializes them:
    below that it cannot prove a row 16-byte aligned and loads element by element."""
    strides = [v for name, v in named_args.items() if name.startswith("stride") and isinstance(v, int)]
    return all(v == 1 or v % 16 == 0 for v in strides)


def row_candidates(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The row kernel's candidates (``early_config_prune``). Beyond fitting in shared memory (the
    GLU forward loads two B tiles per K step; a TMA store stages the output tile) and the designs
    in play (``by_design``): a K step narrower than 128 bytes (a bf16 BLOCK_K of 32) only adds
    steps, and the tiles ptxas spills inside the K loop for the launch on the GPU's generation
    (``capability``; the compile tables' counts) are dropped; CUDA-core launches take their own."""
    a = named_args["a_ptr"]
    size, arch = a.element_size(), capability(a.device)
    glu_forward = kwargs["GLU"] and kwargs["EPILOGUE"] == "act"
    wanted = GLU_FORWARD_CUDA_CORE_CONFIG if glu_forward else ROW_CUDA_CORE_CONFIG
    if cuda_core := _cuda_cores(configs, wanted, size, kwargs["PRECISION"]):
        return cuda_core
    configs = _tensor_core(by_design(configs, kwargs["B_TMA"]))
    configs = [c for c in configs if c.kwargs["BLOCK_K"] * size >= 128] or configs
    if kwargs["GLU"] and kwargs["EPILOGUE"] == "act_grad":
        # The GLU gradient's epilogue holds three fp32 tiles (dh and both pre-activation halves):
        # 128x256 spills in the persistent loop's K loop (sm_90a), and with TF32 products so does
        # the persistent 128x64 of 4 warps (1-2 spill instructions per step, sm_90a and sm_100a),
        # with GPT-OSS's clamp and caps the persistent 128x128x64 too (1, both).
        configs = [c for c in configs if _outputs(c) <= 128 * 128] or configs
        if size == 4 and arch >= (9, 0):

            def spills(c: triton.Config) -> bool:
                tiles = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"])
                heavy = c.num_warps == 4 or (_clamped(kwargs) and tiles == (128, 128, 64))
                return design_of(c) == "tma" and c.kwargs["BLOCK_M"] == 128 and heavy

            configs = [c for c in configs if not spills(c)] or configs
    if glu_forward and arch < (9, 0):
        # mma.sync keeps both accumulators in registers: the 4-warp 128x64 and 64x128 spill (14
        # and 2 per step, sm_80), and with GPT-OSS's clamp and caps the 8-warp 128x128 too (54).
        eight = not _clamped(kwargs)  # the 8-warp 128x128 keeps its accumulators without the extras
        configs = [c for c in configs if _outputs(c) <= 64 * 64 or (eight and c.num_warps == 8)] or configs
    if not aligned(named_args):
        # Rows loaded element by element: every tiled tile above 64x64 spills inside the K loop
        # on some target (29-510 per step with b transposed on sm_90a), 64x64 on none.
        configs = [c for c in configs if design_of(c) == "tma" or _outputs(c) <= 64 * 64] or configs
    b_tiles = 2 if glu_forward else 1

    def pipeline(c: triton.Config) -> int:
        staged = _outputs(c) if kwargs["C_TMA"] and design_of(c) == "tma" else 0  # the TMA store's tile
        return c.num_stages * (c.kwargs["BLOCK_M"] + b_tiles * c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] + staged

    return _fitting(configs, size, pipeline, shared_memory_limit(a.device))


def fp8_candidates(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The FP8 kernel's candidates (``early_config_prune``), the tiles that spill inside its K loop
    dropped (the designs in play are ``by_design``'s). fp32 inputs, whose A tile is quantized in
    registers, take the 8-warp 64x64 tiles: every other spills (5-61 per step, sm_90a). The
    128x128 tile spills where it holds two accumulators (the GLU forward: about 200 per step,
    sm_90a) and in the TMA design where it keeps a GLU's pre-activation for the gradient's
    epilogue (about 50), or, on Hopper, stores the pre-activation of a single projection (1)."""
    configs = by_design(configs, kwargs["B_TMA"])
    fp32_tiles = [c for c in configs if _outputs(c) == 64 * 64 and c.num_warps == 8]
    if named_args["a_ptr"].element_size() == 4:
        return fp32_tiles or configs
    configs = [c for c in configs if c not in fp32_tiles] or configs
    if kwargs["GLU"]:
        configs = [c for c in configs if _outputs(c) < 128 * 128] or configs
    if kwargs["STORE_PREACT"] and capability(named_args["a_ptr"].device)[0] == 9:
        configs = [c for c in configs if not (design_of(c) == "tma" and _outputs(c) == 128 * 128)] or configs
    return configs


def wgrad_candidates(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The weight-gradient kernel's candidates (``early_config_prune``): each step loads a
    BLOCK_M x BLOCK_K tile of a and a BLOCK_M x BLOCK_N tile of b into a BLOCK_K x BLOCK_N tile
    (which a TMA store stages in shared memory too); the designs in play are ``by_design``'s,
    CUDA-core launches take their own tile, and the tiles that spill inside the K loop are dropped."""

    def pipeline(c: triton.Config) -> int:
        staged = c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_N"] if kwargs["C_TMA"] and design_of(c) == "tma" else 0
        return c.num_stages * c.kwargs["BLOCK_M"] * (c.kwargs["BLOCK_K"] + c.kwargs["BLOCK_N"]) + staged

    a = named_args["a_ptr"]
    size, arch = a.element_size(), capability(a.device)
    if cuda_core := _cuda_cores(configs, WGRAD_CUDA_CORE_CONFIG, size, kwargs["PRECISION"]):
        return cuda_core
    configs = _tensor_core(by_design(configs, kwargs["A_TMA"] or kwargs["B_TMA"]))
    if kwargs["SCALE"]:
        # The tiled design scales each gathered b tile in registers: with TF32 the 4-warp 64x128
        # output spills (27-28 per step, sm_90a and sm_100a), and on Blackwell the 128-row step
        # at 128x128 (25-51).
        def spills(c: triton.Config) -> bool:
            wide = c.num_warps == 4 and c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_N"] > 64 * 64
            return design_of(c) == "tiled" and ((size == 4 and wide) or (arch[0] >= 10 and c.kwargs["BLOCK_M"] == 128))

        configs = [c for c in configs if not spills(c)] or configs
    return _fitting(configs, size, pipeline, shared_memory_limit(a.device))


# The kernels read row counts from ``offsets``; ``M_BUCKET``, the row count rounded up to a power
# of two, only keys the autotuner, so a new token count reuses the config tuned for its bucket
# instead of benchmarking every config again. PRECISION is a key: TF32 and IEEE products differ
# in which tile is fastest (Triton adds the dtypes itself).
ROW_KEYS = ["M_BUCKET", "N", "K", "EPILOGUE", "GLU", "GATHER_A", "SCATTER_C", "PRECISION", "B_TMA"]
# The FP8 kernel's products are e4m3 whatever the dtype of a: no PRECISION.
FP8_KEYS = [key for key in ROW_KEYS if key != "PRECISION"]
WGRAD_KEYS = ["M_BUCKET", "N", "K", "GATHER_A", "GATHER_B", "SCALE", "PRECISION", "A_TMA", "B_TMA"]


# Tables of tuned configs, one per GPU name: {"device", "triton", "kernels": {kernel: {launch key:
# {"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"}}}}.
TABLES = Path(__file__).with_name("configs")
TABLE_ENV = "MOE_KERNELS_CONFIG_TABLE"
Prune = Callable[..., list[triton.Config]]


def device_slug(name: str) -> str:
    """A GPU's name as a file name: ``"NVIDIA H100 80GB HBM3"`` -> ``"NVIDIA_H100_80GB_HBM3"``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")


def launch_key(keys: list[str], values: dict) -> str:
    """The autotuner's key of one launch as text: the ``keys`` arguments' values, then the dtype of
    every tensor argument in order (Triton adds those to its key itself)."""
    dtypes = [value.dtype for value in values.values() if hasattr(value, "dtype")]
    return _key_text([(key, values[key]) for key in keys if key in values], dtypes)


def _key_text(named: list[tuple[str, object]], dtypes: list) -> str:
    return ",".join([f"{name}={value}" for name, value in named] + ["dtypes=" + "/".join(map(str, dtypes))])


def _config_fields(config: triton.Config) -> dict[str, int]:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _table_path(device: torch.device) -> Path | None:
    setting = os.environ.get(TABLE_ENV, "").strip()
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    if setting:
        path = Path(setting)
        if not path.is_file():
            raise ValueError(f"{TABLE_ENV}={setting!r}: no such table (unset it to use the shipped ones, or 'off')")
        return path
    if device.type != "cuda":
        return None
    path = TABLES / f"{device_slug(torch.cuda.get_device_name(device))}.json"
    return path if path.is_file() else None


@functools.cache
def _read_table(path: Path) -> dict[str, dict[str, dict[str, int]]]:
    try:
        kernels = json.loads(path.read_text())["kernels"]
        if not all(isinstance(entries, dict) for entries in kernels.values()):
            raise TypeError("each kernel's entries must be an object of launch key -> config")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a table of tuned configs ({type(error).__name__}: {error})") from error
    return kernels


def tabled(kernel: str, keys: list[str], prune: Prune) -> Prune:
    """``prune`` for ``kernel``'s autotuner, answered by the GPU's table where it lists the launch:
    the one config it names (when that config is still a candidate), else ``prune``'s candidates."""

    def candidates(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        tensor = next(value for value in named_args.values() if isinstance(value, torch.Tensor))
        path = _table_path(tensor.device)
        if path is not None:
            listed = _read_table(path).get(kernel, {}).get(launch_key(keys, {**named_args, **kwargs}))
            chosen = [config for config in configs if _config_fields(config) == listed]
            if chosen:
                return chosen[:1]
        return prune(configs, named_args, **kwargs)

    return candidates


# The autotuned kernels by the names their tables use, filled by ``autotuned`` as they are defined.
TUNED_KERNELS: dict[str, triton.runtime.Autotuner] = {}


def autotuned(name: str, configs: list[triton.Config], keys: list[str], prune: Prune) -> Callable:
    """Decorator over a ``@triton.jit`` kernel: Triton's autotuner over ``configs``, keyed by
    ``keys``, its candidates pruned by ``prune`` and answered by the GPU's table (``tabled``); the
    kernel is registered in ``TUNED_KERNELS`` under ``name``, the name its table entries use."""

    def decorate(kernel: triton.JITFunction) -> triton.runtime.Autotuner:
        tuned = triton.autotune(
            configs=configs, key=keys, prune_configs_by={"early_config_prune": tabled(name, keys, prune)}
        )(kernel)
        TUNED_KERNELS[name] = tuned
        return tuned

    return decorate


def tuned_table(kernels: dict[str, triton.runtime.Autotuner]) -> dict[str, dict[str, dict[str, int]]]:
    """What the autotuners chose so far, per kernel and launch key, as a table's ``"kernels"``.
    Triton's key is the ``key`` arguments' values followed by the tensor arguments' dtypes."""
    table = {}
    for kernel_name, kernel in kernels.items():
        entries = {cache_key_text(kernel, key): _config_fields(config) for key, config in kernel.cache.items()}
        table[kernel_name] = dict(sorted(entries.items()))
    return table


def cache_key_text(kernel: triton.runtime.Autotuner, key: tuple) -> str:
    """A key of ``kernel``'s autotuner cache as text (``launch_key``'s form)."""
    keys = list(kernel.keys)
    return _key_text(list(zip(keys, key)), list(key[len(keys) :]))


def write_table(path: Path, kernels: dict[str, triton.runtime.Autotuner], device: str) -> Path:
    """Write what ``kernels`` chose as the table for the GPU named ``device`` (atomically), over the
    entries of the table already at ``path`` (runs that tuned other shapes add up)."""
    table = dict(_read_table(path)) if path.is_file() else {}
    _read_table.cache_clear()  # this process reads the new one
    for name, entries in tuned_table(kernels).items():
        table[name] = dict(sorted({**table.get(name, {}), **entries}.items()))
    about = {"device": device, "triton": triton.__version__, "torch": torch.__version__}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps({**about, "kernels": table}, indent=1) + "\n")
    partial.replace(path)
    return path
