"""Layer group: one MoE FFN (router, experts, combine, shared expert), forward and
forward+backward, against the official loop dispatch, dense MLPs of the same activated FLOPs
and of the same total parameters, and MegaBlocks / ScatterMoE where they import."""

import pytest
import torch

from benchmarks.baselines import DenseSwiGLU, LoopMoE, megablocks_dmoe, scattermoe_glu
from benchmarks.common import CUDA, DEVICE, dtype_for, layer_flops, measure, shape_for
from moe_kernels import MoE

VARIANTS = [
    "triton",
    "torch",
    "expert-choice triton",
    "expert-choice torch",
    "loop",
    "dense-activated",
    "dense-total",
    "megablocks",
    "scattermoe",
]
# Expert choice groups one 256 x 256 image's tokens (32 x 32 latents, patch 2), as DiT-MoE would.
IMAGE_TOKENS = 256


def _build(variant, D, H, E, k, dtype, T):
    if variant in ("triton", "torch"):
        return MoE(D, H, E, k, backend=variant).to(DEVICE, dtype)
    if variant.startswith("expert-choice"):
        group = IMAGE_TOKENS if T % IMAGE_TOKENS == 0 else None
        return MoE(D, H, E, k, backend=variant.split()[1], router="expert-choice", group_size=group).to(DEVICE, dtype)
    if variant == "loop":
        return LoopMoE(MoE(D, H, E, k, backend="torch").to(DEVICE, dtype))
    if variant == "dense-activated":
        return DenseSwiGLU(D, k * H + 2 * D).to(DEVICE, dtype)
    if variant == "dense-total":
        return DenseSwiGLU(D, E * H + 2 * D).to(DEVICE, dtype)
    if not CUDA:
        pytest.skip(f"{variant} needs a CUDA build")
    try:
        return (megablocks_dmoe if variant == "megablocks" else scattermoe_glu)(D, H, E, k, dtype)
    except ImportError as error:
        pytest.skip(f"{variant} is not importable here: {error}")


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_moe_layer(benchmark, layer_case, variant, backward, paper_shapes):
    label, dims = shape_for(layer_case, variant.split()[-1])
    T, D, H, E, k = (dims[key] for key in ("T", "D", "H", "E", "k"))
    dtype = dtype_for(paper_shapes)
    layer = _build(variant, D, H, E, k, dtype, T)
    x = torch.randn(T, D, device=DEVICE, dtype=dtype, requires_grad=backward)
    grad = torch.randn_like(x)
    if backward:

        def fn():
            layer(x).backward(grad)
    else:

        def fn():
            with torch.no_grad():
                layer(x)

    shared = 2 * D
    if variant == "dense-activated":
        flops = layer_flops(T, D, k * H + shared, 0, 1, backward=backward)
    elif variant == "dense-total":
        flops = layer_flops(T, D, E * H + shared, 0, 1, backward=backward)
    else:
        flops = layer_flops(T, D, H, E, k, shared_hidden=shared, backward=backward)
    measure(
        benchmark,
        fn,
        group="layer",
        op="fwd+bwd" if backward else "fwd",
        case=label,
        variant=variant,
        flops=flops,
        dtype=dtype,
        tokens=T,
        backend=variant.split()[-1] if variant.split()[-1] in ("triton", "torch") else None,
        reference=not variant.startswith("expert-choice"),
    )
