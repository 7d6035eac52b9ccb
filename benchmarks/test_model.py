"""Model group: a training step (images/s) and one sampling step (with classifier-free guidance)
of DiT-MoE against a dense DiT with the same activated parameters: a GELU MLP of ratio 15 has
the 40 D^2 per block that a block of DiT-MoE (k=2, H=4D, shared 2D) activates."""

import pytest
import torch

from benchmarks.common import CUDA, DEVICE, measure
from dit.diffusion import create_diffusion
from dit.flops import count
from dit.models import create_model
from dit.sampling import guided

# name -> (DiT-MoE config, dense config, overrides, batch on CPU, batch on CUDA)
MODELS = {
    "S/2 32x32x4": ("DiT-MoE-S/2-8E2A", "DiT-S/2", dict(input_size=32, in_channels=4, num_classes=1000), 2, 64),
    "Ti/2 digits 8x8x1": (
        "DiT-MoE-Ti/2-8E2A",
        "DiT-Ti/2",
        dict(input_size=8, in_channels=1, num_classes=10),
        128,
        1024,
    ),
}


def _model(name, variant):
    moe_name, dense_name, overrides, batch_cpu, batch_cuda = MODELS[name]
    if variant == "dense":
        model = create_model(dense_name, mlp_ratio=15.0, **overrides)
    else:
        model = create_model(moe_name, moe_backend=variant, **overrides)
    return model.to(DEVICE), (batch_cuda if CUDA else batch_cpu), overrides


def _label(model, variant) -> str:
    kind = f" MLP ratio {model.config.mlp_ratio:g}" if variant == "dense" else f" ({variant})"
    return f"{model.config.name}{kind}, {count(model.config).active_params / 1e6:.0f}M active"


def _variants():
    return ["triton", "dense"] if CUDA else ["torch", "dense"]


@pytest.mark.parametrize("variant", _variants())
@pytest.mark.parametrize("name", list(MODELS))
def test_training_step(benchmark, name, variant):
    model, batch, overrides = _model(name, variant)
    diffusion = create_diffusion()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    x = torch.randn(batch, overrides["in_channels"], overrides["input_size"], overrides["input_size"], device=DEVICE)
    y = torch.randint(0, overrides["num_classes"], (batch,), device=DEVICE)
    autocast = torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA)

    def step():
        with autocast:
            loss = diffusion.training_losses(model, x, {"y": y})["loss"].mean()
        if model.aux_loss is not None:
            loss = loss + model.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # Forward plus backward: about three forwards per image.
    measure(
        benchmark,
        step,
        group="model",
        op="train step",
        case=f"{name}, batch {batch}",
        variant=_label(model, variant),
        flops=3 * batch * count(model.config).flops,
        images=batch,
        backend=None if variant == "dense" else variant,
        dtype=torch.bfloat16 if CUDA else torch.float32,
    )


@pytest.mark.parametrize("variant", _variants())
@pytest.mark.parametrize("name", list(MODELS))
def test_sampling_step(benchmark, name, variant):
    model, batch, overrides = _model(name, variant)
    model.eval()
    batch = min(batch, 8)
    x = torch.randn(batch, overrides["in_channels"], overrides["input_size"], overrides["input_size"], device=DEVICE)
    labels = torch.randint(0, overrides["num_classes"], (batch,), device=DEVICE)
    t = torch.full((batch,), 500, device=DEVICE)
    model_fn = guided(model, labels, cfg_scale=4.0)
    autocast = torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA)

    def step():
        with torch.no_grad(), autocast:
            model_fn(x, t)

    # Guidance runs the conditional and the unconditional pass: two forwards per image.
    measure(
        benchmark,
        step,
        group="model",
        op="sampling step (CFG)",
        case=f"{name}, batch {batch}",
        variant=_label(model, variant),
        flops=2 * batch * count(model.config).flops,
        images=batch,
        backend=None if variant == "dense" else variant,
        dtype=torch.bfloat16 if CUDA else torch.float32,
    )
