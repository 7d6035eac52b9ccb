"""Expert-choice gating and the expert-choice ``MoE``, on both backends, against the reference."""

import pytest
import torch

import moe_kernels as mk
from moe_kernels import reference, tuning
from moe_kernels.activations import projection_width
from moe_kernels.expert_choice_gating import MAX_GROUP, check_groups
from tests.moe_kernels.helpers import BACKENDS, DEVICE, assert_close_to_reference, grads

# (T, E, C, group_size): one group, several, C = 1, C = S (every token), S not a power of two.
CASES = [(24, 4, 5, None), (32, 8, 3, 8), (12, 3, 1, 4), (20, 5, 10, 10), (18, 6, 9, 9)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,E,C,group_size", CASES)
def test_gating_matches_reference(backend, dtype, T, E, C, group_size):
    logits = torch.randn(T, E, device=DEVICE).to(dtype).requires_grad_()
    weights, tokens, probs = mk.expert_choice_gating(logits, C, group_size, backend=backend)
    want_weights, want_tokens, want_probs = reference.expert_choice_gating(logits.double(), C, group_size)
    G = T // (group_size or T)
    assert weights.shape == tokens.shape == (G, E, C) and weights.dtype == torch.float32
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(weights.double(), want_weights.double(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probs.double(), want_probs.double(), atol=1e-6, rtol=1e-5)
    # Each expert takes exactly C tokens of each group, all of that group, none twice.
    size = group_size or T
    assert ((tokens // size) == torch.arange(G, device=DEVICE).view(-1, 1, 1)).all()
    assert all(len(set(row.tolist())) == C for row in tokens.view(-1, C))
    grad_w, grad_p = torch.randn_like(weights), torch.randn_like(probs)
    got = torch.autograd.grad((weights * grad_w).sum() + (probs * grad_p).sum(), logits)[0]
    want = torch.autograd.grad((want_weights * grad_w.double()).sum() + (want_probs * grad_p.double()).sum(), logits)[0]
    assert got.dtype == dtype
    assert_close_to_reference(got, want, dtype, "dlogits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_token_and_nan_ranks_first(backend):
    logits = torch.zeros(8, 2, device=DEVICE)  # every score 0.5: the first C tokens win
    logits[5] = torch.nan
    weights, tokens, _ = mk.expert_choice_gating(logits, 3, backend=backend)
    assert tokens[0].tolist() == [[5, 0, 1], [5, 0, 1]]
    assert weights[0, :, 0].isnan().all() and (weights[0, :, 1:] == 0.5).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend):
    weights, tokens, probs = mk.expert_choice_gating(torch.randn(0, 4, device=DEVICE), 2, backend=backend)
    assert weights.shape == tokens.shape == (0, 4, 2) and probs.shape == (0, 4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(capacity=0), ValueError, "capacity"),
        (dict(capacity=2.5), TypeError, "capacity"),
        (dict(capacity=9), ValueError, "cannot exceed the tokens of a group"),
        (dict(capacity=2, group_size=3), ValueError, "must divide"),
        (dict(capacity=2, group_size=0), ValueError, "group_size"),
        (dict(logits=torch.randn(8)), ValueError, "logits"),
        (dict(logits=torch.ones(8, 4, dtype=torch.long)), TypeError, "logits"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(logits=torch.randn(8, 4), capacity=2) | kwargs
    for backend in BACKENDS:
        with pytest.raises(error, match=match):
            mk.expert_choice_gating(**args, backend=backend)


def _layer(backend, **kwargs):
    torch.manual_seed(0)
    options = dict(num_shared_experts=0, router="expert-choice", backend=backend) | kwargs
    return mk.MoE(16, 12, options.pop("num_experts", 4), options.pop("top_k", 2), **options).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_expert_taking_every_token_is_the_dense_mixture(backend):
    """C = S (top_k = E): each token gets sum_e p[t, e] * FFN_e(x_t)."""
    layer = _layer(backend, top_k=4, group_size=6, activation="gelu_tanh", expert_biases=True)
    x = torch.randn(2, 6, 16, device=DEVICE)
    y = layer(x)
    tokens = x.reshape(-1, 16)
    probs = torch.softmax(layer.router(tokens), dim=-1)
    dense = sum(
        probs[:, e : e + 1]
        * (
            torch.nn.functional.gelu(tokens @ layer.w_in[e] + layer.b_in[e], approximate="tanh") @ layer.w_out[e]
            + layer.b_out[e]
        )
        for e in range(4)
    )
    torch.testing.assert_close(y.reshape(-1, 16), dense, atol=1e-5, rtol=1e-5)
    assert layer.expert_counts.tolist() == [12] * 4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs", [dict(group_size=8), dict(group_size=None, num_shared_experts=1), dict(group_size=4, top_k=1)]
)
def test_layer_forward_backward_match_reference(backend, kwargs):
    layer = _layer(backend, **kwargs)
    x = torch.randn(3, 8, 16, device=DEVICE, requires_grad=True)
    y = layer(x)
    tokens = x.reshape(-1, 16)
    size = layer.router.group_size or tokens.shape[0]
    capacity = layer.router.capacity(size)
    weights, chosen, _ = reference.expert_choice_gating(layer.router(tokens), capacity, size)
    want = reference.expert_choice_ffn(tokens, weights, chosen, layer.w_in, layer.w_out, layer.activation)
    if layer.shared is not None:
        want = want + layer.shared(tokens)
    torch.testing.assert_close(y.reshape(-1, 16), want, atol=1e-5, rtol=1e-5)
    assert layer.expert_counts.tolist() == [tokens.shape[0] // size * capacity] * 4
    assert layer.aux_loss is not None and layer.aux_loss.item() == 0.0
    params = [x, *layer.parameters()]
    grad_y = torch.randn_like(y)
    got = torch.autograd.grad((y * grad_y).sum(), params)
    expected = torch.autograd.grad((want * grad_y.reshape(-1, 16)).sum(), params)
    for g, w in zip(got, expected):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_image_groups_make_each_image_independent_of_its_batch(backend):
    layer = _layer(backend, group_size=8).eval()
    x = torch.randn(4, 8, 16, device=DEVICE)
    with torch.no_grad():
        together = layer(x)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-6)


def test_capacity_factor_is_the_compute_dial():
    layer = _layer("torch", num_experts=8, top_k=2, group_size=16)
    assert layer.router.capacity(16) == 4  # 16 tokens x 2 experts each / 8 experts
    layer.router.capacity_factor = 1.0
    assert layer.router.capacity(16) == 2
    layer.router.capacity_factor = 0.75
    assert layer.router.capacity(16) == 2  # 1.5 rounds half up
    with pytest.raises(ValueError, match="rounds to 0 tokens per expert"):
        layer.router.capacity_factor = 0.1  # refused when set, not at the next forward
    with pytest.raises(ValueError, match="cannot exceed num_experts"):
        layer.router.capacity_factor = 9.0
    assert layer.router.capacity_factor == 0.75
    pooled = _layer("torch", num_experts=8, top_k=2, group_size=None)  # the group is a forward's tokens
    pooled.router.capacity_factor = 0.1
    with pytest.raises(ValueError, match="rounds to 0 tokens per expert"):
        pooled(torch.randn(1, 16, 16))


def test_bad_layer_options():
    with pytest.raises(ValueError, match="router must be one of"):
        mk.MoE(8, 8, 4, 2, router="random")
    with pytest.raises(TypeError, match="expert-choice router takes no option score"):
        mk.MoE(8, 8, 4, 2, router="expert-choice", score="sigmoid")
    layer = mk.MoE(8, 8, 4, 2, router="expert-choice", group_size=3, backend="torch")
    with pytest.raises(ValueError, match="must divide"):
        layer(torch.randn(2, 4, 8))


def test_the_ffn_combine_is_deterministic_and_handles_unchosen_tokens():
    """Tokens no expert chose get zero; a token chosen by several gets the sum of their outputs."""
    x = torch.randn(6, 8)
    w_in, w_out = torch.randn(2, 8, 4), torch.randn(2, 4, 8)
    tokens = torch.tensor([[[0, 1], [1, 2]]])  # expert 0 takes 0, 1; expert 1 takes 1, 2
    weights = torch.rand(1, 2, 2)
    y = mk.expert_choice_ffn(x, weights, tokens, w_in, w_out, activation="relu", backend="torch")
    want = reference.expert_choice_ffn(x, weights, tokens, w_in, w_out, "relu")
    torch.testing.assert_close(y, want)
    assert (y[3:] == 0).all()


def _chosen(T, E, C, group_size, dtype=torch.float32):
    """A gating's output on random logits: tokens chosen by 0 to E experts."""
    weights, tokens, _ = reference.expert_choice_gating(torch.randn(T, E, device=DEVICE), C, group_size)
    return weights.to(dtype).requires_grad_(), tokens


# The Triton layer with a tuning switch: "triton prescaled", PRESCALED_BACKWARD (dL/dy weighted per
# slot once); "triton scattered", GATHER_COMBINE off (rows scattered to slot order by the GEMMs).
SWITCHED = {"triton prescaled": ("PRESCALED_BACKWARD", True), "triton scattered": ("GATHER_COMBINE", False)}


@pytest.mark.parametrize("backend", [*BACKENDS, *(SWITCHED if "triton" in BACKENDS else [])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "T,E,C,group_size,activation,biases",
    [(24, 4, 5, None, "swiglu", False), (32, 8, 3, 8, "gelu_tanh", True), (12, 3, 4, 4, "relu", True)],
)
def test_ffn_forward_backward_match_reference(monkeypatch, backend, dtype, T, E, C, group_size, activation, biases):
    if backend in SWITCHED:
        monkeypatch.setattr(tuning, *SWITCHED[backend])
        backend = "triton"
    D, H = 24, 20  # neither a multiple of the blocks
    x = torch.randn(T, D, device=DEVICE, dtype=dtype, requires_grad=True)
    weights, tokens = _chosen(T, E, C, group_size)
    width = projection_width(activation, H)
    w_in = (torch.randn(E, D, width, device=DEVICE) / D**0.5).to(dtype).requires_grad_()
    w_out = (torch.randn(E, H, D, device=DEVICE) / H**0.5).to(dtype).requires_grad_()
    b_in = (0.1 * torch.randn(E, width, device=DEVICE)).to(dtype).requires_grad_() if biases else None
    b_out = (0.1 * torch.randn(E, D, device=DEVICE)).to(dtype).requires_grad_() if biases else None
    y = mk.expert_choice_ffn(x, weights, tokens, w_in, w_out, activation, backend, b_in=b_in, b_out=b_out)
    params = [t for t in (x, weights, w_in, w_out, b_in, b_out) if t is not None]
    doubles = [t.detach().double().requires_grad_() for t in params]
    want = reference.expert_choice_ffn(
        doubles[0], doubles[1], tokens, doubles[2], doubles[3], activation, *(doubles[4:] if biases else ())
    )
    assert y.dtype == dtype
    assert_close_to_reference(y, want, dtype, "y")
    grad_y = torch.randn_like(want)
    names = ["x", "weights", "w_in", "w_out", "b_in", "b_out"]
    for name, got, expected in zip(names, grads(y, params, grad_y), grads(want, doubles, grad_y)):
        assert got.dtype == (torch.float32 if name == "weights" else dtype)
        assert_close_to_reference(got, expected, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ffn_is_deterministic_and_edge_cases(backend):
    """Bitwise the same on a rerun; no tokens; one expert; every expert taking every token (k = E)."""
    for T, E, C in ((0, 3, 2), (9, 1, 4), (6, 3, 6)):
        x = torch.randn(T, 8, device=DEVICE, requires_grad=True)
        weights, tokens = _chosen(T, E, C, None) if T else (torch.rand(0, E, C), torch.zeros(0, E, C, dtype=torch.long))
        w_in, w_out = torch.randn(E, 8, 12, device=DEVICE), torch.randn(E, 6, 8, device=DEVICE)
        runs = []
        for _ in range(2):
            y = mk.expert_choice_ffn(x, weights, tokens, w_in, w_out, backend=backend)
            runs.append((y, *torch.autograd.grad(y.square().sum(), [x], allow_unused=True)))
        assert all(torch.equal(a, b) for a, b in zip(*runs))
        torch.testing.assert_close(
            runs[0][0], reference.expert_choice_ffn(x, weights, tokens, w_in, w_out), atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(tokens=torch.zeros(1, 2, 3, dtype=torch.int32)), TypeError, "tokens"),
        (dict(tokens=torch.zeros(1, 2, 2, dtype=torch.long)), ValueError, "shape of weights"),
        (dict(weights=torch.rand(1, 3, 3), tokens=torch.zeros(1, 3, 3, dtype=torch.long)), ValueError, "experts"),
        (dict(tokens=torch.tensor([[[0, 1, 6], [0, 1, 2]]])), ValueError, r"indices in \[0, 6\)"),
        (dict(tokens=torch.tensor([[[0, 1, 1], [0, 1, 2]]])), ValueError, "distinct"),
        (dict(x=torch.randn(6, 5)), ValueError, "width of x"),
    ],
)
def test_ffn_bad_input(change, error, match):
    args = dict(
        x=torch.randn(6, 8),
        weights=torch.rand(1, 2, 3),
        tokens=torch.tensor([[[0, 1, 2], [3, 4, 5]]]),
        w_in=torch.randn(2, 8, 8),
        w_out=torch.randn(2, 4, 8),
    )
    args.update(change)
    with pytest.raises(error, match=match):
        mk.expert_choice_ffn(**args, backend="torch")


def test_the_largest_group_the_triton_path_sorts_is_accepted():
    """Groups of up to ``MAX_GROUP`` tokens fit one program's registers: exactly that many is
    accepted, one more is refused with the limit named (the PyTorch path takes any)."""
    assert check_groups(2 * MAX_GROUP, 1, MAX_GROUP, "triton") == MAX_GROUP
    with pytest.raises(ValueError, match=f"groups of up to {MAX_GROUP} tokens"):
        check_groups(MAX_GROUP + 1, 1, None, "triton")
    assert check_groups(MAX_GROUP + 1, 1, None, "torch") == MAX_GROUP + 1
