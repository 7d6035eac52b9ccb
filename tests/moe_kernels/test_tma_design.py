"""The GEMM kernels' TMA design (``tuning.DESIGNS``: the row kernel persistent, both kernels
reading by TMA the operands contiguous per group) against the references: the same cases as the
tiled design's tests, with only the TMA configs in play. Under the interpreter three programs
walk the row kernel's tile schedule, so every program takes several tiles."""

import pytest
import torch

import moe_kernels as mk
from benchmarks.gpu_compile import record_launches
from moe_kernels import reference, tuning
from moe_kernels.grouped_mm import grouped_mm_triton
from tests.moe_kernels import test_expert_choice, test_ffn, test_fp8, test_grouped_mm
from tests.moe_kernels.helpers import DEVICE, DTYPES, assert_close_to_reference, grads

pytestmark = pytest.mark.skipif("triton" not in mk.backend.IMPLEMENTATIONS, reason="a Triton kernel")


def _designs_used(tma: bool | None = None, kernel: str = "grouped_mm") -> set[str]:
    """The designs of ``kernel``'s launches so far (those with an operand TMA can read or not, if given)."""
    tuned = tuning.TUNED_KERNELS[kernel]
    at = [list(tuned.keys).index(name) for name in ("A_TMA", "B_TMA") if name in tuned.keys]
    readable = (lambda key: key[at[-1]]) if kernel == "grouped_mm" else (lambda key: any(key[i] for i in at))
    return {tuning.design_of(c) for key, c in tuned.cache.items() if tma is None or readable(key) == tma}


@pytest.fixture
def tma():
    """Only the TMA design for the test; asserts afterwards that every GEMM launch with an
    operand TMA can read ran it (the row kernel needs b: its weights), and the others the tiled
    design."""
    with tuning.use_design("tma"):
        yield
        for kernel in tuning.DESIGNED_KERNELS:
            assert _designs_used(True, kernel) <= {"tma"} and _designs_used(False, kernel) <= {"tiled"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes,K,N", test_grouped_mm.CASES)
def test_grouped_mm_and_its_gradients(tma, dtype, sizes, K, N):
    """Forward on expert-major rows (a and b by TMA), the input gradient on the transposed
    weights (b read K-contiguous), empty groups, one row, sizes off the block (rows of 17 fp32,
    68 bytes, which TMA cannot read: the tiled design)."""
    test_grouped_mm.test_grouped_mm_matches_reference("triton", dtype, sizes, K, N)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["swiglu", "relu2"])  # a GLU's two B tiles, and one
@pytest.mark.parametrize("T,D,H,E,k,routing", test_ffn.CASES)
def test_moe_ffn(tma, dtype, activation, T, D, H, E, k, routing):
    """Gathered rows (TMA gathers beside the TMA weights), the fused activation and its
    gradient, the scatter and the routing-weight scale in the epilogue; k=1, k=E, T=1, one
    expert for all, empty experts."""
    test_ffn.test_moe_ffn_matches_reference("triton", dtype, activation, T, D, H, E, k, routing)


@pytest.mark.parametrize("activation", ["swiglu", "gelu_tanh"])
@pytest.mark.parametrize("T,D,H,E,k,routing", test_ffn.CASES[:2])
def test_expert_biases_and_prescaled_backward(tma, monkeypatch, activation, T, D, H, E, k, routing):
    test_ffn.test_expert_biases_match_reference("triton", torch.float32, activation, T, D, H, E, k, routing)
    monkeypatch.setattr(tuning, "PRESCALED_BACKWARD", True)
    test_ffn.test_expert_biases_match_reference("triton", torch.float32, activation, T, D, H, E, k, routing)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M, K, N, offsets", [(40, 200, 72, [7, 7, 30, 40]), (1, 64, 16, [1])])
def test_fp8_grouped_mm(tma, dtype, M, K, N, offsets):
    """The FP8 kernel's TMA design: e4m3 weights by TMA, K-major (read transposed) and N-major,
    the activations (16-byte rows: by TMA too) quantized per row as they are loaded; an empty
    group, one row, K over two scale blocks with a partial one."""
    test_fp8.test_grouped_mm_fp8_equals_the_emulation("triton", dtype, M, K, N, offsets)
    if K % 16 == 0:  # rows of 200 e4m3 weights are not 16-byte aligned: that case stays tiled
        assert "tma" in _designs_used(True, "grouped_mm_fp8")


def test_fp8_kernel_options_and_training(tma):
    """Gathered rows beside TMA weights, a GLU whose up half starts mid-block, a bias, scattered
    rows; FP8 training's forward and input-gradient GEMMs (the transposed K-major weights)."""
    test_fp8.test_kernel_options_equal_the_emulation()
    test_fp8.test_fp8_training_kernels_equal_the_emulation(torch.float16, 19, 48, 40, 4, 2, "swiglu", False)
    assert "tma" in _designs_used(True, "grouped_mm_fp8")


def test_swiglu_with_every_option(tma):
    test_ffn.test_more_activations_match_reference("triton", test_ffn.OPTIONS[1], torch.float32, *test_ffn.CASES[0])


@pytest.mark.parametrize("kwargs", [dict(group_size=8), dict(group_size=4, top_k=1)])
def test_expert_choice_layer(tma, kwargs):
    """Expert choice: a token with 0..E experts, the combine with per-token slot counts."""
    test_expert_choice.test_layer_forward_backward_match_reference("triton", kwargs)


def test_rows_tma_cannot_read_take_pointer_loads(tma):
    """a whose row stride is not 16-byte aligned (and a gather of such rows) is read by pointer
    loads inside the persistent kernel; b stays on TMA."""
    x = torch.randn(40, 13, device=DEVICE)[:, :12]  # rows 52 bytes apart
    w = torch.randn(3, 12, 32, device=DEVICE)
    offsets = torch.tensor([7, 7, 40], device=DEVICE, dtype=torch.int32)
    want = reference.grouped_mm(x.double(), w.double(), offsets)
    assert_close_to_reference(grouped_mm_triton(x, w, offsets), want, torch.float32, "y")
    rows = torch.randperm(40, device=DEVICE, dtype=torch.int32)
    gathered = grouped_mm_triton(x, w, offsets, a_rows=rows)
    assert_close_to_reference(
        gathered, reference.grouped_mm(x[rows.long()].double(), w.double(), offsets), torch.float32
    )


def test_gathered_rows_by_tma_gathers_or_by_pointers(tma, monkeypatch):
    """Where TMA gathers rows (Blackwell; the interpreter emulates it) the TMA design reads the
    gathered rows (the tokens of the first GEMM, dL/dy of the pre-activation gradient, the FP8
    kernel's activations) with them; with ``TMA_GATHER`` off, as on Hopper, by pointer loads
    beside the TMA weights. The same results either way (the gathers run in every other test here)."""
    launches = record_launches(
        lambda: test_ffn.test_moe_ffn_matches_reference("triton", torch.float32, "swiglu", *test_ffn.CASES[0])
    )
    gathered = [
        launch["constants"]
        for launch in launches
        if launch["kernel"] == "grouped_mm_kernel" and launch["constants"]["GATHER_A"]
    ]
    assert {c["EPILOGUE"] for c in gathered} == {"act", "act_grad"} and all(c["A_TMA"] for c in gathered)
    monkeypatch.setattr(tuning, "TMA_GATHER", False)
    for case in test_ffn.CASES[:2]:
        test_ffn.test_moe_ffn_matches_reference("triton", torch.float16, "swiglu", *case)
    test_fp8.test_kernel_options_equal_the_emulation()


def test_weights_tma_cannot_read_fall_back_to_the_tiled_design():
    """b with a stride TMA cannot use (here 13 elements, 52 bytes) runs the tiled design,
    whatever the design asked for; so does every launch on a GPU without TMA."""
    x = torch.randn(20, 12, device=DEVICE, requires_grad=True)
    w = torch.randn(2, 12, 13, device=DEVICE)[:, :, :12].requires_grad_()
    offsets = torch.tensor([9, 20], device=DEVICE, dtype=torch.int32)
    with tuning.use_design("tma"):
        y = mk.grouped_mm(x, w, offsets, backend="triton")
        assert _designs_used(False) == {"tiled"}
    ref = reference.grouped_mm(x.double(), w.double(), offsets)
    assert_close_to_reference(y, ref, torch.float32, "y")
    grad_y = torch.randn_like(ref)
    for name, got, want in zip(("dx", "dw"), grads(y, [x, w], grad_y), grads(ref, [x, w], grad_y)):
        assert_close_to_reference(got, want, torch.float32, name)
    configs = [tuning.designed(tuning.config(32, 32, 32, 4, 1), design) for design in tuning.DESIGNS]
    with tuning.use_design("tma"):
        assert [tuning.design_of(c) for c in tuning.by_design(configs, tma=False)] == ["tiled"]
        assert [tuning.design_of(c) for c in tuning.by_design(configs, tma=True)] == ["tma"]


def test_use_design_restores_the_autotuners_choices():
    kernel = tuning.TUNED_KERNELS["grouped_mm"]
    x, w = torch.randn(8, 16, device=DEVICE), torch.randn(2, 16, 16, device=DEVICE)
    offsets = torch.tensor([3, 8], device=DEVICE, dtype=torch.int32)
    grouped_mm_triton(x, w, offsets)
    before = dict(kernel.cache)
    with tuning.use_design("tma"):
        grouped_mm_triton(x, w, offsets)
        assert _designs_used(True) == {"tma"}
        inside = dict(kernel.cache)
    assert kernel.cache == before
    with tuning.use_design("tma"):
        assert kernel.cache == inside  # nothing to tune again
    with pytest.raises(ValueError, match="design must be one of"):
        with tuning.use_design("warp-specialized"):
            pass


def test_outputs_stored_by_tma_end_at_their_group(tma, monkeypatch):
    """The TMA design stores the expert-major rows, the pre-activation and the weight gradients by
    TMA (C_TMA), each row tile through a descriptor that ends at its group's last row: a tile that
    overhangs the next group's rows, stored after the programs that wrote them (three programs,
    32-row tiles: groups of 5, 40, 3 and 30 rows), leaves them intact. With ``TMA_STORE`` off,
    pointer stores and the same results."""
    launches = record_launches(
        lambda: test_ffn.test_moe_ffn_matches_reference("triton", torch.float32, "swiglu", *test_ffn.CASES[0])
    )
    stored = {launch["kernel"] for launch in launches if launch["constants"].get("C_TMA")}
    assert {"grouped_mm_kernel", "grouped_wgrad_kernel"} <= stored
    x = torch.randn(78, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(4, 16, 32, device=DEVICE, requires_grad=True)
    offsets = torch.tensor([5, 45, 48, 78], device=DEVICE, dtype=torch.int32)
    leaves = [t.detach().double().requires_grad_() for t in (x, w)]
    want = reference.grouped_mm(*leaves, offsets)
    grad = torch.randn_like(want)
    wanted = grads(want, leaves, grad)
    for store in (True, False):
        monkeypatch.setattr(tuning, "TMA_STORE", store)
        y = mk.grouped_mm(x, w, offsets, backend="triton")
        assert_close_to_reference(y, want, torch.float32, "y")
        for got, ref, name in zip(grads(y, [x, w], grad), wanted, ("dx", "dw")):
            assert_close_to_reference(got, ref, torch.float32, name)
