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


def _adm_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """ADM's frechet_distance, as its evaluator computes it: scipy's sqrtm of the product, a small
    offset where it is not finite, and the real part."""
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real)


@pytest.mark.parametrize("features", [16, 256])
def test_fid_from_statistics_equals_adms_frechet_distance(features):
    from dit.evaluate import frechet_from_statistics

    rng = np.random.default_rng(features)
    a = rng.normal(size=(4 * features, features)) @ rng.normal(size=(features, features)) / features**0.5
    b = rng.normal(size=(3 * features, features)) @ rng.normal(size=(features, features)) / features**0.5 + 0.3
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    ours = frechet_from_statistics(*stats[0], *stats[1])
    assert ours == pytest.approx(_adm_frechet(*stats[0], *stats[1]), abs=1e-6)
    assert frechet_from_statistics(*stats[0], *stats[0]) == pytest.approx(0.0, abs=1e-6)


class SpatialInception(torch.nn.Module):
    """A stand-in with the TorchScript port's layout: ``layers.conv`` ... ``layers.mixed_6.conv``
    (each a cheap map), so the spatial path runs as it would on the real network."""

    def __init__(self):
        super().__init__()
        from dit.evaluate import SPATIAL_LAYERS

        self.layers = torch.nn.Module()
        for name in SPATIAL_LAYERS:
            setattr(self.layers, name, torch.nn.Identity())
        # 17 x 17 on the real network; 5 x 5 here keeps sFID's matrix square roots small (175-d, not 2023-d).
        self.layers.pool1 = torch.nn.AdaptiveAvgPool2d(5)
        self.layers.mixed_6 = torch.nn.Module()
        self.layers.mixed_6.conv = torch.nn.Conv2d(3, 8, 1)
        self.pool = FakeInception()

    def forward(self, img: torch.Tensor, return_features: bool = False, no_output_bias: bool = False) -> torch.Tensor:
        return self.pool(img, return_features, no_output_bias)


def test_adm_reference_batch_statistics_are_used_as_published(tmp_path):
    """A reference batch with precomputed mu/sigma (pool) and mu_s/sigma_s (spatial): FID and
    sFID come from them, as ADM's evaluator takes them; without them, from the images."""
    from dit.evaluate import Inception, inception_metrics, load_reference_statistics, statistics

    weights = tmp_path / "inception.pt"
    torch.jit.script(SpatialInception()).save(str(weights))
    _digits_npz(tmp_path / "samples.npz")
    samples = np.load(tmp_path / "samples.npz")["arr_0"][:40]
    reference = np.random.default_rng(1).integers(0, 256, (48, 8, 8, 1), dtype=np.uint8)
    net = Inception(weights, torch.device("cpu"))
    pool = statistics(net.run(reference, 50, return_features=True).double().numpy())
    spatial = statistics(net.spatial(reference, 50).double().numpy())
    assert net.spatial(reference[:2], 50).shape == (2, 7 * 5 * 5)
    np.savez(tmp_path / "ref.npz", arr_0=reference, mu=pool[0], sigma=pool[1], mu_s=spatial[0], sigma_s=spatial[1])
    stats = load_reference_statistics(tmp_path / "ref.npz")
    from_stats = inception_metrics(samples, reference, weights, 50, reference_statistics=stats)
    from_images = inception_metrics(samples, reference, weights, 50)
    assert from_stats["fid"] == pytest.approx(from_images["fid"], rel=1e-9)
    assert from_stats["sfid"] == pytest.approx(from_images["sfid"], rel=1e-9) and from_stats["sfid"] > 0
    assert from_stats["reference_statistics"] == ["pool", "spatial"]
    # Statistics that differ from the images' are what FID follows: they are the reference.
    np.savez(tmp_path / "shifted.npz", arr_0=reference, mu=pool[0] + 1.0, sigma=pool[1])
    shifted = inception_metrics(
        samples, reference, weights, 50, reference_statistics=load_reference_statistics(tmp_path / "shifted.npz")
    )
    assert shifted["fid"] != pytest.approx(from_images["fid"])
    # A network without spatial layers: sFID is None, with a note saying why.
    plain = tmp_path / "plain.pt"
    torch.jit.script(FakeInception()).save(str(plain))
    result = inception_metrics(samples, reference, plain, 50, reference_statistics=stats)
    assert result["sfid"] is None and "mixed_6/conv" in result["notes"][0]


def test_bad_reference_statistics(tmp_path):
    from dit.evaluate import load_reference_statistics

    np.savez(tmp_path / "half.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8), mu=np.zeros(4))
    with pytest.raises(ValueError, match="only one of mu and sigma"):
        load_reference_statistics(tmp_path / "half.npz")
    np.savez(tmp_path / "shape.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8), mu=np.zeros(4), sigma=np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"sigma \[F, F\]"):
        load_reference_statistics(tmp_path / "shape.npz")


def test_the_tensorflow_resize_samples_where_tensorflow_1_does():
    """TF1's bilinear resize (no half-pixel centres) reads output pixel ``j`` at input position
    ``j * in / out``, clamped at the last pixel: pinned on two small ramps (a half-pixel offset of
    the wrong sign, or none, moves every interior value)."""
    from dit.evaluate import tf_resize

    ramp = torch.arange(3.0)[None].repeat(3, 1)[None, None]
    torch.testing.assert_close(tf_resize(ramp, 5)[0, 0, 0], torch.tensor([0.0, 0.6, 1.2, 1.8, 2.0]))
    two = torch.tensor([[0.0, 1.0], [0.0, 1.0]])[None, None]
    torch.testing.assert_close(tf_resize(two, 4)[0, 0, 0], torch.tensor([0.0, 0.5, 1.0, 1.0]))
