"""Sample quality: ``python -m dit.evaluate SAMPLES.npz [REF.npz] [--inception-weights PATH]``.

Two modes, both reading ``.npz`` files whose ``arr_0`` holds uint8 ``[N, H, W, C]`` images
(as ``dit.sample`` writes them) and, for the samples, ``arr_1`` their class labels.

* Inception metrics (``REF.npz`` and ``--inception-weights``): FID, Inception Score, precision
  and recall (k=3 nearest-neighbour manifolds, Kynkäänniemi et al. 2019) in the 2048-d pool
  features of Inception-v3. The weights file is the TorchScript port of the TensorFlow
  Inception graph (``inception-2015-12-05.pt``, the one StyleGAN3's metrics and clean-fid use);
  nothing is downloaded. Its features follow the TensorFlow network, so FID, IS, precision and
  recall are comparable to numbers from the ADM evaluator (guided-diffusion's
  ``evaluations/evaluator.py``, which DiT and DiT-MoE report), not to torch-fidelity's or
  pytorch-fid's PyTorch re-implementations. Published FID-50K needs 50,000 samples. ``REF.npz``
  may be an ADM reference batch as published (``VIRTUAL_imagenet256_labeled.npz``): its
  precomputed ``mu``/``sigma`` (and ``mu_s``/``sigma_s``) then give FID (and sFID) as ADM's
  evaluator computes them. sFID compares the first 7 channels of ``mixed_6/conv`` (2023-d),
  where the network exposes that layer.
* Digits (``--digits``, no weights needed): a classifier trained on the real digits labels the
  samples; it reports accuracy per class and overall, and the Fréchet distance between real and
  generated digits in the classifier's hidden features (an FID analogue for 8x8 digits).
"""

from __future__ import annotations

import argparse
import functools
import json
import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from .cli import positive_int
from .files import check_writable, replace_atomically


def load_images(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``arr_0`` (uint8 NHWC) and ``arr_1`` (labels, if present) of an ``.npz``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data:
                raise ValueError(f"{path} has no arr_0 (uint8 [N, H, W, C] images)")
            images, labels = data["arr_0"], data["arr_1"] if "arr_1" in data else None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise ValueError(f"{path} is not a readable .npz (truncated or corrupt?): {error}") from error
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise ValueError(f"{path}: arr_0 holds no images")
    if labels is not None and labels.shape != (len(images),):
        raise ValueError(f"{path}: arr_1 must hold one label per image ({len(images)}), got shape {labels.shape}")
    return images, labels


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[F]`` and covariance ``[F, F]`` of features ``[N, F]``, in fp64, as ADM computes them."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance between two feature sets ``[N, F]`` (see ``frechet_from_statistics``)."""
    return frechet_from_statistics(*statistics(a), *statistics(b))


def frechet_from_statistics(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``: FID from the statistics, which
    is how ADM's evaluator uses a reference batch's precomputed ``mu`` and ``sigma``."""
    # tr((S_a S_b)^(1/2)) = sum of sqrt(eigenvalues) of S_a^(1/2) S_b S_a^(1/2), a symmetric PSD
    # matrix: stable even when the covariances are singular (fewer samples than features), and
    # equal to scipy's sqrtm of S_a S_b, which ADM takes, where that one is defined.
    values, vectors = linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    trace_root = np.sqrt(linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


# The statistics an ADM reference batch stores beside its images: pool features (2048-d) and
# spatial features (the first 7 channels of mixed_6/conv, 17 x 17, flattened: 2023-d).
REFERENCE_STATISTICS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}


def load_reference_statistics(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The precomputed statistics of an ADM reference batch (``VIRTUAL_imagenet256_labeled.npz``:
    ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` beside ``arr_0``), by kind (``"pool"``, ``"spatial"``),
    those it holds; ``ValueError`` for a half pair or inconsistent shapes."""
    out = {}
    with np.load(path, allow_pickle=False) as data:
        for kind, (mu_key, sigma_key) in REFERENCE_STATISTICS.items():
            present = [key in data for key in (mu_key, sigma_key)]
            if not any(present):
                continue
            if not all(present):
                raise ValueError(f"{path} holds only one of {mu_key} and {sigma_key}")
            mu, sigma = data[mu_key].astype(np.float64), data[sigma_key].astype(np.float64)
            if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
                raise ValueError(
                    f"{path}: {mu_key} must be [F] and {sigma_key} [F, F], got {mu.shape} and {sigma.shape}"
                )
            _check_statistics(path, (mu_key, mu), (sigma_key, sigma))
            out[kind] = (mu, sigma)
    return out


def _check_statistics(path: str | Path, mu: tuple[str, np.ndarray], sigma: tuple[str, np.ndarray]) -> None:
    """``ValueError`` naming the array unless the mean is finite and the covariance a finite,
    symmetric, positive semi-definite matrix (up to rounding): anything else gives an FID that
    means nothing (or a complex one)."""
    for name, array in (mu, sigma):
        if not np.isfinite(array).all():
            raise ValueError(f"{path}: {name} holds NaN or Inf: these statistics are damaged")
    name, sigma = sigma
    scale = max(float(np.abs(sigma).max()), np.finfo(np.float64).tiny)
    if not np.allclose(sigma, sigma.T, rtol=0, atol=1e-6 * scale):
        raise ValueError(f"{path}: {name} is not symmetric, so not a covariance matrix")
    lowest = float(np.linalg.eigvalsh(sigma).min())
    if lowest < -1e-6 * scale:
        raise ValueError(f"{path}: {name} has a negative eigenvalue ({lowest:.3g}), so it is not a covariance matrix")


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall: the share of fake features inside the real manifold
    (balls to each real point's k-th neighbour), and of real features inside the fake one."""

    def radii(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.cdist(chunk, x).kthvalue(k + 1, dim=1).values for chunk in x.split(1024)])

    def inside(points: torch.Tensor, manifold: torch.Tensor, r: torch.Tensor) -> float:
        hits = [(torch.cdist(chunk, manifold) <= r[None]).any(dim=1) for chunk in points.split(1024)]
        return torch.cat(hits).float().mean().item()

    real, fake = real.double(), fake.double()
    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def inception_score(probs: torch.Tensor, splits: int = 10) -> float:
    """``exp(E_x KL(p(y|x) || p(y)))``, averaged over ``splits`` chunks as is customary."""
    scores = []
    for part in probs.double().chunk(splits):
        marginal = part.mean(dim=0, keepdim=True)
        kl = (part * (torch.log(part.clamp(min=1e-12)) - torch.log(marginal.clamp(min=1e-12)))).sum(dim=1)
        scores.append(torch.exp(kl.mean()).item())
    return float(np.mean(scores))


SPATIAL_LAYERS = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed") + tuple(
    f"mixed_{i}" for i in range(1, 6)
)
SPATIAL_MISSING = (
    "sFID needs Inception's spatial features (mixed_6/conv), and these --inception-weights do not expose "
    "them (the TorchScript inception-2015-12-05.pt does, as layers.mixed_6.conv); FID, IS, precision "
    "and recall do not need them"
)


def tf_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``[N, C, H, W]`` to ``size x size`` with TensorFlow 1's sampling
    positions (the corners of the input grid map to those of the output, offset by half an input
    pixel), which the TorchScript Inception reproduces with an affine sampling grid."""
    n, _, height, width = images.shape
    theta = torch.eye(2, 3, device=images.device, dtype=images.dtype).repeat(n, 1, 1)
    theta[:, 0, 2] += 1 / width - 1 / size
    theta[:, 1, 2] += 1 / height - 1 / size
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Inception:
    """The TorchScript Inception-v3 of StyleGAN3's metrics: uint8 ``[N, 3, H, W]`` in, pool
    features (``return_features=True``) or class probabilities (``no_output_bias=True``) out."""

    def __init__(self, path: str | Path, device: torch.device, allow_pickle: bool = False):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"--inception-weights {path} does not exist (TorchScript inception-2015-12-05.pt or .pkl)")
        if path.suffix == ".pkl" and not allow_pickle:
            raise ValueError(
                f"--inception-weights {path} is a pickle, and unpickling a file can run any code it holds; "
                "pass --allow-pickle if you trust it (StyleGAN3's own download), or use the TorchScript .pt"
            )
        try:
            if path.suffix == ".pkl":  # StyleGAN3's download: the same TorchScript module, pickled
                with open(path, "rb") as handle:
                    self.net = pickle.load(handle).to(device).eval()
            else:
                self.net = torch.jit.load(str(path), map_location=device).eval()
        except Exception as error:
            raise ValueError(f"cannot load {path} as a TorchScript Inception: {error}") from error
        self.device = device

    @torch.no_grad()
    def run(self, images: np.ndarray, batch_size: int, **kwargs) -> torch.Tensor:
        return self._batches(images, batch_size, lambda batch: self.net(batch, **kwargs))

    def _batches(self, images: np.ndarray, batch_size: int, fn) -> torch.Tensor:
        out = []
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).to(self.device).permute(0, 3, 1, 2)
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            out.append(fn(batch).float().cpu())
        return torch.cat(out)

    def spatial_layers(self) -> list[torch.nn.Module] | None:
        """The network's layers up to ``mixed_6/conv``, where the TorchScript port of the
        TensorFlow graph exposes them (``layers.conv`` ... ``layers.mixed_6.conv``), else ``None``."""
        try:
            layers = self.net.layers
            return [getattr(layers, name) for name in SPATIAL_LAYERS] + [layers.mixed_6.conv]
        except AttributeError:
            return None

    @torch.no_grad()
    def spatial(self, images: np.ndarray, batch_size: int) -> torch.Tensor:
        """ADM's spatial features ``[N, 2023]``: the first 7 channels of ``mixed_6/conv`` (17 x 17),
        flattened, from the images resized to 299 as the network's own forward resizes them."""
        layers = self.spatial_layers()
        if layers is None:
            raise ValueError(SPATIAL_MISSING)

        def features(batch: torch.Tensor) -> torch.Tensor:
            x = (tf_resize(batch.float(), 299) - 128) / 128
            for layer in layers:
                x = layer(x)
            return x[:, :7].flatten(1)

        return self._batches(images, batch_size, features)


def inception_metrics(
    samples: np.ndarray,
    reference: np.ndarray,
    weights: str | Path,
    batch_size: int = 100,
    allow_pickle: bool = False,
    reference_statistics: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict:
    """FID, sFID, Inception Score, precision and recall of ``samples`` against ``reference``
    (uint8 NHWC). FID and sFID use ``reference_statistics`` (an ADM reference batch's ``mu``,
    ``sigma``, ``mu_s``, ``sigma_s``, see ``load_reference_statistics``) where given, as ADM's
    evaluator does, else the statistics of the reference images; precision and recall always
    use the reference images' features. ``sfid`` is ``None`` when the network gives no spatial
    features (``notes`` says why)."""
    net = Inception(weights, torch.device("cuda" if torch.cuda.is_available() else "cpu"), allow_pickle)
    stats = reference_statistics or {}
    fake = net.run(samples, batch_size, return_features=True)
    real = net.run(reference, batch_size, return_features=True)
    probs = net.run(samples, batch_size, no_output_bias=True)
    precision, recall = precision_recall(real, fake)
    results = {
        "fid": _frechet_against(stats.get("pool"), real, fake, "mu/sigma"),
        "sfid": None,
        "inception_score": inception_score(probs),
        "precision": precision,
        "recall": recall,
        "num_samples": len(samples),
        "num_reference": len(reference),
        "reference_statistics": sorted(stats),
        "notes": [],
    }
    if net.spatial_layers() is None:
        results["notes"].append(SPATIAL_MISSING)
    else:
        spatial_real = None if "spatial" in stats else net.spatial(reference, batch_size)
        results["sfid"] = _frechet_against(
            stats.get("spatial"), spatial_real, net.spatial(samples, batch_size), "mu_s/sigma_s"
        )
    return results


def _frechet_against(statistics_ref, real: torch.Tensor | None, fake: torch.Tensor, names: str) -> float:
    """The Fréchet distance of ``fake`` features to the reference: its precomputed statistics if
    any, else its features ``real``."""
    mu, sigma = statistics(real.double().numpy()) if statistics_ref is None else statistics_ref
    if len(mu) != fake.shape[1]:
        raise ValueError(f"the reference's {names} have {len(mu)} features, the samples' {fake.shape[1]}")
    return frechet_from_statistics(mu, sigma, *statistics(fake.double().numpy()))


DIGIT_CLASSES = 10


@functools.cache
def digits_classifier():
    """An MLP trained on scikit-learn's real digits (inputs 0..16, 64 features); fixed seed.
    Trained once per process (seconds of CPU): a study scores many runs with it."""
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    classifier = MLPClassifier(hidden_layer_sizes=(128,), max_iter=600, random_state=0).fit(
        digits.data / 16, digits.target
    )
    return classifier, digits


def _hidden(classifier, x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ classifier.coefs_[0] + classifier.intercepts_[0], 0)


def digits_metrics(samples: np.ndarray, labels: np.ndarray) -> dict:
    """Per-class and overall accuracy of the real-digits classifier on the samples, and the
    Fréchet distance between real and generated digits in its hidden features."""
    if samples.shape[1:3] != (8, 8):
        raise ValueError(f"digit samples must be 8x8, got {samples.shape[1:3]}")
    if labels is None:
        raise ValueError("the samples .npz needs arr_1 (the requested labels) for the digits report")
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= DIGIT_CLASSES:
        found = (
            f"{labels.dtype} labels" if labels.dtype.kind not in "iu" else f"labels in [{labels.min()}, {labels.max()}]"
        )
        raise ValueError(f"arr_1 must hold integer labels in [0, {DIGIT_CLASSES}) for the digits report, got {found}")
    classifier, digits = digits_classifier()
    x = samples.astype(np.float64).mean(axis=3).reshape(len(samples), 64) / 255.0
    predicted = classifier.predict(x)
    per_class = {int(c): float((predicted[labels == c] == c).mean()) for c in np.unique(labels)}
    return {
        "accuracy": float((predicted == labels).mean()),
        "accuracy_per_class": per_class,
        "frechet_distance": frechet_distance(_hidden(classifier, digits.data / 16), _hidden(classifier, x)),
        "num_samples": len(samples),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dit.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("samples", help=".npz of generated images (arr_0) and labels (arr_1)")
    p.add_argument(
        "reference", nargs="?", default=None, help=".npz of reference images (arr_0), for the Inception metrics"
    )
    p.add_argument(
        "--inception-weights",
        default=None,
        help="local TorchScript inception-2015-12-05.pt (or StyleGAN3's .pkl, with --allow-pickle)",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="let --inception-weights be a pickle: unpickling runs any code the file holds, so only for files you trust",
    )
    p.add_argument("--digits", action="store_true", help="the digits report (needs no weights)")
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        inputs = {"SAMPLES": args.samples, "REF": args.reference, "--inception-weights": args.inception_weights}
        json_path = check_writable(args.json, "--json", inputs) if args.json else None
        samples, labels = load_images(args.samples)
        if args.digits:
            results = digits_metrics(samples, labels)
        else:
            if args.reference is None or args.inception_weights is None:
                raise ValueError("the Inception metrics need REF.npz and --inception-weights (or pass --digits)")
            reference, _ = load_images(args.reference)
            results = inception_metrics(
                samples,
                reference,
                args.inception_weights,
                args.batch_size,
                args.allow_pickle,
                load_reference_statistics(args.reference),
            )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    for key, value in results.items():
        if key == "notes":
            for note in value:
                print(f"note: {note}")
        else:
            print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    if json_path is not None:
        replace_atomically(lambda tmp: tmp.write_text(json.dumps(results, indent=2)), json_path)


if __name__ == "__main__":
    main()
