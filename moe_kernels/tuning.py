"""How the grouped GEMM kernels are tuned: the candidate configs for Hopper-class GPUs, the
pruning of those a launch cannot use, and the switch that keeps only one.

The autotuner benchmarks every candidate left for a launch's key the first time it sees that
key. ``early_config_prune`` (``row_candidates``, ``wgrad_candidates``) drops, before any compile,
the candidates whose software pipeline does not fit in shared memory and, for fp32 with IEEE
products (CUDA cores), the tiles that spill. ``MOE_KERNELS_AUTOTUNE=0`` keeps the smallest
candidate only (correctness runs compile each kernel once); under the Triton interpreter, which
cannot benchmark, one small config serves.
"""

from __future__ import annotations

import os

import triton

from .backend import INTERPRET

# ``MOE_KERNELS_AUTOTUNE=0`` keeps one config per kernel on the GPU, the smallest: correctness
# runs then compile each kernel once instead of once per candidate.
AUTOTUNE = os.environ.get("MOE_KERNELS_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


# Bytes of shared memory one block may use on Hopper (227 KiB): the autotuner's candidates are
# pruned to those whose software pipeline fits, rather than compiled only to fail at launch.
SHARED_MEMORY_LIMIT = 232448


def pipeline_size(config: triton.Config) -> int:
    """Elements a config's software pipeline holds (its tiles times its stages): the smallest
    config is the one that fits in shared memory for every dtype."""
    m, n, k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return config.num_stages * (m * k + k * n)


def autotune_configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """The autotuner's candidates: ``gpu`` (only its smallest with ``MOE_KERNELS_AUTOTUNE=0``),
    or under the interpreter, which cannot benchmark and runs every program in Python, the single
    small ``interpreter`` config."""
    if INTERPRET:
        return [interpreter]
    return gpu if AUTOTUNE else [min(gpu, key=pipeline_size)]


def config(block_m: int, block_n: int, block_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages
    )


INTERPRETER_CONFIG = config(32, 32, 32, 4, 1)
# Candidates for Hopper-class GPUs, as (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).
# Row kernel: BLOCK_M rows x BLOCK_N columns, BLOCK_K reduction. The BLOCK_K=32 ones are for
# fp32 (TF32), whose 64-wide K steps leave room in shared memory for little more than 64x64
# tiles once a GLU loads two B tiles; ``row_candidates`` picks per launch.
ROW_GPU_CONFIGS = [
    config(*c)
    for c in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
              (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4)]
]  # fmt: skip
# Weight-gradient kernel: BLOCK_K x BLOCK_N output tile, BLOCK_M rows of reduction per step.
# A step of 64 (often gathered) rows is short next to a load's latency: the 4-stage config keeps
# three steps of copies in flight.
WGRAD_GPU_CONFIGS = [
    config(*c)
    for c in [(64, 128, 128, 8, 3), (64, 128, 128, 8, 4), (64, 128, 64, 4, 4), (128, 128, 128, 8, 3),
              (64, 64, 64, 4, 4)]
]  # fmt: skip
# FP8 row kernel: the K step is one scale block of 128 (the activations are quantized per step).
# Its SwiGLU form holds two accumulators, the step's product and the fp32 A tile being quantized:
# at 128x128 (8 warps), or 64x128 and 128x64 with 4 warps, ptxas spills inside the K loop; these
# do not but 128x128, which ``fp8_candidates`` keeps for the single-projection forms of 2-byte inputs.
FP8_GPU_CONFIGS = [
    config(*c) for c in [(128, 128, 128, 8, 3), (64, 128, 128, 8, 3), (128, 64, 128, 8, 3), (64, 64, 128, 4, 4)]
]
ROW_CONFIGS = autotune_configs(ROW_GPU_CONFIGS, INTERPRETER_CONFIG)
FP8_CONFIGS = autotune_configs(FP8_GPU_CONFIGS, config(32, 32, 128, 4, 1))
WGRAD_CONFIGS = autotune_configs(WGRAD_GPU_CONFIGS, INTERPRETER_CONFIG)


def _candidates(
    configs: list[triton.Config], element_size: int, precision: str, pipeline, outputs
) -> list[triton.Config]:
    """The configs worth compiling for one launch: those whose pipeline (``pipeline(config)``
    elements) fits in shared memory and, for fp32 with IEEE products, which run on CUDA cores,
    those of at most 64x64 outputs per tile (``outputs(config)``): ptxas spills tens of KB per thread
    above that. The smallest config if none qualifies."""

    def worth(config: triton.Config) -> bool:
        fits = pipeline(config) * element_size <= SHARED_MEMORY_LIMIT
        cuda_cores = element_size == 4 and precision == "ieee"
        return fits and (not cuda_cores or outputs(config) <= 64 * 64)

    return [config for config in configs if worth(config)] or [min(configs, key=pipeline_size)]


def row_candidates(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The row kernel's candidates (``early_config_prune``): the GLU forward loads two B tiles per
    K step, and a K step narrower than 128 bytes (a bf16 BLOCK_K of 32) only adds steps."""
    size = named_args["a_ptr"].element_size()
    b_tiles = 2 if kwargs["GLU"] and kwargs["EPILOGUE"] == "act" else 1
    configs = [c for c in configs if c.kwargs["BLOCK_K"] * size >= 128] or configs

    def pipeline(c: triton.Config) -> int:
        return c.num_stages * (c.kwargs["BLOCK_M"] + b_tiles * c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"]

    return _candidates(
        configs, size, kwargs["PRECISION"], pipeline, lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]
    )


def fp8_candidates(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The FP8 kernel's candidates (``early_config_prune``): its 128x128 tile spills inside the K
    loop (about 200 spill instructions per step, from the sm_90a compile tables) where it holds
    two accumulators (the GLU forward) or quantizes a 4-byte A tile (fp32 inputs); the smaller
    tiles do not."""
    heavy = (kwargs["GLU"] and kwargs["EPILOGUE"] == "act") or named_args["a_ptr"].element_size() == 4
    small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 128 * 128]
    return small if heavy and small else configs


def wgrad_candidates(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The weight-gradient kernel's candidates (``early_config_prune``): each step loads a
    BLOCK_M x BLOCK_K tile of a and a BLOCK_M x BLOCK_N tile of b into a BLOCK_K x BLOCK_N tile."""

    def pipeline(c: triton.Config) -> int:
        return c.num_stages * c.kwargs["BLOCK_M"] * (c.kwargs["BLOCK_K"] + c.kwargs["BLOCK_N"])

    return _candidates(
        configs,
        named_args["a_ptr"].element_size(),
        kwargs["PRECISION"],
        pipeline,
        lambda c: c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_N"],
    )


# The kernels read row counts from ``offsets``; ``M_BUCKET``, the row count rounded up to a power
# of two, only keys the autotuner, so a new token count reuses the config tuned for its bucket
# instead of benchmarking every config again. PRECISION is a key: TF32 and IEEE products differ
# in which tile is fastest (Triton adds the dtypes itself).
ROW_KEYS = ["M_BUCKET", "N", "K", "EPILOGUE", "GLU", "GATHER_A", "SCATTER_C", "PRECISION"]
# The FP8 kernel's products are e4m3 whatever the dtype of a: no PRECISION.
FP8_KEYS = [key for key in ROW_KEYS if key != "PRECISION"]
