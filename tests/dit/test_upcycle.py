"""Sparse upcycling: the upcycled DiT-MoE starts as the dense DiT it came from."""

import pytest
import torch

from dit.checkpoint import build_from_checkpoint, save_weights
from dit.models import create_model
from dit.upcycle import main, moe_config, upcycle

DENSE = dict(input_size=8, in_channels=1, num_classes=10)


def _dense():
    """A dense DiT-Ti/2 with every weight random (DiT's zero-initialised gates would hide the MLPs)."""
    torch.manual_seed(0)
    model = create_model("DiT-Ti/2", moe_backend="torch", **DENSE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def _inputs():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=generator)
    return x, torch.tensor([3, 500, 999]), torch.tensor([0, 4, 10])


def _outputs(model):
    with torch.no_grad():
        return model(*_inputs())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shared, router_init", [(0, "normal"), (2, "normal"), (0, "zero")])
def test_upcycled_model_equals_the_dense_one_at_initialisation(backend, shared, router_init):
    dense = _dense()
    config = moe_config(dense.config, "DiT-MoE-Ti/2-4E2A", shared_experts=shared, normalize=True)
    moe = upcycle(dense.state_dict(), config, router_init=router_init).eval()
    for layer in moe.moe_layers():
        layer.backend = backend
        assert (layer.activation, layer.b_in is not None, layer.router.normalize_weights) == ("gelu_tanh", True, True)
    routers = torch.stack([layer.router.weight for layer in moe.moe_layers()])
    if router_init == "zero":
        assert torch.count_nonzero(routers) == 0
    else:
        assert routers.std().item() == pytest.approx(0.02, rel=0.2)
    torch.testing.assert_close(_outputs(moe), _outputs(dense), atol=1e-5, rtol=1e-5)


def test_without_renormalisation_the_mlp_output_is_scaled():
    dense = _dense()
    config = moe_config(dense.config, "DiT-MoE-Ti/2-4E2A", shared_experts=0, normalize=False)
    moe = upcycle(dense.state_dict(), config).eval()
    assert not torch.allclose(_outputs(moe), _outputs(dense), atol=1e-3)


def test_the_upcycled_model_trains(tmp_path):
    """Gradients reach every expert's weights and biases and the zero-started shared experts."""
    dense = _dense()
    moe = upcycle(dense.state_dict(), moe_config(dense.config, "DiT-MoE-Ti/2-4E2A", 2, True)).train()
    moe(*_inputs()).square().mean().backward()
    for layer in moe.moe_layers():
        for p in (layer.w_in, layer.b_in, layer.w_out, layer.b_out, layer.router.weight, layer.shared.proj_out.weight):
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0


def test_cli_from_our_checkpoint_and_from_the_original_release_layout(tmp_path):
    dense = _dense()
    want = _outputs(dense)
    ours = tmp_path / "dense.safetensors"
    save_weights(dense.state_dict(), ours, dense.config)
    # The original DiT release: timm's blocks (mlp.fc1/fc2, fused attn.qkv), the fixed pos_embed
    # stored, a raw state dict in a .pt; test_convert checks this layout against its own forward.
    original = {key.replace(".ffn.", ".mlp."): value for key, value in dense.state_dict().items()}
    original["pos_embed"] = dense.pos_embed.clone()
    torch.save(original, tmp_path / "DiT-Ti-2.pt")
    for source, extra in ((ours, []), (tmp_path / "DiT-Ti-2.pt", ["--num-heads", "4"])):
        out = tmp_path / f"{source.stem}-moe.safetensors"
        main(["--dense", str(source), "--model", "DiT-MoE-Ti/2-8E2A", "--out", str(out), *extra])
        moe = build_from_checkpoint(out, moe_backend="torch").eval()
        assert (moe.config.num_experts, moe.config.top_k, moe.config.num_shared_experts) == (8, 2, 2)
        assert moe.config.name == "DiT-MoE-Ti/2-8E2A"
        torch.testing.assert_close(_outputs(moe), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(model="DiT-MoE-S/2-8E2A"), "12 blocks of width 384"),
        (dict(model="DiT-Ti/2"), "is dense"),
        (dict(model="DiT-MoE-Ti/2"), "unknown model"),
        (dict(dense="missing.safetensors"), "no such file"),
        (dict(out="weights.pt"), ".safetensors file"),
        (dict(dense="moe"), "already an MoE"),
    ],
)
def test_cli_errors(tmp_path, capsys, change, match):
    dense = _dense()
    save_weights(dense.state_dict(), tmp_path / "dense.safetensors", dense.config)
    moe = create_model("DiT-MoE-Ti/2-4E2A", **DENSE)
    save_weights(moe.state_dict(), tmp_path / "moe.safetensors", moe.config)
    args = dict(dense="dense.safetensors", model="DiT-MoE-Ti/2-4E2A", out="out.safetensors") | change
    if args["dense"] == "moe":
        args["dense"] = "moe.safetensors"
    argv = [f"--{key}={tmp_path / value if key != 'model' else value}" for key, value in args.items()]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert match in str(exit_info.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_the_routers_random_start_follows_the_seed():
    """Each seed draws its own routers (normal(0, 0.02), layer by layer from one generator): the
    same seed the same, another seed others."""
    dense = _dense()
    config = moe_config(dense.config, "DiT-MoE-Ti/2-4E2A", shared_experts=0, normalize=True)

    def routers(seed):
        return torch.stack(
            [layer.router.weight for layer in upcycle(dense.state_dict(), config, seed=seed).moe_layers()]
        )

    first = routers(1)
    generator = torch.Generator().manual_seed(1)
    torch.testing.assert_close(first[0], torch.randn(first[0].shape, generator=generator) * 0.02)
    assert torch.equal(first, routers(1)) and not torch.allclose(first, routers(2))
