"""Tables of tuned configs: a launch whose key the GPU's table lists compiles that config and
benchmarks nothing; anything else autotunes as before; a table is written from what the
autotuners chose, with keys a later launch finds."""

import json

import pytest
import torch

import moe_kernels as mk
from moe_kernels import tuning
from moe_kernels.grouped_mm_kernels import grouped_mm_kernel, grouped_wgrad_kernel
from moe_kernels.tuning import config, designed, launch_key, tabled, tuned_table, write_table

from .helpers import DEVICE

INTERPRETER_CONFIG = designed(config(32, 32, 32, 4, 1), "tiled")
SMALL_TILE = designed(config(16, 32, 32, 4, 1), "tiled")


def _pruned(*configs):
    return lambda candidates, named_args, **kwargs: list(configs)


def _launch():
    a = torch.randn(12, 8)
    return {"a_ptr": a, "b_ptr": torch.randn(2, 8, 8), "M_BUCKET": 16, "N": 8}, {"GLU": False, "PRECISION": "ieee"}


def _table(tmp_path, entries: dict) -> str:
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"device": "test", "kernels": entries}))
    return str(path)


def test_a_listed_launch_gets_its_config_and_others_autotune(tmp_path, monkeypatch):
    named, kwargs = _launch()
    key = launch_key(["M_BUCKET", "N", "GLU", "PRECISION"], {**named, **kwargs})
    assert key == "M_BUCKET=16,N=8,GLU=False,PRECISION=ieee,dtypes=torch.float32/torch.float32"
    fields = {**SMALL_TILE.kwargs, "num_warps": 4, "num_stages": 1}
    monkeypatch.setenv(tuning.TABLE_ENV, _table(tmp_path, {"k": {key: fields}}))
    prune = tabled("k", ["M_BUCKET", "N", "GLU", "PRECISION"], _pruned(INTERPRETER_CONFIG, SMALL_TILE))
    assert prune([INTERPRETER_CONFIG, SMALL_TILE], named, **kwargs) == [SMALL_TILE]
    other = {**named, "M_BUCKET": 32}
    assert prune([INTERPRETER_CONFIG, SMALL_TILE], other, **kwargs) == [INTERPRETER_CONFIG, SMALL_TILE]
    # A config the table names that is no longer a candidate is not used.
    assert prune([INTERPRETER_CONFIG], named, **kwargs) == [INTERPRETER_CONFIG, SMALL_TILE]
    monkeypatch.setenv(tuning.TABLE_ENV, "off")
    assert prune([INTERPRETER_CONFIG, SMALL_TILE], named, **kwargs) == [INTERPRETER_CONFIG, SMALL_TILE]


def test_cpu_tensors_have_no_shipped_table(monkeypatch):
    monkeypatch.delenv(tuning.TABLE_ENV, raising=False)
    named, kwargs = _launch()
    prune = tabled("k", ["M_BUCKET"], _pruned(INTERPRETER_CONFIG))
    assert prune([INTERPRETER_CONFIG, SMALL_TILE], named, **kwargs) == [INTERPRETER_CONFIG]


@pytest.mark.parametrize(
    "text, match",
    [(None, "no such table"), ("{not json", "not a table"), ('{"kernels": {"k": []}}', "not a table")],
)
def test_a_bad_table_says_so(tmp_path, monkeypatch, text, match):
    path = tmp_path / "bad.json"
    if text is not None:
        path.write_text(text)
    monkeypatch.setenv(tuning.TABLE_ENV, str(path))
    named, kwargs = _launch()
    with pytest.raises(ValueError, match=match):
        tabled("k", ["M_BUCKET"], _pruned(INTERPRETER_CONFIG))([INTERPRETER_CONFIG, SMALL_TILE], named, **kwargs)


def test_device_slug():
    assert tuning.device_slug("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert tuning.device_slug("NVIDIA H200") == "NVIDIA_H200"


@pytest.mark.skipif(DEVICE != "cpu", reason="swaps the kernels' candidates under the interpreter")
def test_a_written_table_serves_the_next_launches(tmp_path, monkeypatch):
    """Round trip on the real kernels: the table names the smaller tile for every launch of a
    grouped GEMM and its gradients; the launches take it (Triton >= 3.7 does not benchmark a single
    candidate, so this runs through the interpreter), the result is right, and the table written
    from the autotuners' caches holds the same keys and configs."""
    kernels = {"grouped_mm": grouped_mm_kernel, "grouped_wgrad": grouped_wgrad_kernel}
    x = torch.randn(21, 8, requires_grad=True)
    w = torch.randn(3, 8, 12, requires_grad=True)
    offsets = torch.tensor([5, 5, 21], dtype=torch.int32)
    fields = {**SMALL_TILE.kwargs, "num_warps": 4, "num_stages": 1}

    for kernel in kernels.values():
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "configs", [INTERPRETER_CONFIG, SMALL_TILE])

    def listed(name, kernel):
        def prune(configs, named_args, **kwargs):
            key = launch_key(list(kernel.keys), {**named_args, **kwargs})
            seen.setdefault(name, {})[key] = fields
            return [SMALL_TILE]

        return prune

    seen = {}
    for name, kernel in kernels.items():
        monkeypatch.setattr(kernel, "early_config_prune", listed(name, kernel))
    y = mk.grouped_mm(x, w, offsets, backend="triton")
    y.backward(torch.ones_like(y))
    assert set(seen) == {"grouped_mm", "grouped_wgrad"}

    path = write_table(tmp_path / "t.json", kernels, "test")
    written = json.loads(path.read_text())
    assert written["kernels"] == {name: dict(sorted(entries.items())) for name, entries in seen.items()}

    for name, kernel in kernels.items():  # a new process: empty caches, the table's prune
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "early_config_prune", tabled(name, list(kernel.keys), _pruned(INTERPRETER_CONFIG)))
    monkeypatch.setenv(tuning.TABLE_ENV, str(path))
    x.grad = w.grad = None
    y = mk.grouped_mm(x, w, offsets, backend="triton")
    y.backward(torch.ones_like(y))
    assert tuned_table(kernels) == written["kernels"]
    want = mk.grouped_mm(x.detach(), w.detach(), offsets, backend="torch")
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_a_second_write_adds_to_the_table(tmp_path, monkeypatch):
    """Runs that tuned other shapes add up: a second write keeps the first's entries (a key both
    wrote takes the second's config)."""
    kernel = grouped_mm_kernel
    configs = [config(16, 16, 16, 4, 1), config(32, 32, 32, 4, 1)]
    keys = [tuple(f"key{i}" for _ in kernel.keys) + (torch.float32,) for i in range(3)]
    path = tmp_path / "t.json"
    monkeypatch.setattr(kernel, "cache", {keys[0]: configs[0], keys[1]: configs[0]})
    write_table(path, {"grouped_mm": kernel}, "test")
    monkeypatch.setattr(kernel, "cache", {keys[1]: configs[1], keys[2]: configs[1]})
    written = json.loads(write_table(path, {"grouped_mm": kernel}, "test").read_text())["kernels"]["grouped_mm"]
    tiles = sorted((key.split(",")[0], entry["BLOCK_M"]) for key, entry in written.items())
    assert tiles == [(f"{kernel.keys[0]}=key0", 16), (f"{kernel.keys[0]}=key1", 32), (f"{kernel.keys[0]}=key2", 32)]


@pytest.mark.parametrize("design", tuning.DESIGNS)
def test_the_gpu_candidates_that_spill_in_their_k_loop_are_pruned(design):
    """From the sm_90a compile tables: the GLU gradient's epilogue at 128x256 (row kernel) and the
    FP8 kernel's GLU forms at 128x128 spill inside the K loop; the other tiles stay candidates."""
    named = {"a_ptr": torch.randn(4, 4, dtype=torch.bfloat16)}
    options = dict(B_TMA=True, C_TMA=False, PRECISION="tf32")
    tiles = lambda configs: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in configs}  # noqa: E731
    with tuning.use_design(design):
        rows = tuning.row_candidates(tuning.ROW_GPU_CONFIGS, named, GLU=True, EPILOGUE="act_grad", **options)
        assert (128, 256) not in tiles(rows) and (128, 128) in tiles(rows)
        plain = tuning.row_candidates(tuning.ROW_GPU_CONFIGS, named, GLU=False, EPILOGUE="act_grad", **options)
        assert (128, 256) in tiles(plain)
        for epilogue in ("act", "act_grad"):
            fp8 = tuning.fp8_candidates(
                tuning.FP8_GPU_CONFIGS, named, GLU=True, EPILOGUE=epilogue, B_TMA=True, STORE_PREACT=False
            )
            assert (128, 128) not in tiles(fp8) and tiles(fp8) and {tuning.design_of(c) for c in fp8} == {design}
        fp8 = tuning.fp8_candidates(
            tuning.FP8_GPU_CONFIGS, named, GLU=False, EPILOGUE="none", B_TMA=True, STORE_PREACT=False
        )
        assert (128, 128) in tiles(fp8)


ROW_LAUNCH = dict(
    GLU=False,
    EPILOGUE="none",
    PRECISION="ieee",
    B_TMA=True,
    C_TMA=True,
    CLAMP=False,
    GATE_CAP=0.0,
    UP_CAP=0.0,
    STORE_PREACT=False,
)


def _shapes(configs) -> set[tuple]:
    return {
        (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, tuning.design_of(c))
        for c in configs
    }


@pytest.mark.parametrize("arch", [(8, 0), (9, 0), (10, 0)])
def test_the_pruning_drops_what_spills_on_each_gpu_generation(monkeypatch, arch):
    """The compile tables' K-loop spills, per GPU generation: the A100's GLU forward (two mma.sync
    accumulators in registers) keeps the 4-warp 64x64 and the 8-warp 128x128 (only 64x64 with the
    clamp and caps); Hopper and Blackwell drop TF32's persistent 128x64 GLU gradient (and its
    128x128, with the clamp), Hopper the FP8 persistent 128x128 storing a pre-activation; the
    tiled weight gradient that scales b drops TF32's
    4-warp 64x128 output everywhere and the 128-row step on Blackwell."""
    monkeypatch.setattr(tuning, "capability", lambda device: arch)
    monkeypatch.setattr(tuning, "INTERPRET", False)  # both designs in play, as on a GPU
    bf16, fp32 = ({"a_ptr": torch.empty(1, dtype=dtype)} for dtype in (torch.bfloat16, torch.float32))
    with tuning.use_design(None):
        glu = _shapes(
            tuning.row_candidates(tuning.ROW_GPU_CONFIGS, bf16, **ROW_LAUNCH | dict(GLU=True, EPILOGUE="act"))
        )
        clamped = ROW_LAUNCH | dict(GLU=True, EPILOGUE="act", CLAMP=True)
        clamp = _shapes(tuning.row_candidates(tuning.ROW_GPU_CONFIGS, bf16, **clamped))
        if arch < (9, 0):
            assert {s[:4] for s in glu} == {(128, 128, 64, 8), (64, 64, 64, 4)}
            assert {s[:4] for s in clamp} == {(64, 64, 64, 4)}
        else:
            assert (128, 64, 64, 4, "tiled") in glu and clamp == glu
        grad = ROW_LAUNCH | dict(GLU=True, EPILOGUE="act_grad", PRECISION="tf32", C_TMA=False)
        tf32_grad = _shapes(tuning.row_candidates(tuning.ROW_GPU_CONFIGS, fp32, **grad))
        assert ((128, 64, 64, 4, "tma") in tf32_grad) == (arch < (9, 0)) and (64, 128, 64, 4, "tma") in tf32_grad
        clamp_grad = _shapes(tuning.row_candidates(tuning.ROW_GPU_CONFIGS, fp32, **grad | dict(CLAMP=True)))
        assert ((128, 128, 64, 8, "tma") in clamp_grad) == (arch < (9, 0)) and (128, 128, 64, 8, "tma") in tf32_grad
        fp8 = ROW_LAUNCH | dict(EPILOGUE="act", STORE_PREACT=True)
        stored = _shapes(tuning.fp8_candidates(tuning.FP8_GPU_CONFIGS, bf16, **fp8))
        assert ((128, 128, 128, 8, "tma") in stored) == (arch[0] != 9) and (128, 128, 128, 8, "tiled") in stored
        wgrad = dict(PRECISION="tf32", A_TMA=True, B_TMA=False, SCALE=True, C_TMA=True)
        scaled = _shapes(tuning.wgrad_candidates(tuning.WGRAD_GPU_CONFIGS, fp32, **wgrad))
        assert (64, 128, 64, 4, "tiled") not in scaled and (64, 128, 64, 4, "tma") in scaled
        scaled = _shapes(tuning.wgrad_candidates(tuning.WGRAD_GPU_CONFIGS, bf16, **wgrad | dict(PRECISION="ieee")))
        assert ((128, 128, 128, 8, "tiled") in scaled) == (arch[0] < 10) and (128, 128, 128, 8, "tma") in scaled
        unscaled = _shapes(tuning.wgrad_candidates(tuning.WGRAD_GPU_CONFIGS, fp32, **wgrad | dict(SCALE=False)))
        assert (64, 128, 64, 4, "tiled") in unscaled


def test_rows_not_16_aligned_keep_the_tiled_design_at_64x64(monkeypatch):
    """A stride Triton cannot prove a multiple of 16 elements loads rows element by element: the
    tiled design spills inside its K loop above 64x64 (sm_90a: 29-510 instructions per step with
    b transposed); the persistent design, which loads b by TMA, keeps its tiles."""
    monkeypatch.setattr(tuning, "INTERPRET", False)
    named = {"a_ptr": torch.empty(1, dtype=torch.bfloat16), "stride_am": 24, "stride_ak": 1, "stride_bk": 1}
    with tuning.use_design(None):
        unaligned = _shapes(tuning.row_candidates(tuning.ROW_GPU_CONFIGS, named, **ROW_LAUNCH))
        aligned = _shapes(tuning.row_candidates(tuning.ROW_GPU_CONFIGS, named | {"stride_am": 48}, **ROW_LAUNCH))
    assert {s for s in unaligned if s[4] == "tiled"} == {(64, 64, 64, 4, "tiled")}
    assert {s for s in unaligned if s[4] == "tma"} == {s for s in aligned if s[4] == "tma"}
    assert (128, 128, 64, 8, "tiled") in aligned


def test_cuda_core_tiles_serve_ieee_fp32_only():
    """fp32 with IEEE products runs its dots on CUDA cores, in tiles of its own (none spills on
    sm_80, sm_90a or sm_100a); tensor-core launches never take those; with MOE_KERNELS_AUTOTUNE=0
    they stay beside the smallest config of each design."""
    fp32, bf16 = ({"a_ptr": torch.empty(1, dtype=dtype)} for dtype in (torch.float32, torch.bfloat16))
    assert tuning.row_candidates(tuning.ROW_GPU_CONFIGS, fp32, **ROW_LAUNCH) == [tuning.ROW_CUDA_CORE_CONFIG]
    glu = ROW_LAUNCH | dict(GLU=True, EPILOGUE="act")
    assert tuning.row_candidates(tuning.ROW_GPU_CONFIGS, fp32, **glu) == [tuning.GLU_FORWARD_CUDA_CORE_CONFIG]
    wgrad = dict(PRECISION="ieee", A_TMA=False, B_TMA=False, SCALE=False, C_TMA=True)
    assert tuning.wgrad_candidates(tuning.WGRAD_GPU_CONFIGS, fp32, **wgrad) == [tuning.WGRAD_CUDA_CORE_CONFIG]
    with tuning.use_design(None):
        for dtype, precision in ((bf16, "ieee"), (fp32, "tf32")):
            kept = tuning.row_candidates(tuning.ROW_GPU_CONFIGS, dtype, **ROW_LAUNCH | dict(PRECISION=precision))
            assert kept and not any(tuning.cuda_core(c) for c in kept)
            kept = tuning.wgrad_candidates(tuning.WGRAD_GPU_CONFIGS, dtype, **wgrad | dict(PRECISION=precision))
            assert kept and not any(tuning.cuda_core(c) for c in kept)
    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as patch:
        patch.setattr(tuning, "INTERPRET", False)
        patch.setattr(tuning, "AUTOTUNE", False)
        smallest = tuning.autotune_configs(tuning.ROW_GPU_CONFIGS, [])
    assert [c for c in smallest if tuning.cuda_core(c)] == [
        tuning.ROW_CUDA_CORE_CONFIG,
        tuning.GLU_FORWARD_CUDA_CORE_CONFIG,
    ]
    assert {tuning.design_of(c) for c in smallest if not tuning.cuda_core(c)} == set(tuning.DESIGNS)


def test_a_tma_store_stages_its_tile_in_shared_memory(monkeypatch):
    """The TMA design's TMA store stages the output tile in shared memory: an fp32 (TF32) tile of
    128x128 takes 64 KiB beside its 3-stage pipeline's 192 KiB, over Hopper's 227 KiB (the sm_90a
    compile table: 256 KiB), so with C_TMA that config is not a candidate; with pointer stores it is."""
    monkeypatch.setattr(tuning, "INTERPRET", False)
    fp32 = {"a_ptr": torch.empty(1, dtype=torch.float32)}
    launch = ROW_LAUNCH | dict(PRECISION="tf32")
    with tuning.use_design("tma"):
        stored = _shapes(tuning.row_candidates(tuning.ROW_GPU_CONFIGS, fp32, **launch))
        pointers = _shapes(tuning.row_candidates(tuning.ROW_GPU_CONFIGS, fp32, **launch | dict(C_TMA=False)))
    assert (128, 128, 64, 8, "tma") in pointers - stored and (128, 128, 32, 8, "tma") in stored
