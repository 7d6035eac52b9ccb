import numpy as np
import pytest
import torch
from scipy import linalg
from sklearn.datasets import load_digits

from dit.evaluate import frechet_distance, inception_score, main, precision_recall


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 6))
    b = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 1
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_precision_recall_and_inception_score():
    real = torch.randn(200, 8)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    confident = torch.eye(10).repeat(20, 1)
    assert inception_score(confident, splits=2) == pytest.approx(10.0, rel=1e-6)
    assert inception_score(torch.full((50, 10), 0.1), splits=1) == pytest.approx(1.0)


def _digits_npz(path, noise=False):
    digits = load_digits()
    images = (digits.images / 16 * 255).round().astype(np.uint8)[..., None]
    if noise:
        images = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    np.savez(path, arr_0=images[:300], arr_1=digits.target[:300].astype(np.int64))


def test_digits_report(tmp_path, capsys):
    _digits_npz(tmp_path / "real.npz")
    _digits_npz(tmp_path / "noise.npz", noise=True)
    main([str(tmp_path / "real.npz"), "--digits", "--json", str(tmp_path / "real.json")])
    main([str(tmp_path / "noise.npz"), "--digits", "--json", str(tmp_path / "noise.json")])
    import json

    real, noise = json.loads((tmp_path / "real.json").read_text()), json.loads((tmp_path / "noise.json").read_text())
    assert real["accuracy"] > 0.95 and len(real["accuracy_per_class"]) == 10
    assert noise["accuracy"] < 0.5 and noise["frechet_distance"] > 10 * real["frechet_distance"]


class FakeInception(torch.nn.Module):
    """Stands in for the TorchScript Inception: same call signature, cheap features."""

    def forward(self, img: torch.Tensor, return_features: bool = False, no_output_bias: bool = False) -> torch.Tensor:
        x = img.float() / 255.0
        features = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        if return_features:
            return features
        return torch.softmax(features @ torch.ones(9, 5), dim=1)


def test_inception_metrics_with_a_local_torchscript_file(tmp_path, capsys):
    weights = tmp_path / "inception.pt"
    torch.jit.script(FakeInception()).save(str(weights))
    _digits_npz(tmp_path / "a.npz")
    main(
        [
            str(tmp_path / "a.npz"),
            str(tmp_path / "a.npz"),
            "--inception-weights",
            str(weights),
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    import json

    results = json.loads((tmp_path / "r.json").read_text())
    assert results["fid"] == pytest.approx(0.0, abs=1e-5)
    assert results["precision"] == results["recall"] == 1.0 and results["inception_score"] >= 1.0


def test_errors(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main([str(tmp_path / "missing.npz"), "--digits"])
    _digits_npz(tmp_path / "a.npz")
    with pytest.raises(SystemExit, match="inception-weights"):
        main([str(tmp_path / "a.npz"), str(tmp_path / "a.npz")])
    with pytest.raises(SystemExit, match="does not exist"):
        main([str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), "--inception-weights", str(tmp_path / "none.pt")])
