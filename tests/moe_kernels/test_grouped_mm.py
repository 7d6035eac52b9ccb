import pytest
import torch

import moe_kernels as mk
from moe_kernels import reference
from tests.moe_kernels.helpers import BACKENDS, DEVICE, DTYPES, assert_close_to_reference, grads, non_contiguous

# (group sizes, K, N): empty groups, one group holding every row, M=1, sizes off the block.
CASES = [
    ([5, 0, 25, 7], 20, 24),
    ([0, 1], 8, 16),
    ([70, 0, 0], 48, 40),
    ([17, 33], 33, 17),
    ([0, 0, 0, 0], 16, 8),
]


def _inputs(sizes, K, N, dtype):
    M, E = sum(sizes), len(sizes)
    x = torch.randn(M, K, device=DEVICE).to(dtype).requires_grad_()
    w = (torch.randn(E, K, N, device=DEVICE) / K**0.5).to(dtype).requires_grad_()
    offsets = torch.tensor(sizes, device=DEVICE).cumsum(0).to(torch.int32)
    return x, w, offsets


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes,K,N", CASES)
def test_grouped_mm_matches_reference(backend, dtype, sizes, K, N):
    x, w, offsets = _inputs(sizes, K, N, dtype)
    y = mk.grouped_mm(x, w, offsets, backend=backend)
    ref = reference.grouped_mm(x.double(), w.double(), offsets)
    assert y.shape == (sum(sizes), N) and y.dtype == dtype
    assert_close_to_reference(y, ref, dtype, "y")
    grad_y = torch.randn_like(ref)
    for name, got, want in zip(("dx", "dw"), grads(y, [x, w], grad_y), grads(ref, [x, w], grad_y)):
        assert_close_to_reference(got, want, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K,N", [(0, 5), (5, 0), (0, 0)])
def test_empty_products_agree_on_both_backends(backend, K, N):
    x, w, offsets = _inputs([2, 0, 5], K, N, torch.float32)
    y = mk.grouped_mm(x, w, offsets, backend=backend)
    assert y.shape == (7, N) and torch.count_nonzero(y) == 0
    dx, dw = torch.autograd.grad(y, [x, w], torch.randn_like(y))
    assert dx.shape == x.shape and dw.shape == w.shape
    assert torch.count_nonzero(dx) == 0 and torch.count_nonzero(dw) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_expanded_gradient(backend):
    x, w, offsets = _inputs([6, 0, 11], 12, 20, torch.float32)
    x_nc = non_contiguous(x)
    w_nc = w.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    y = mk.grouped_mm(x_nc, w_nc, offsets.long(), backend=backend)
    y.sum().backward()
    ref = reference.grouped_mm(x.double(), w.double(), offsets)
    ref.sum().backward()
    assert_close_to_reference(y, ref, torch.float32)
    assert_close_to_reference(x_nc.grad, x.grad, torch.float32, "dx")
    assert_close_to_reference(w_nc.grad, w.grad, torch.float32, "dw")


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_stanford_stk_block_sparse_products(dtype):
    """MegaBlocks' formulation: the first expert GEMM as ``sdd`` (a block-diagonal sparse output),
    the second as ``dsd``. stk needs blocks of 128 rows and columns."""
    stk = pytest.importorskip("stk")
    sizes, K, N, E = [128, 0, 256], 32, 128, 3
    x, w, offsets = _inputs(sizes, K, N, dtype)
    x, w = x.detach(), w.detach()
    mask = torch.zeros(sum(sizes), E * N, dtype=dtype, device=DEVICE)
    starts = [0, *offsets.tolist()[:-1]]
    for e, (start, size) in enumerate(zip(starts, sizes)):
        mask[start : start + size, e * N : (e + 1) * N] = 1
    topology = stk.ops.to_sparse(mask, 128)

    sparse_h = stk.ops.sdd(x, w.permute(1, 0, 2).reshape(K, E * N), topology)
    h = mk.grouped_mm(x, w, offsets, backend="triton")
    dense_h = stk.ops.to_dense(sparse_h)
    for e, (start, size) in enumerate(zip(starts, sizes)):
        torch.testing.assert_close(h[start : start + size], dense_h[start : start + size, e * N : (e + 1) * N])

    w2 = (torch.randn(E, N, 128, device=DEVICE) / N**0.5).to(dtype)
    y_stk = stk.ops.dsd(sparse_h, w2.reshape(E * N, 128))
    torch.testing.assert_close(mk.grouped_mm(h, w2, offsets, backend="triton"), y_stk, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([1.0, 4.0])), TypeError, "offsets"),
        ((torch.randn(4, 3), torch.randn(2, 4, 5), torch.tensor([1, 4], dtype=torch.int32)), ValueError, "w"),
        ((torch.randn(4, 3), torch.randn(3, 3, 5), torch.tensor([1, 4], dtype=torch.int32)), ValueError, "offsets"),
        ((torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([3, 1], dtype=torch.int32)), ValueError, "offsets"),
        ((torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([1, 5], dtype=torch.int32)), ValueError, "offsets"),
        ((torch.randn(4, 3), torch.randn(2, 3, 5).half(), torch.tensor([1, 4], dtype=torch.int32)), TypeError, "w"),
        ((torch.randn(4, 3, 1), torch.randn(2, 3, 5), torch.tensor([1, 4], dtype=torch.int32)), ValueError, "x"),
        (([[1.0]], torch.randn(2, 3, 5), torch.tensor([1, 4], dtype=torch.int32)), TypeError, "x"),
    ],
)
def test_bad_input_raises(args, error, match):
    with pytest.raises(error, match=match):
        mk.grouped_mm(*args)


@pytest.mark.skipif(DEVICE != "cpu", reason="spies on the interpreter's launches")
def test_autotune_key_buckets_the_row_count(monkeypatch):
    """Row counts in one power-of-two bucket share one autotuned config, so a new token count
    does not benchmark every config again."""
    from moe_kernels.grouped_mm_kernels import grouped_mm_kernel, grouped_wgrad_kernel

    buckets = []
    for kernel in (grouped_mm_kernel, grouped_wgrad_kernel):
        assert "M_BUCKET" in kernel.keys
        inner = kernel.fn
        run = inner.run

        def spy(*args, _inner=inner, _run=run, **kwargs):
            buckets.append(dict(zip(_inner.arg_names, args))["M_BUCKET"])
            return _run(*args, **kwargs)

        monkeypatch.setattr(inner, "run", spy)
    for rows in (17, 32):
        x = torch.randn(rows, 8, requires_grad=True)
        w = torch.randn(2, 8, 8, requires_grad=True)
        offsets = torch.tensor([rows // 2, rows], dtype=torch.int32)
        y = mk.grouped_mm(x, w, offsets, backend="triton")
        y.backward(torch.randn_like(y))
    assert set(buckets) == {32} and len(buckets) == 6  # forward, dx and dw, twice


def _tiles(configs) -> set[tuple[int, int, int]]:
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in configs}


def test_autotune_candidates_fit_each_launch():
    """On the GPU the autotuner compiles only configs that can launch (ptxas's shared memory for
    the same tiles: 240 KiB for bf16's GLU forward at 128x256, over Hopper's 227) and, for fp32
    with IEEE products, tiles that do not spill."""
    from moe_kernels import tuning
    from moe_kernels.tuning import (
        FP8_GPU_CONFIGS,
        ROW_GPU_CONFIGS,
        WGRAD_GPU_CONFIGS,
        fp8_candidates,
        row_candidates,
        wgrad_candidates,
    )

    def rows(dtype, glu=False, epilogue="none", precision="ieee", b_tma=False):
        named = {"a_ptr": torch.empty(1, dtype=dtype)}
        options = dict(GLU=glu, EPILOGUE=epilogue, PRECISION=precision, B_TMA=b_tma, C_TMA=b_tma)
        return _tiles(row_candidates(ROW_GPU_CONFIGS, named, **options))

    bf16_glu = rows(torch.bfloat16, glu=True, epilogue="act")
    assert bf16_glu == {(128, 128, 64), (128, 64, 64), (64, 128, 64), (64, 64, 64)}
    assert rows(torch.bfloat16) == bf16_glu | {(128, 256, 64)}
    # One B tile, no GLU dot; but the GLU gradient's epilogue leaves no registers for 128x256.
    assert rows(torch.bfloat16, glu=True, epilogue="act_grad") == rows(torch.float16) - {(128, 256, 64)}
    # TF32's 64-wide K steps fit a GLU's two B tiles only at 64x64; 32-wide ones fit larger tiles.
    assert rows(torch.float32, glu=True, epilogue="act", precision="tf32") == {
        (64, 64, 64),
        (128, 128, 32),
        (128, 64, 32),
        (64, 128, 32),
    }
    assert (128, 128, 64) in rows(torch.float32, precision="tf32")
    # IEEE products run on CUDA cores: tiles of their own, smaller for the GLU's two accumulators.
    assert rows(torch.float32) == rows(torch.float32, glu=True, epilogue="act_grad") == {(64, 64, 32)}
    assert rows(torch.float32, glu=True, epilogue="act") == {(32, 32, 64)}
    # The persistent design, where b is TMA-ready, at its larger tiles; else the tiled one.
    with tuning.use_design("tma"):
        assert rows(torch.bfloat16, glu=True, epilogue="act", b_tma=True) == {
            (128, 128, 64),
            (128, 64, 64),
            (64, 128, 64),
        }
        assert rows(torch.bfloat16, b_tma=True) == {(128, 128, 64), (128, 256, 64), (128, 64, 64), (64, 128, 64)}
        assert rows(torch.bfloat16, glu=True, epilogue="act") == bf16_glu

    def wgrad(dtype, precision="ieee"):
        named = {"a_ptr": torch.empty(1, dtype=dtype)}
        return _tiles(
            wgrad_candidates(
                WGRAD_GPU_CONFIGS, named, PRECISION=precision, A_TMA=False, B_TMA=False, SCALE=False, C_TMA=True
            )
        )

    tensor_cores = _tiles(WGRAD_GPU_CONFIGS) - {(16, 64, 64)}
    assert wgrad(torch.bfloat16) == tensor_cores
    assert wgrad(torch.float32, "tf32") == tensor_cores - {(128, 128, 128)}
    assert wgrad(torch.float32) == {(16, 64, 64)}

    def fp8(dtype, glu=False, epilogue="none"):
        named = {"a_ptr": torch.empty(1, dtype=dtype)}
        return fp8_candidates(FP8_GPU_CONFIGS, named, GLU=glu, EPILOGUE=epilogue, B_TMA=False, STORE_PREACT=False)

    # The FP8 kernel's 128x128 tile spills in its K loop for the GLU forms; fp32 inputs take the
    # 8-warp 64x64 tile, which the others never do.
    assert _tiles(fp8(torch.bfloat16)) == _tiles(FP8_GPU_CONFIGS)
    assert all(c.num_warps == 4 for c in fp8(torch.bfloat16) if c.kwargs["BLOCK_N"] == 64 == c.kwargs["BLOCK_M"])
    assert (
        _tiles(fp8(torch.bfloat16, glu=True, epilogue="act"))
        == _tiles(fp8(torch.bfloat16, glu=True, epilogue="act_grad"))
        == _tiles(FP8_GPU_CONFIGS) - {(128, 128, 128)}
    )
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in fp8(torch.float32)] == [(64, 64, 8)]


def test_the_candidates_fit_the_gpus_own_shared_memory(monkeypatch):
    """On an A100 (163 KiB of shared memory per block, not Hopper's 227) the autotuner drops the
    weight gradient's 128x128x128 tile (192 KiB in bf16) before compiling it."""
    from moe_kernels import tuning

    monkeypatch.setattr(tuning, "shared_memory_limit", lambda device: 166912)
    a100 = tuning.wgrad_candidates(
        tuning.WGRAD_GPU_CONFIGS,
        {"a_ptr": torch.empty(1, dtype=torch.bfloat16)},
        PRECISION="ieee",
        A_TMA=False,
        B_TMA=False,
        SCALE=False,
        C_TMA=True,
    )
    assert _tiles(a100) == _tiles(tuning.WGRAD_GPU_CONFIGS) - {(128, 128, 128), (16, 64, 64)}
