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
  pytorch-fid's PyTorch re-implementations. Published FID-50K needs 50,000 samples.
* Digits (``--digits``, no weights needed): a classifier trained on the real digits labels the
  samples; it reports accuracy per class and overall, and the Fréchet distance between real and
  generated digits in the classifier's hidden features (an FID analogue for 8x8 digits).
"""

from __future__ import annotations

import argparse
import json
import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from .cli import check_writable, positive_int, replace_atomically


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


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` between two feature sets ``[N, F]``."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr((S_a S_b)^(1/2)) = sum of sqrt(eigenvalues) of S_a^(1/2) S_b S_a^(1/2), a symmetric PSD
    # matrix: stable even when the covariances are singular (fewer samples than features).
    values, vectors = linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    trace_root = np.sqrt(linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


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
        out = []
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).to(self.device).permute(0, 3, 1, 2)
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            out.append(self.net(batch, **kwargs).float().cpu())
        return torch.cat(out)


def inception_metrics(
    samples: np.ndarray, reference: np.ndarray, weights: str | Path, batch_size: int = 100, allow_pickle: bool = False
) -> dict:
    net = Inception(weights, torch.device("cuda" if torch.cuda.is_available() else "cpu"), allow_pickle)
    fake = net.run(samples, batch_size, return_features=True)
    real = net.run(reference, batch_size, return_features=True)
    probs = net.run(samples, batch_size, no_output_bias=True)
    precision, recall = precision_recall(real, fake)
    return {
        "fid": frechet_distance(real.double().numpy(), fake.double().numpy()),
        "inception_score": inception_score(probs),
        "precision": precision,
        "recall": recall,
        "num_samples": len(samples),
        "num_reference": len(reference),
    }


DIGIT_CLASSES = 10


def digits_classifier():
    """An MLP trained on scikit-learn's real digits (inputs 0..16, 64 features); fixed seed."""
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
        json_path = check_writable(args.json, "--json") if args.json else None
        samples, labels = load_images(args.samples)
        if args.digits:
            results = digits_metrics(samples, labels)
        else:
            if args.reference is None or args.inception_weights is None:
                raise ValueError("the Inception metrics need REF.npz and --inception-weights (or pass --digits)")
            reference, _ = load_images(args.reference)
            results = inception_metrics(samples, reference, args.inception_weights, args.batch_size, args.allow_pickle)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    for key, value in results.items():
        print(f"{key}: {json.dumps(value) if isinstance(value, dict) else value}")
    if json_path is not None:
        replace_atomically(lambda tmp: tmp.write_text(json.dumps(results, indent=2)), json_path)


if __name__ == "__main__":
    main()
