"""``python -m dit.export``: what it checks before the (slow) compile, and the metadata the C++
sampler reads. The package itself is built and run by the ctest (``tests/cpp``)."""

import numpy as np
import pytest
import torch

from dit.diffusion import create_diffusion
from dit.export import Denoiser, main, metadata
from dit.models import create_model
from dit.sampling import guided


def _model(**overrides):
    torch.manual_seed(0)
    return create_model("DiT-MoE-Ti/2-4E2A", input_size=8, in_channels=1, num_classes=10, depth=1, **overrides).eval()


def test_metadata_holds_the_schedule_and_shapes():
    values = metadata(_model(), batch=8, cfg=True)
    assert values["format"] == "dit-moe-denoiser/2" and values["batch"] == "8" and values["cfg"] == "1"
    assert values["device"] == "cpu" and values["input_size"] == "8" and values["num_classes"] == "10"
    alphas = np.array([float(v) for v in values["alphas_cumprod"].split(",")])
    expected = create_diffusion()._tables["alphas_cumprod"].numpy()
    np.testing.assert_array_equal(alphas, expected)
    assert "alphas_cumprod" not in metadata(_model(objective="rectified-flow", learn_sigma=False), 1, False)


def test_the_denoiser_is_the_guided_model():
    model = _model()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10.0, 500.0, 999.0]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(Denoiser(model, cfg=True)(x, t, y, torch.tensor([4.0])), guided(model, y, 4.0)(x, t))
        torch.testing.assert_close(Denoiser(model, cfg=False)(x, t, y, torch.tensor([1.0])), model(x, t, y))


def test_bad_arguments_stop_before_the_compile(tmp_path):
    with pytest.raises(SystemExit, match="must end in .pt2"):
        main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "model.zip")])
    with pytest.raises(SystemExit, match="does not exist|no such|not a directory|checkpoint"):
        main(["--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "model.pt2")])
    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "model.pt2"), "--batch", "0"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    "device, message",
    [("foo", "is not a device"), ("cuda:99", "CUDA device|no such GPU"), ("mps", "packages run on cpu or cuda")],
)
def test_a_missing_or_unknown_device_is_one_line(tmp_path, device, message):
    with pytest.raises(SystemExit, match=f"error: --device .*({message})"):
        main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "model.pt2"), "--device", device])


def test_a_diffmoe_model_is_refused(tmp_path):
    from dit.checkpoint import save_weights

    model = _model(router="diffmoe")
    save_weights(model.state_dict(), tmp_path / "m.safetensors", model.config)
    with pytest.raises(SystemExit, match="cannot package a model routed by diffmoe"):
        main(["--ckpt", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "model.pt2"), "--device", "cpu"])
