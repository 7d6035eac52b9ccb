import pytest
import torch

import moe_kernels as mk
from moe_kernels import reference, tuning
from moe_kernels.activations import projection_width
from moe_kernels.combine import combine, combine_torch, weighted_rows, weighted_rows_torch
from tests.moe_kernels.helpers import BACKENDS, DEVICE, DTYPES, assert_close_to_reference, grads, non_contiguous

# (T, D, H, E, k, routing): k=1, k=E, T=1, sizes off the block, empty experts, one expert for all.
CASES = [
    (19, 24, 20, 4, 2, "random"),
    (1, 16, 16, 3, 3, "random"),
    (33, 40, 36, 5, 1, "one expert"),
    (25, 16, 24, 6, 2, "empty experts"),
]


def _inputs(T, D, H, E, k, routing, activation, dtype):
    x = torch.randn(T, D, device=DEVICE).to(dtype).requires_grad_()
    weights = torch.rand(T, k, device=DEVICE).requires_grad_()
    if routing == "one expert":
        experts = torch.full((T, k), 0, device=DEVICE) + torch.arange(k, device=DEVICE)
    elif routing == "empty experts":
        experts = torch.rand(T, 2, device=DEVICE).argsort(dim=1)[:, :k] + 2
    else:
        experts = torch.rand(T, E, device=DEVICE).argsort(dim=1)[:, :k]
    width = projection_width(activation, H)
    w_in = (torch.randn(E, D, width, device=DEVICE) / D**0.5).to(dtype).requires_grad_()
    w_out = (torch.randn(E, H, D, device=DEVICE) / H**0.5).to(dtype).requires_grad_()
    return x, weights, experts, w_in, w_out


def _reference(x, weights, experts, w_in, w_out, activation):
    return reference.moe_ffn(x.double(), weights.double(), experts, w_in.double(), w_out.double(), activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "gelu_tanh", "silu", "relu"])
@pytest.mark.parametrize("T,D,H,E,k,routing", CASES)
def test_moe_ffn_matches_reference(backend, dtype, activation, T, D, H, E, k, routing):
    _check_against_reference(backend, dtype, activation, T, D, H, E, k, routing)


# SwiGLU with clamped inputs (DeepSeek-V4's) and GPT-OSS's activation, whose limit of 1.5 clamps
# about a third of the pre-activations here; fp32 only, so that no rounding moves a value across
# the limit between the kernel and the reference (the gradient is discontinuous there).
OPTIONS = [mk.swiglu_activation(limit=1.5), mk.swiglu_activation(limit=1.5, alpha=1.702, up_offset=1.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "activation, dtype",
    [(a, d) for a in ("geglu", "geglu_tanh", "relu2") for d in DTYPES] + [(a, torch.float32) for a in OPTIONS],
)
@pytest.mark.parametrize("T,D,H,E,k,routing", CASES[:1])
def test_more_activations_match_reference(backend, activation, dtype, T, D, H, E, k, routing):
    """Gated GELU (Gemma's, in both forms), relu² (Nemotron-H's), SwiGLU with options."""
    scale = 3.0 if activation in OPTIONS else 1.0  # pre-activations past the limit
    _check_against_reference(backend, dtype, activation, T, D, H, E, k, routing, scale)


def _check_against_reference(backend, dtype, activation, T, D, H, E, k, routing, scale=1.0):
    x, weights, experts, w_in, w_out = _inputs(T, D, H, E, k, routing, activation, dtype)
    with torch.no_grad():
        w_in.mul_(scale)
    y = mk.moe_ffn(x, weights, experts, w_in, w_out, activation=activation, backend=backend)
    ref = _reference(x, weights, experts, w_in, w_out, activation)
    assert y.shape == (T, D) and y.dtype == dtype
    assert_close_to_reference(y, ref, dtype, "y")
    grad_y = torch.randn_like(ref)
    inputs = [x, weights, w_in, w_out]
    for name, got, want in zip(
        ("dx", "dweights", "dw_in", "dw_out"), grads(y, inputs, grad_y), grads(ref, inputs, grad_y)
    ):
        assert got.dtype == (weights.dtype if name == "dweights" else dtype)
        assert_close_to_reference(got, want, dtype, name)


def _biases(E, D, w_in, dtype):
    b_in = torch.randn(E, w_in.shape[2], device=DEVICE).to(dtype).requires_grad_()
    b_out = torch.randn(E, D, device=DEVICE).to(dtype).requires_grad_()
    return b_in, b_out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["swiglu", "gelu_tanh"])
@pytest.mark.parametrize("T,D,H,E,k,routing", CASES)
def test_expert_biases_match_reference(backend, dtype, activation, T, D, H, E, k, routing):
    """Biases added in the GEMM epilogues; their gradients summed inside the weight-gradient kernel."""
    _check_with_biases(backend, dtype, activation, T, D, H, E, k, routing)


@pytest.mark.skipif("triton" not in BACKENDS, reason="a choice of the Triton backward")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D,H,E,k,routing", CASES)
def test_prescaled_backward_matches_reference(monkeypatch, dtype, T, D, H, E, k, routing):
    """``PRESCALED_BACKWARD``: dL/dy gathered and weighted once into expert-major rows, which the
    second GEMM's two gradients (dh, dW_out and its bias) then read plainly."""
    monkeypatch.setattr(tuning, "PRESCALED_BACKWARD", True)
    _check_with_biases("triton", dtype, "swiglu", T, D, H, E, k, routing)


@pytest.mark.skipif("triton" not in BACKENDS, reason="a choice of the Triton backward")
@pytest.mark.parametrize("in_epilogue", [True, False])
@pytest.mark.parametrize(
    "activation, T,D,H,E,k,routing", [("swiglu", *case) for case in CASES] + [("gelu_tanh", *CASES[0])]
)
def test_routing_weights_gradient_from_either_source(monkeypatch, in_epilogue, activation, T, D, H, E, k, routing):
    """``WEIGHT_GRAD_IN_EPILOGUE``: the weights' gradient from the input-gradient GEMM's epilogue
    (the forward keeps no per-slot outputs; every other Triton test runs it too) or from a pass
    over the saved outputs; the same gradients either way, the weights alone or with every input,
    fp16 and fp32, a GLU and a plain activation, k=1, k=E, T=1, empty experts."""
    monkeypatch.setattr(tuning, "WEIGHT_GRAD_IN_EPILOGUE", in_epilogue)
    x, weights, experts, w_in, w_out = _inputs(T, D, H, E, k, routing, activation, torch.float32)
    # Only the weights need a gradient: the pre-activation serves them, or the outputs do.
    saved = mk.experts.saves(x.detach(), weights, None, None, None, None, "triton", False)
    assert saved == (in_epilogue, False, not in_epilogue)
    frozen = [t.detach() for t in (x, w_in, w_out)]
    y = mk.moe_ffn(frozen[0], weights, experts, *frozen[1:], activation, backend="triton")
    ref = reference.moe_ffn(
        frozen[0].double(), weights.double(), experts, *(t.double() for t in frozen[1:]), activation
    )
    grad_y = torch.randn_like(ref)
    assert_close_to_reference(*grads(y, [weights], grad_y), *grads(ref, [weights], grad_y), torch.float32, "dweights")
    _check_against_reference("triton", DTYPES[-1], activation, T, D, H, E, k, routing)


@pytest.mark.skipif("triton" not in BACKENDS, reason="a choice of the Triton layer")
@pytest.mark.parametrize("T,D,H,E,k,routing", CASES)
def test_rows_scattered_to_slot_order_match_reference(monkeypatch, T, D, H, E, k, routing):
    """``GATHER_COMBINE`` off: the second GEMM and the input gradient's scatter their rows to slot
    order for the combine (each token gathering its expert-major rows, the default, runs in every
    other Triton test); k=1, where dx needs no combine, k=E, T=1, empty experts."""
    monkeypatch.setattr(tuning, "GATHER_COMBINE", False)
    _check_against_reference("triton", torch.float32, "swiglu", T, D, H, E, k, routing)


@pytest.mark.skipif("triton" not in BACKENDS, reason="a Triton kernel")
@pytest.mark.parametrize("slots", [2, "per token"])
def test_the_combine_gathers_rows_in_any_order(slots):
    """``combine`` with ``rows``: each slot's row read where ``rows`` says, the same sums as from
    rows in slot order; per-token counts 0 to 3; 300 columns span three partial tiles."""
    T = 13
    if slots == "per token":
        counts = torch.randint(0, 4, (T,), device=DEVICE)
        slots = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).int()
        S = int(slots[-1])
    else:
        S = T * slots
    src = torch.randn(S, 300, device=DEVICE)
    weights = torch.rand(S, device=DEVICE)
    rows = torch.randperm(S, device=DEVICE).int()
    shuffled = torch.empty_like(src).index_copy_(0, rows.long(), src)  # slot s's row at rows[s]
    for w in (weights, None):
        want = combine_torch(src, w, slots, T, torch.float32)
        torch.testing.assert_close(combine(shuffled, w, slots, T, torch.float32, rows), want)
        torch.testing.assert_close(combine_torch(shuffled, w, slots, T, torch.float32, rows), want)


def _check_with_biases(backend, dtype, activation, T, D, H, E, k, routing):
    x, weights, experts, w_in, w_out = _inputs(T, D, H, E, k, routing, activation, dtype)
    b_in, b_out = _biases(E, D, w_in, dtype)
    y = mk.moe_ffn(x, weights, experts, w_in, w_out, activation, backend, b_in=b_in, b_out=b_out)
    ref = reference.moe_ffn(
        x.double(), weights.double(), experts, w_in.double(), w_out.double(), activation, b_in.double(), b_out.double()
    )
    assert_close_to_reference(y, ref, dtype, "y")
    grad_y = torch.randn_like(ref)
    inputs = [x, weights, w_in, w_out, b_in, b_out]
    names = ("dx", "dweights", "dw_in", "dw_out", "db_in", "db_out")
    for name, got, want in zip(names, grads(y, inputs, grad_y), grads(ref, inputs, grad_y)):
        assert got.dtype == (weights.dtype if name == "dweights" else dtype)
        assert_close_to_reference(got, want, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wanted", ["b_in", "b_out", "b_in,b_out", "x,b_out"])
def test_bias_gradients_alone(backend, wanted):
    """Training only the biases (frozen expert matrices) computes no weight gradient."""
    x, weights, experts, w_in, w_out = _inputs(13, 16, 12, 4, 2, "random", "swiglu", torch.float32)
    b_in, b_out = _biases(4, 16, w_in, torch.float32)
    tensors = dict(x=x, b_in=b_in, b_out=b_out)
    chosen = wanted.split(",")
    frozen = {name: t if name in chosen else t.detach() for name, t in tensors.items()}
    y = mk.moe_ffn(
        frozen["x"], weights.detach(), experts, w_in.detach(), w_out.detach(), "swiglu", backend,
        b_in=frozen["b_in"], b_out=frozen["b_out"],
    )  # fmt: skip
    got = torch.autograd.grad(y.square().sum(), [frozen[name] for name in chosen])
    ref = reference.moe_ffn(x, weights, experts, w_in, w_out, "swiglu", b_in, b_out)
    want = torch.autograd.grad(ref.square().sum(), [tensors[name] for name in chosen])
    for name, g, w in zip(chosen, got, want):
        assert_close_to_reference(g, w, torch.float32, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_int32_experts_and_expanded_gradient(backend):
    x, weights, experts, w_in, w_out = _inputs(11, 24, 16, 4, 2, "random", "swiglu", torch.float32)
    x_nc, weights_nc = non_contiguous(x), non_contiguous(weights)
    w_in_nc = w_in.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    w_out_nc = w_out.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    y = mk.moe_ffn(x_nc, weights_nc, experts.int().t().contiguous().t(), w_in_nc, w_out_nc, backend=backend)
    y.sum().backward()
    ref = _reference(x, weights, experts, w_in, w_out, "swiglu")
    ref.sum().backward()
    assert_close_to_reference(y, ref, torch.float32)
    for name, got, want in [
        ("dx", x_nc, x),
        ("dweights", weights_nc, weights),
        ("dw_in", w_in_nc, w_in),
        ("dw_out", w_out_nc, w_out),
    ]:
        assert_close_to_reference(got.grad, want.grad, torch.float32, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("wanted", ["x", "weights", "w_in", "w_out", "x,w_in"])
def test_gradients_for_a_subset_of_inputs(backend, activation, wanted):
    """Frozen experts, a frozen router, fine-tuning one matrix: each saves only what it needs."""
    x, weights, experts, w_in, w_out = _inputs(9, 16, 16, 3, 2, "random", activation, torch.float32)
    tensors = dict(x=x, weights=weights, w_in=w_in, w_out=w_out)
    chosen = wanted.split(",")
    frozen = {name: t if name in chosen else t.detach() for name, t in tensors.items()}
    y = mk.moe_ffn(frozen["x"], frozen["weights"], experts, frozen["w_in"], frozen["w_out"], activation, backend)
    got = torch.autograd.grad(y.square().sum(), [frozen[name] for name in chosen])
    ref = _reference(x, weights, experts, w_in, w_out, activation)
    want = torch.autograd.grad(ref.square().sum(), [tensors[name] for name in chosen])
    for name, g, w in zip(chosen, got, want):
        assert_close_to_reference(g, w, torch.float32, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_model_reaches_every_column_tile(backend):
    """D = 384 spans three of the combine kernels' 128-column tiles, forward and backward."""
    x, weights, experts, w_in, w_out = _inputs(21, 384, 8, 4, 2, "random", "swiglu", torch.float32)
    y = mk.moe_ffn(x, weights, experts, w_in, w_out, backend=backend)
    ref = _reference(x, weights, experts, w_in, w_out, "swiglu")
    assert_close_to_reference(y, ref, torch.float32, "y")
    grad_y = torch.randn_like(ref)
    inputs = [x, weights, w_in, w_out]
    for name, got, want in zip(
        ("dx", "dweights", "dw_in", "dw_out"), grads(y, inputs, grad_y), grads(ref, inputs, grad_y)
    ):
        assert_close_to_reference(got, want, torch.float32, name)


@pytest.mark.skipif("triton" not in BACKENDS, reason="a Triton kernel")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R", [0, 1, 37])
def test_weighted_rows_kernel_matches_torch(dtype, R):
    """Rows gathered from a strided x, weighted in fp32: 300 columns span three partial tiles."""
    x = torch.randn(300, 11, device=DEVICE).to(dtype).T  # [11, 300], column stride 11
    rows = torch.randint(0, 11, (R,), device=DEVICE, dtype=torch.int32)
    weights = torch.rand(50, device=DEVICE)
    weight_rows = torch.randint(0, 50, (R,), device=DEVICE, dtype=torch.int32)
    got = weighted_rows(x, rows, weights, weight_rows)
    assert got.shape == (R, 300) and got.dtype == dtype
    torch.testing.assert_close(got, weighted_rows_torch(x, rows, weights, weight_rows), atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend):
    x, weights, experts, w_in, w_out = _inputs(0, 16, 16, 3, 2, "random", "swiglu", torch.float32)
    y = mk.moe_ffn(x, weights, experts, w_in, w_out, backend=backend)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert torch.count_nonzero(w_in.grad) == 0


def test_triton_backend_never_falls_back_to_torch(monkeypatch):
    """With backend="triton" every step runs in Triton: make the PyTorch paths explode."""

    def boom(*args, **kwargs):
        raise AssertionError("PyTorch path used under backend='triton'")

    for name in ("_grouped_mm", "sort", "searchsorted", "softmax", "index_add", "index_copy", "bincount"):
        monkeypatch.setattr(torch, name, boom)
    for name in ("topk_gating", "moe_ffn", "grouped_mm", "balance_loss"):
        monkeypatch.setattr(reference, name, boom)
    layer = mk.MoE(16, 16, 4, 2, backend="triton").to(DEVICE)
    x = torch.randn(2, 7, 16, device=DEVICE, requires_grad=True)
    y = layer(x)
    (y.square().mean() + layer.aux_loss).backward()
    assert x.grad is not None and layer.router.weight.grad is not None and layer.w_in.grad is not None


def _bad(**changes):
    args = dict(
        x=torch.randn(4, 8),
        weights=torch.rand(4, 2),
        experts=torch.randint(0, 3, (4, 2)),
        w_in=torch.randn(3, 8, 12),
        w_out=torch.randn(3, 6, 8),
        activation="swiglu",
    )
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "args, error, match",
    [
        (_bad(x=torch.randn(4, 8, 1)), ValueError, "x"),
        (_bad(x=torch.randn(4, 8).double()), TypeError, "x"),
        (_bad(weights=torch.rand(4, 3)), ValueError, "weights"),
        (_bad(weights=torch.ones(4, 2, dtype=torch.long)), TypeError, "weights"),
        (_bad(experts=torch.randint(0, 3, (4, 2)).float()), TypeError, "experts"),
        (_bad(experts=torch.randint(0, 3, (5, 2)), weights=torch.rand(5, 2)), ValueError, "experts"),
        (_bad(experts=torch.full((4, 2), 3)), ValueError, "experts"),
        (_bad(experts=torch.full((4, 2), -1)), ValueError, "experts"),
        (_bad(experts=torch.zeros(4, 4, dtype=torch.long), weights=torch.rand(4, 4)), ValueError, "number of experts"),
        (_bad(w_in=torch.randn(3, 7, 12)), ValueError, "w_in"),
        (_bad(w_in=torch.randn(3, 8, 11)), ValueError, "w_in"),
        (_bad(w_in=torch.randn(3, 8, 12).half()), TypeError, "w_in"),
        (_bad(w_out=torch.randn(3, 5, 8)), ValueError, "w_out"),
        (_bad(w_out=torch.randn(2, 6, 8)), ValueError, "w_out"),
        (_bad(activation="gelu"), ValueError, "w_out"),
        (_bad(activation="tanh"), ValueError, "activation"),
        (_bad(b_in=torch.randn(3, 6)), ValueError, "b_in"),
        (_bad(b_in=torch.randn(2, 12)), ValueError, "b_in"),
        (_bad(b_in=torch.randn(3, 12).half()), TypeError, "b_in"),
        (_bad(b_out=torch.randn(3, 8, 1)), ValueError, "b_out"),
        (_bad(b_out=torch.randn(3, 6)), ValueError, "b_out"),
        (_bad(b_out=[0.0] * 8), TypeError, "b_out"),
    ],
)
def test_bad_input_raises(args, error, match):
    for backend in BACKENDS:
        with pytest.raises(error, match=match):
            mk.moe_ffn(**args, backend=backend)
