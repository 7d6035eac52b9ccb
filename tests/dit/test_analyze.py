import numpy as np
import pytest
import torch

from dit.analyze import RoutingRecorder, entropy_bits, main
from dit.checkpoint import save_weights
from dit.models import create_model
from dit.sampling import generate


def _tiny(name="DiT-MoE-Ti/2-4E2A", **options):
    model = create_model(
        name, input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=32, num_heads=2, **options
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_recorder_counts_every_choice_of_the_conditional_images(cfg_scale):
    model = _tiny()
    steps, labels = 4, torch.tensor([1, 1, 7])
    recorder = RoutingRecorder(model, steps).attach()
    recorder.start(labels)
    generate(model, labels, cfg_scale, steps)
    recorder.detach()
    P, k = model.grid_size**2, model.config.top_k
    per_image_layer = P * k * steps
    assert recorder.by_class.shape == (2, 10, 4)
    assert (
        recorder.by_class[:, 1].sum() == 2 * 2 * per_image_layer
        and recorder.by_class[:, 7].sum() == 2 * per_image_layer
    )
    assert recorder.by_class[:, [0, 2, 3]].sum() == 0
    assert (recorder.by_position.sum(dim=(1, 2)) == 3 * per_image_layer).all()
    assert (recorder.by_step.sum(dim=(0, 2)) == 2 * 3 * P * k).all()
    assert all(moe.on_route is None for moe in model.moe_layers())


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_expert_choice_counts_and_experts_per_token(cfg_scale):
    model = _tiny(router="expert-choice")
    steps, labels = 3, torch.tensor([2, 5])
    recorder = RoutingRecorder(model, steps).attach()
    recorder.start(labels)
    generate(model, labels, cfg_scale, steps)
    recorder.detach()
    P, E, k = model.grid_size**2, 4, model.config.top_k
    # Each expert takes C = P * k / E patches of each image: P * k (patch, expert) pairs per image.
    assert (recorder.by_position.sum(dim=(1, 2)) == 2 * P * k * steps).all()
    assert (recorder.by_class[:, [2, 5]].sum(dim=2) == P * k * steps).all()
    assert (recorder.by_step.sum(dim=2) == 2 * P * k).all()
    assert (recorder.by_position.sum(dim=1) == 2 * steps * P * k // E).all()  # balanced by construction
    assert recorder.per_token_by_position.shape == (2, P, E + 1)
    assert (recorder.per_token_by_position.sum(dim=2) == 2 * steps).all()
    assert (recorder.per_token_by_step.sum(dim=2) == 2 * P).all()
    experts = torch.arange(E + 1)
    assert ((recorder.per_token_by_step * experts).sum(dim=2) == 2 * P * k).all()  # k experts per token on average
    assert all(moe.on_route is None for moe in model.moe_layers())


def test_cli_draws_experts_per_token_for_expert_choice(tmp_path, capsys):
    model = _tiny(router="expert-choice")
    save_weights(model.state_dict(), tmp_path / "m.safetensors", model.config)
    out = tmp_path / "routing"
    main(["--ckpt", str(tmp_path / "m.safetensors"), "--samples-per-class", "1", "--classes", "4", "--steps", "2"]
         + ["--out", str(out)])  # fmt: skip
    for what in ("position", "step"):
        assert (out / f"experts_per_token_by_{what}.png").is_file()
    counts = np.load(out / "routing_counts.npz")
    assert counts["per_token_by_step"].shape == (2, 2, 5)
    assert "mean experts per token" in capsys.readouterr().out


def test_entropy():
    assert entropy_bits(torch.tensor([5, 5, 5, 5])).item() == pytest.approx(2.0)
    assert entropy_bits(torch.tensor([3, 0, 0, 0])).item() == pytest.approx(0.0)


def test_cli_writes_maps_counts_and_summary(tmp_path, capsys):
    model = _tiny()
    save_weights(model.state_dict(), tmp_path / "m.safetensors", model.config)
    out = tmp_path / "routing"
    main(
        [
            "--ckpt",
            str(tmp_path / "m.safetensors"),
            "--samples-per-class",
            "1",
            "--classes",
            "0",
            "3",
            "--steps",
            "3",
            "--out",
            str(out),
        ]
    )
    for name in ("experts_by_class.png", "experts_by_position.png", "experts_by_step.png", "summary.txt"):
        assert (out / name).is_file()
    counts = np.load(out / "routing_counts.npz")
    assert counts["by_step"].shape == (2, 3, 4) and counts["classes"].tolist() == [0, 3]
    assert "entropy" in capsys.readouterr().out


def test_dense_models_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no MoE"):
        RoutingRecorder(_tiny("DiT-Ti/2"), 3)
