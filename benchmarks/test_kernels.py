"""Kernel group, one benchmark per public op under its name (``topk_gating``, ``balance_loss``,
``grouped_mm``, ``moe_ffn``; the layer's are in ``test_layer.py``) and the dispatch's sort by expert: the
triton and torch backends, the GEMMs forward and forward+backward against a dense product of the
same FLOPs."""

import pytest
import torch

import moe_kernels as mk
from benchmarks.common import DEVICE, dtype_for, measure, shape_for
from moe_kernels.backend import IMPLEMENTATIONS
from moe_kernels.dispatch import sort_by_expert
from moe_kernels.grouped_mm import grouped_mm_apply

BACKENDS = list(IMPLEMENTATIONS)


def _measure(benchmark, fn, *, op: str, case: str, variant: str, **info) -> None:
    """``measure`` in the kernels group; ``variant`` is also the backend it runs, unless a
    baseline's (``dense-mm``)."""
    backend = variant if variant in IMPLEMENTATIONS else None
    measure(benchmark, fn, group="kernels", op=op, case=case, variant=variant, backend=backend, **info)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_gating(benchmark, case, backend, paper_shapes):
    label, dims = shape_for(case, backend)
    T, E, k = dims["T"], dims["E"], dims["k"]
    logits = torch.randn(T, E, device=DEVICE, dtype=dtype_for(paper_shapes))
    _measure(
        benchmark,
        lambda: mk.topk_gating(logits, k, backend=backend),
        op="topk_gating",
        case=label,
        variant=backend,
        dtype=logits.dtype,
        tokens=T,
        bytes_moved=T * E * (logits.element_size() + 4) + T * k * 12,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_balance_loss(benchmark, case, backend):
    label, dims = shape_for(case, backend)
    T, E, k = dims["T"], dims["E"], dims["k"]
    probs = torch.softmax(torch.randn(T, E, device=DEVICE), dim=-1).requires_grad_()
    experts = torch.rand(T, E, device=DEVICE).argsort(dim=1)[:, :k]
    _measure(
        benchmark,
        lambda: mk.balance_loss(probs, experts, E, backend=backend).backward(),
        op="balance_loss fwd+bwd",
        case=label,
        variant=backend,
        tokens=T,
        bytes_moved=T * E * 4 * 2 + T * k * 8,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_sort_by_expert(benchmark, case, backend):
    label, dims = shape_for(case, backend)
    T, E, k = dims["T"], dims["E"], dims["k"]
    experts = torch.rand(T, E, device=DEVICE).argsort(dim=1)[:, :k]
    _measure(
        benchmark,
        lambda: sort_by_expert(experts, E, backend),
        op="sort_by_expert",
        case=label,
        variant=backend,
        tokens=T,
        bytes_moved=T * k * (8 + 4 * 4),
    )


def _grouped_inputs(dims, dtype, grad):
    T, D, H, E, k = (dims[key] for key in ("T", "D", "H", "E", "k"))
    M = T * k
    sizes = torch.distributions.Multinomial(M, torch.ones(E)).sample().long()
    offsets = sizes.cumsum(0).to(torch.int32).to(DEVICE)
    x = torch.randn(M, D, device=DEVICE, dtype=dtype, requires_grad=grad)
    w = (torch.randn(E, D, H, device=DEVICE) / D**0.5).to(dtype).requires_grad_(grad)
    return x, w, offsets


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", ["triton", "torch", "dense-mm"])
def test_grouped_mm(benchmark, case, variant, backward, paper_shapes):
    label, dims = shape_for(case, variant)
    dtype = dtype_for(paper_shapes)
    x, w, offsets = _grouped_inputs(dims, dtype, backward)
    grad = torch.randn(x.shape[0], w.shape[2], device=DEVICE, dtype=dtype)
    if variant == "dense-mm":
        w0 = w[0].detach().requires_grad_(backward)

        def forward():
            return x @ w0
    else:
        # As the MoE layer calls it: the public op's check of offsets would add a host sync.
        def forward():
            return grouped_mm_apply(x, w, offsets, variant)

    fn = (lambda: forward().backward(grad)) if backward else forward
    M, K, N = x.shape[0], w.shape[1], w.shape[2]
    flops = 2 * M * K * N * (3 if backward else 1)
    _measure(
        benchmark,
        fn,
        op="grouped_mm " + ("fwd+bwd" if backward else "fwd"),
        case=label,
        variant=variant,
        flops=flops,
        dtype=dtype,
        tokens=dims["T"],
        bytes_moved=(M * K + w.numel() + M * N) * x.element_size(),
    )


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_ffn(benchmark, case, backend, backward, paper_shapes):
    dtype = dtype_for(paper_shapes)
    label, dims = shape_for(case, backend)
    T, D, H, E, k = (dims[key] for key in ("T", "D", "H", "E", "k"))
    x = torch.randn(T, D, device=DEVICE, dtype=dtype, requires_grad=backward)
    weights = torch.rand(T, k, device=DEVICE, requires_grad=backward)
    experts = torch.rand(T, E, device=DEVICE).argsort(dim=1)[:, :k]
    w_in = (torch.randn(E, D, 2 * H, device=DEVICE) / D**0.5).to(dtype).requires_grad_(backward)
    w_out = (torch.randn(E, H, D, device=DEVICE) / H**0.5).to(dtype).requires_grad_(backward)
    grad = torch.randn(T, D, device=DEVICE, dtype=dtype)

    def forward():
        return mk.moe_ffn(x, weights, experts, w_in, w_out, backend=backend)

    _measure(
        benchmark,
        (lambda: forward().backward(grad)) if backward else forward,
        op="moe_ffn " + ("fwd+bwd" if backward else "fwd"),
        case=label,
        variant=backend,
        flops=2 * T * k * 3 * D * H * (3 if backward else 1),
        dtype=dtype,
        tokens=T,
    )
