"""FP8 (e4m3) experts: block quantization, and the FP8 grouped GEMM against its exact emulation."""

import pytest
import torch

import moe_kernels as mk
from moe_kernels.activations import projection_width
from moe_kernels.fp8 import E4M3_MAX, FP8, quantize_rows_fp8
from moe_kernels.grouped_mm import grouped_mm_act, grouped_mm_fp8_torch, grouped_mm_torch, grouped_mm_triton
from tests.moe_kernels.helpers import BACKENDS, DEVICE


def _tiles(t: torch.Tensor, block: int) -> torch.Tensor:
    """``[..., K, N]`` cut into ``[..., Kb, Nb, block * block]`` tiles (shapes that divide)."""
    *lead, K, N = t.shape
    return t.reshape(*lead, K // block, block, N // block, block).transpose(-3, -2).flatten(-2)


@pytest.mark.parametrize("shape, block", [((3, 200, 72), 128), ((64, 48), 16), ((2, 5, 300, 260), 256)])
def test_round_trip_is_within_e4m3_precision(shape, block):
    w = torch.randn(shape, device=DEVICE) * torch.exp(torch.randn(shape, device=DEVICE))
    q, scale = mk.quantize_fp8(w, block)
    assert q.dtype == FP8 and q.shape == w.shape
    assert q.mT.is_contiguous()  # K-major: what FP8 tensor cores read without a transpose
    assert scale.shape == (*shape[:-2], -(-shape[-2] // block), -(-shape[-1] // block))
    back = mk.dequantize_fp8(q, scale, block)
    step = scale.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., : shape[-2], : shape[-1]]
    # 3 mantissa bits: half a unit in the last place is 2**-4 of the value, or 2**-10 of the
    # scale where e4m3 is subnormal (below 2**-6).
    assert ((back - w).abs() <= w.abs() * 2**-4 + step * 2**-10).all()


def test_each_tile_maximum_maps_to_e4m3s_largest_value_and_exact_values_survive():
    w = torch.randn(2, 64, 96, device=DEVICE)
    q, scale = mk.quantize_fp8(w, 32)
    assert (_tiles(q.float(), 32).abs().amax(-1) == E4M3_MAX).all()  # saturates at the tile's maximum only
    exact = q.float() * 4.0  # e4m3 values, each tile's maximum 448: scale 4 everywhere
    q2, scale2 = mk.quantize_fp8(exact, 32)
    assert torch.equal(q2.float(), q.float()) and (scale2 == 4.0).all()


def test_zero_tiles_get_scale_one():
    w = torch.randn(64, 64, device=DEVICE)
    w[:32, 32:] = 0
    q, scale = mk.quantize_fp8(w, 32)
    assert scale[0, 1] == 1.0 and (q[:32, 32:].float() == 0).all()
    assert (mk.dequantize_fp8(q, scale, 32)[:32, 32:] == 0).all()


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: mk.quantize_fp8(torch.tensor([[1.0, float("inf")]])), ValueError, "non-finite"),
        (lambda: mk.quantize_fp8(torch.tensor([[1.0, float("nan")]])), ValueError, "non-finite"),
        (lambda: mk.quantize_fp8(torch.ones(4, 4), block=100), ValueError, "block must be one of"),
        (lambda: mk.quantize_fp8(torch.ones(4)), ValueError, "at least 2 dimensions"),
        (lambda: mk.quantize_fp8(torch.ones(4, 4, dtype=torch.int32)), TypeError, "dtype"),
        (lambda: mk.dequantize_fp8(*_quantized(), block=64), ValueError, r"scale must have shape \(2, 4\)"),
        (lambda: mk.dequantize_fp8(torch.ones(4, 4), torch.ones(1, 1)), TypeError, "float8_e4m3fn"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _quantized():
    return mk.quantize_fp8(torch.randn(100, 200), 128)


def test_rows_are_quantized_per_group_of_the_block():
    x = torch.randn(5, 300, device=DEVICE)
    q, scale = quantize_rows_fp8(x, 128)
    assert scale.shape == (5, 3)
    for g in range(3):
        columns = slice(128 * g, 128 * (g + 1))
        torch.testing.assert_close(scale[:, g], x[:, columns].abs().amax(1) / E4M3_MAX)
        assert (q[:, columns].float().abs().amax(1) == E4M3_MAX).all()


def _experts(E, K, N, dtype=torch.float32):
    w = torch.randn(E, K, N, device=DEVICE) / K**0.5
    return w, *mk.quantize_fp8(w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "M, K, N, offsets", [(40, 200, 72, [7, 7, 30, 40]), (33, 128, 160, [33, 33, 33]), (1, 64, 16, [1])]
)
def test_grouped_mm_fp8_equals_the_emulation(backend, dtype, M, K, N, offsets):
    """The kernel quantizes as the emulation does, so they differ by fp32 summation order only;
    against full precision the FP8 product is off by about 3.7% (relative Frobenius norm, the
    same for K from 256 to 4096 with Gaussian data: the scales apply per K block)."""
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    w, q, scale = _experts(len(offsets), K, N)
    offsets = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    y = mk.grouped_mm_fp8(x, q, scale, offsets, backend=backend)
    emulated = grouped_mm_fp8_torch(x, q, scale, offsets)
    assert y.dtype == dtype
    # fp32 sums in another order; in fp16 that can move the output by one unit in the last place.
    rtol = 1e-4 if dtype == torch.float32 else 2**-10
    torch.testing.assert_close(y.float(), emulated.float(), atol=rtol * emulated.abs().max().item(), rtol=rtol)
    if y.numel() >= 1000:  # a handful of outputs can stray further (9% for 16 of them)
        exact = grouped_mm_torch(x.float(), w, offsets)
        assert (y.float() - exact).norm() <= 0.05 * exact.norm()
    # The same weights laid out N-major (contiguous, as a checkpoint may hold them): the same product.
    torch.testing.assert_close(mk.grouped_mm_fp8(x, q.contiguous(), scale, offsets, backend=backend), y)


def test_kernel_options_equal_the_emulation():
    """The MoE options of the kernel: gathered rows, SwiGLU (its up half starting mid-block), a
    bias, scattered rows."""
    M, K, H, E = 30, 150, 72, 3
    x = torch.randn(20, K, device=DEVICE)
    a_rows = torch.randint(0, 20, (M,), device=DEVICE, dtype=torch.int32)
    c_rows = torch.randperm(M, device=DEVICE).to(torch.int32)
    offsets = torch.tensor([10, 10, M], dtype=torch.int32, device=DEVICE)
    _, q, scale = _experts(E, K, 2 * H)
    bias = torch.randn(E, 2 * H, device=DEVICE)
    h, _ = grouped_mm_act(x, q, offsets, "swiglu", a_rows=a_rows, bias=bias, b_scale=scale)
    pre = grouped_mm_fp8_torch(x[a_rows.long()], q, scale, offsets) + bias[torch.tensor([0] * 10 + [2] * 20)]
    want = torch.nn.functional.silu(pre[:, :H]) * pre[:, H:]
    torch.testing.assert_close(h, want, atol=1e-5, rtol=1e-4)
    _, q2, scale2 = _experts(E, H, K)
    out = grouped_mm_triton(h, q2, offsets, c_rows=c_rows, b_scale=scale2)
    scattered = torch.empty_like(out).index_copy_(0, c_rows.long(), grouped_mm_fp8_torch(h, q2, scale2, offsets))
    torch.testing.assert_close(out, scattered, atol=1e-5, rtol=1e-4)


def test_grouped_mm_fp8_bad_input():
    x = torch.randn(4, 200)
    _, q, scale = _experts(2, 200, 64)
    offsets = torch.tensor([1, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="scale must have shape"):
        mk.grouped_mm_fp8(x, q, scale[:, :1], offsets)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        mk.grouped_mm_fp8(x, q.float(), scale, offsets)
    with pytest.raises(ValueError, match="K, the width of x"):
        mk.grouped_mm_fp8(torch.randn(4, 100), q, scale, offsets)
    with pytest.raises(ValueError, match="offsets"):
        mk.grouped_mm_fp8(x, q, scale, torch.tensor([1, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="no backward"):
        mk.grouped_mm_fp8(x.requires_grad_(), q, scale, offsets)


def _layer(backend, **options):
    torch.manual_seed(0)
    return mk.MoE(32, 24, 4, 2, num_shared_experts=1, backend=backend, **options).to(DEVICE).eval()


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(activation="gelu_tanh", expert_biases=True),
        dict(router="expert-choice", group_size=8),
        dict(router="diffmoe"),
    ],
    ids=["token choice", "biases", "expert choice", "diffmoe"],
)
def test_fp8_layer_equals_its_emulation_and_stays_near_full_precision(options):
    """``MoE.to_fp8()``: the Triton path equals the PyTorch emulation up to fp32 summation order,
    and the layer's output (shared expert included) stays within 5% of the full-precision
    layer's, relative Frobenius norm (measured: 1.7 to 3.0% on these layers)."""
    full = _layer("torch", **options)
    x = torch.randn(24, 32, device=DEVICE)
    with torch.no_grad():
        want = full(x)
        layers = {backend: _layer(backend, **options).to_fp8() for backend in BACKENDS}
        got = {backend: layer(x) for backend, layer in layers.items()}
    torch.testing.assert_close(got["triton"], got["torch"], atol=1e-5, rtol=1e-4)
    assert (got["torch"] - want).norm() <= 0.05 * want.norm()
    layer = layers["torch"]
    assert layer.fp8_weights and layer.w_in.dtype == FP8 and layer.w_in_scale.shape == (4, 1, 1)
    assert layer.w_in.mT.is_contiguous() and layer.w_out.mT.is_contiguous()  # K-major
    assert {"w_in", "w_out"}.isdisjoint(name for name, _ in layer.named_parameters())
    assert layer.to_fp8() is layer
    # A checkpoint saved contiguous (as safetensors wants) loads back into the K-major buffers.
    saved = {name: value.contiguous() for name, value in layer.state_dict().items()}
    reloaded = _layer("torch", **options).to_fp8()
    reloaded.load_state_dict(saved)
    assert reloaded.w_in.mT.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), got["torch"])


def test_fp8_stored_layer_has_no_backward():
    layer = _layer("torch").to_fp8().train()
    with pytest.raises(ValueError, match="FP8-stored experts .* serve inference"):
        layer(torch.randn(8, 32, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_ffn_in_fp8_takes_full_precision_or_quantized_weights(backend):
    T, D, H, E, k = 20, 48, 40, 4, 2
    x = torch.randn(T, D, device=DEVICE)
    weights = torch.rand(T, k, device=DEVICE)
    experts = torch.rand(T, E, device=DEVICE).argsort(1)[:, :k]
    w_in = torch.randn(E, D, 2 * H, device=DEVICE) / D**0.5
    w_out = torch.randn(E, H, D, device=DEVICE) / H**0.5
    on_the_fly = mk.moe_ffn(x, weights, experts, w_in, w_out, backend=backend, precision="fp8")
    (q_in, s_in), (q_out, s_out) = mk.quantize_fp8(w_in), mk.quantize_fp8(w_out)
    stored = mk.moe_ffn(
        x, weights, experts, q_in, q_out, backend=backend, precision="fp8", w_in_scale=s_in, w_out_scale=s_out
    )
    torch.testing.assert_close(on_the_fly, stored, rtol=0, atol=0)
    # Two FP8 GEMMs in a row, SwiGLU between them: 6.2-6.5% at 200 tokens of width 256 (20 seeds).
    exact = mk.moe_ffn(x, weights, experts, w_in, w_out, backend="torch")
    assert (stored - exact).norm() <= 0.1 * exact.norm()
    emulated = mk.moe_ffn(x, weights, experts, w_in, w_out, backend="torch", precision="fp8")
    torch.testing.assert_close(stored, emulated, atol=1e-5, rtol=1e-4)


def test_moe_ffn_fp8_bad_input():
    x, weights, experts = torch.randn(6, 16), torch.rand(6, 1), torch.zeros(6, 1, dtype=torch.long)
    w_in, w_out = torch.randn(2, 16, 16), torch.randn(2, 8, 16)
    (q_in, s_in), (q_out, s_out) = mk.quantize_fp8(w_in), mk.quantize_fp8(w_out)
    cases = [
        (dict(precision="fp4"), ValueError, "precision must be None or 'fp8'"),
        (dict(w_in_scale=s_in), ValueError, "go with precision='fp8' and FP8 w_in"),
        (dict(precision="fp8", w_in=q_in), ValueError, "pass w_in_scale"),
        (dict(precision="fp8", w_in_scale=s_in), ValueError, "go with precision='fp8' and FP8 w_in"),
        (
            dict(precision="fp8", w_in=q_in, w_in_scale=s_in, w_out_scale=s_out),
            ValueError,
            "w_out_scale goes with an FP8 w_out",
        ),
        (dict(precision="fp8", w_in=w_in.clone().fill_(float("nan"))), ValueError, "w_in holds a non-finite"),
        (dict(precision="fp8", w_out=w_out.clone().fill_(float("inf"))), ValueError, "w_out holds a non-finite"),
        (dict(precision="fp8", w_in=q_in, w_in_scale=torch.ones(2, 2, 1)), ValueError, "w_in scale must have shape"),
        (dict(w_in=q_in), TypeError, "w_in must have the dtype of x"),
    ]
    for change, error, match in cases:
        args = dict(x=x, weights=weights, experts=experts, w_in=w_in, w_out=w_out, activation="swiglu")
        args.update(change)
        with pytest.raises(error, match=match):
            mk.moe_ffn(**args)
    with pytest.raises(ValueError, match="FP8-stored experts .* serve inference"):
        mk.moe_ffn(
            x.requires_grad_(), weights, experts, q_in, q_out, precision="fp8", w_in_scale=s_in, w_out_scale=s_out
        )


def _training_inputs(T, D, H, E, k, activation, biases, dtype):
    torch.manual_seed(1)
    width = projection_width(activation, H)
    experts = torch.rand(T, E, device=DEVICE).argsort(1)[:, :k]
    experts[experts == E - 1] = 0  # the last expert gets no token
    leaves = {
        "x": torch.randn(T, D, device=DEVICE),
        "weights": torch.rand(T, k, device=DEVICE),
        "w_in": torch.randn(E, D, width, device=DEVICE) / D**0.5,
        "w_out": torch.randn(E, H, D, device=DEVICE) / H**0.5,
    }
    if biases:
        leaves.update(b_in=torch.randn(E, width, device=DEVICE) / 4, b_out=torch.randn(E, D, device=DEVICE) / 4)
    leaves = {name: t.to(dtype) for name, t in leaves.items()}
    return leaves, experts.contiguous(), torch.randn(T, D, device=DEVICE).to(dtype)


def _trained(leaves, experts, grad_y, activation, backend, precision):
    leaves = {name: t.clone().requires_grad_() for name, t in leaves.items()}
    biases = {name: leaves[name] for name in ("b_in", "b_out") if name in leaves}
    y = mk.moe_ffn(
        leaves["x"], leaves["weights"], experts, leaves["w_in"], leaves["w_out"], activation, backend,
        precision=precision, **biases,
    )  # fmt: skip
    y.backward(grad_y)
    return {"y": y.detach(), **{f"d {name}": t.grad for name, t in leaves.items()}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "T, D, H, E, k, activation, biases",
    [(19, 48, 40, 4, 2, "swiglu", False), (9, 160, 72, 3, 1, "gelu_tanh", True), (1, 48, 40, 3, 3, "swiglu", True)],
    ids=["swiglu", "K over two blocks, biases, k=1", "one token, k=E"],
)
def test_fp8_training_kernels_equal_the_emulation(dtype, T, D, H, E, k, activation, biases):
    """``precision="fp8"`` in training: the forward and input-gradient GEMMs in FP8 (the latter
    on the transposed quantized weights, the routing weight and the activation's derivative in
    the epilogue), the weights' gradients in the dtype of x. The Triton path equals the PyTorch
    emulation up to fp32 summation order (which can flip an e4m3 rounding now and then, hence
    a tolerance relative to each tensor's size)."""
    inputs = _training_inputs(T, D, H, E, k, activation, biases, dtype)
    got, want = (_trained(*inputs, activation, backend, "fp8") for backend in ("triton", "torch"))
    assert got.keys() == want.keys()
    for name in got:
        assert got[name].dtype == dtype, name
        error = (got[name].float() - want[name].float()).norm() / want[name].float().norm()
        assert error <= (1e-4 if dtype == torch.float32 else 2e-3), (name, error.item())


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_fp8_gradients_stay_near_full_precision(activation):
    """Against the full-precision layer, every output and gradient of the FP8 experts is off by
    5-7% (relative Frobenius norm; measured at 200 tokens, width 256, 8 experts, k=2, 10 seeds:
    y 6.3-6.4%, dx 6.4-6.6%, d weights 6.0-7.0%, d w_in 5.4-5.6%, d w_out 5.3-5.4% for SwiGLU, a
    point less for GELU): each GEMM with an FP8 operand adds e4m3's rounding (3 mantissa bits),
    and the error does not grow along K since the scales apply per block of 128."""
    inputs = _training_inputs(64, 256, 128, 4, 2, activation, False, torch.float32)
    fp8, full = (_trained(*inputs, activation, "torch", precision) for precision in ("fp8", None))
    for name in full:
        assert (fp8[name] - full[name]).norm() <= 0.1 * full[name].norm(), name


@pytest.mark.parametrize("routing", ["token-choice", "expert-choice"])
def test_fp8_layer_trains_and_its_kernels_equal_the_emulation(routing):
    """``MoE(precision="fp8")``: the parameters stay fp32 and get their gradients; both backends
    agree, for both routings."""
    options = dict(router=routing, group_size=8) if routing == "expert-choice" else {}
    x = torch.randn(16, 32, device=DEVICE)
    results = {}
    for backend in BACKENDS:
        layer = _layer(backend, precision="fp8", **options).train()
        assert layer.precision == "fp8" and not layer.fp8_weights and "precision='fp8'" in repr(layer)
        xg = x.clone().requires_grad_()
        y = layer(xg)
        (y.square().mean() + layer.aux_loss).backward()
        results[backend] = [y, xg.grad, layer.w_in.grad, layer.w_out.grad, layer.router.weight.grad]
        assert layer.w_in.dtype == layer.w_in.grad.dtype == torch.float32
    for got, want in zip(results["triton"], results["torch"]):
        assert (got - want).norm() <= 1e-4 * want.norm()


def test_fp8_precision_setting():
    layer = _layer("torch")
    assert layer.precision is None
    with pytest.raises(ValueError, match="precision must be one of"):
        layer.precision = "fp4"
    with pytest.raises(ValueError, match="precision must be one of"):
        _layer("torch", precision="bf16")
    layer.to_fp8()
    assert layer.precision == "fp8"
    with pytest.raises(ValueError, match="stored in FP8"):
        layer.precision = None


CASTS = {
    "to(bf16)": lambda m: m.to(torch.bfloat16),
    "to(fp32)": lambda m: m.to(torch.float32),
    "half()": lambda m: m.half(),
    "float()": lambda m: m.float(),
    "bfloat16()": lambda m: m.bfloat16(),
    "type(fp32)": lambda m: m.type(torch.float32),
}


@pytest.mark.parametrize("cast", sorted(CASTS))
def test_a_dtype_cast_keeps_fp8_experts_and_their_scales(cast):
    """A cast converts the router, shared experts and biases, and leaves the FP8 weights and their
    fp32 scales as they were (casting them would compute with unscaled values: garbage)."""
    layer = _layer("torch", expert_biases=True, activation="gelu_tanh").to_fp8()
    stored = {name: getattr(layer, name).clone() for name in ("w_in", "w_out", "w_in_scale", "w_out_scale")}
    x = torch.randn(24, 32, device=DEVICE)
    with torch.no_grad():
        before = layer(x)
        CASTS[cast](layer)
        dtype = layer.router.weight.dtype
        after = layer(x.to(dtype))
    for name, tensor in stored.items():
        assert getattr(layer, name).dtype == tensor.dtype and torch.equal(getattr(layer, name), tensor), name
    assert layer.b_in.dtype == dtype and layer.shared.proj_in.weight.dtype == dtype
    assert (after.float() - before).norm() <= 0.02 * before.norm()  # the cast parts' rounding alone
    # A state dict of the uncast layer loads into the cast one: the FP8 tensors as they are.
    layer.load_state_dict(_layer("torch", expert_biases=True, activation="gelu_tanh").to_fp8().state_dict())
    assert layer.w_in.dtype == FP8 and layer.w_in_scale.dtype == torch.float32 and layer.b_in.dtype == dtype


def test_a_dit_with_fp8_experts_survives_float_and_to():
    from dit.models import create_model
    from dit.precision import inference_weights

    torch.manual_seed(0)
    model = create_model("DiT-MoE-Ti/2-4E2A", input_size=8, in_channels=1, num_classes=10, moe_backend="torch")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model = inference_weights(model.eval(), "fp8")
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        want = model(x, t, y).float()
    for cast in (lambda m: m.float(), lambda m: m.to(torch.bfloat16), lambda m: m.to("cpu", torch.float32)):
        cast(model)
        assert all(moe.w_in.dtype == FP8 and moe.w_in_scale.dtype == torch.float32 for moe in model.moe_layers())
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            got = model(x.to(model.x_embedder.proj.weight.dtype), t, y).float()
        # fp32 or bf16 weights route a few tokens differently; unscaled FP8 values would be off by 1e11.
        assert (got - want).norm() <= 0.2 * want.norm()


@pytest.mark.parametrize("capability, refused", [((8, 0), True), ((8, 6), True), ((8, 9), False), ((9, 0), False)])
def test_fp8_gemms_name_a_gpu_without_fp8_tensor_cores(monkeypatch, capability, refused):
    """An A100 (8.0) has no e4m3 tensor cores, so Triton cannot compile the FP8 GEMM for it: the
    launch says so in one line naming the GPU, never a compiler traceback."""
    from moe_kernels.fp8 import check_fp8_tensor_cores

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    check_fp8_tensor_cores.cache_clear()
    try:
        if refused:
            with pytest.raises(ValueError, match=r"NVIDIA A100-SXM4-80GB is 8\.\d: train and sample in bf16"):
                check_fp8_tensor_cores(torch.device("cuda", 0))
        else:
            check_fp8_tensor_cores(torch.device("cuda", 0))
    finally:
        check_fp8_tensor_cores.cache_clear()
    check_fp8_tensor_cores(torch.device("cpu"))  # the interpreter and the emulation run anywhere
