"""Training data: the digits embedded in scikit-learn, an image folder, or a latents directory.

Every dataset yields images (or latents) as float tensors ``[N, C, H, W]`` and int64 labels.
Pixels are scaled to [-1, 1]. The batch order is a pure function of (seed, step), so a resumed
run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cli import positive_int
from .files import check_writable_dir

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
LATENT_SCALE = 0.18215  # Stable Diffusion's VAE latent scaling, as DiT uses it


class TensorData:
    """A dataset held in memory: ``images [N, C, H, W]``, ``labels [N]``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, is_latent: bool = False):
        self.images, self.labels = images, labels
        self.num_classes = num_classes
        self.is_latent = is_latent

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[indices], self.labels[indices]


class ImageFolderData:
    """``root/<class>/<image>``, classes in sorted order; images are centre-cropped to a square
    and resized to ``image_size`` on load (as ADM and DiT prepare ImageNet)."""

    def __init__(self, root: Path, image_size: int):
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        files = [
            (path, label)
            for label, name in enumerate(classes)
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not files:
            raise ValueError(f"no images found under {root}: expected {root}/<class name>/<image file>")
        _check_headers([path for path, _ in files])
        self.paths = [path for path, _ in files]
        self.labels = torch.tensor([label for _, label in files], dtype=torch.long)
        self.num_classes = len(classes)
        self.image_size = image_size
        self.is_latent = False

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def _load(self, path: Path) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                side = min(image.size)
                left, top = (image.width - side) // 2, (image.height - side) // 2
                image = image.crop((left, top, left + side, top + side))
                image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
                array = np.asarray(image, dtype=np.float32)
        except (OSError, ValueError) as error:  # a file whose header read but whose pixels do not
            raise ValueError(f"cannot decode image {path}: {error}") from error
        return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([self._load(self.paths[i]) for i in indices.tolist()]), self.labels[indices]


def _check_headers(paths: list[Path]) -> None:
    """Open every image's header before training starts, so that a file that is not an image
    (or is empty) stops the run at once with its name, not when a batch first reaches it."""
    from PIL import Image
    from tqdm.auto import tqdm

    for path in tqdm(paths, desc="checking images", disable=len(paths) < 5000, leave=False):
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, ValueError) as error:
            raise ValueError(f"{path} is not a readable image: {error}") from error
        if min(width, height) < 1:
            raise ValueError(f"{path} is an empty image ({width}x{height})")


DIGITS = 1797  # scikit-learn's digits


def load_digits(image_size: int = 8) -> TensorData:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels, 10 classes), in [-1, 1]."""
    table = _digits_table()
    images = torch.from_numpy(table[:, :64]).float().view(-1, 1, 8, 8) / 8.0 - 1.0
    if image_size != 8:
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
        )
    return TensorData(images, torch.from_numpy(table[:, 64]).long(), 10)


def _digits_table() -> np.ndarray:
    """``[1797, 65]``: 64 pixels and the label per row. Read straight from the CSV inside
    scikit-learn's wheel: importing scikit-learn takes about two seconds, which every process
    of a distributed run would pay."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():  # another layout: ask scikit-learn itself
        from sklearn.datasets import load_digits as sklearn_digits

        digits = sklearn_digits()
        return np.column_stack([digits.data, digits.target])
    return np.loadtxt(path, delimiter=",", dtype=np.int64)


def load_latents(root: Path) -> TensorData:
    """Every ``*.safetensors`` under ``root``, each holding ``latents [n, C, h, w]`` (already
    scaled) and ``labels [n]``; ``python -m dit.data encode`` writes them."""
    from safetensors.torch import load_file

    shards = sorted(root.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"no *.safetensors latent shards in {root}")
    latents, labels = [], []
    for shard in shards:
        try:
            tensors = load_file(shard)
        except Exception as error:
            raise ValueError(f"latent shard {shard} is corrupt or not a safetensors file: {error}") from error
        if "latents" not in tensors or "labels" not in tensors:
            raise ValueError(f"{shard} must hold tensors 'latents' and 'labels', found {sorted(tensors)}")
        shape = tuple(tensors["latents"].shape)
        if (
            len(shape) != 4
            or tuple(tensors["labels"].shape) != shape[:1]
            or (latents and shape[1:] != latents[0].shape[1:])
        ):
            raise ValueError(
                f"{shard}: expected latents [n, C, h, w] like the other shards and labels [n], "
                f"got {shape} and {tuple(tensors['labels'].shape)}"
            )
        latents.append(tensors["latents"].float())
        labels.append(tensors["labels"].long())
    labels_all = torch.cat(labels)
    return TensorData(torch.cat(latents), labels_all, int(labels_all.max()) + 1, is_latent=True)


def resident_bytes(data: str, image_size: int) -> int:
    """The bytes a dataset holds in memory once loaded: the digits upsampled to ``image_size`` (fp32)
    or a latents directory's shards (about their size on disk); an image folder reads each batch."""
    if data == "digits":
        return DIGITS * image_size * image_size * 4
    root = Path(data)
    return sum(shard.stat().st_size for shard in root.glob("*.safetensors")) if root.is_dir() else 0


def load_dataset(data: str, image_size: int | None) -> TensorData | ImageFolderData:
    """``"digits"``, an image folder, or a directory of latent shards."""
    if data == "digits":
        return load_digits(image_size or 8)
    root = Path(data)
    if not root.is_dir():
        raise ValueError(
            f"--data must be 'digits', an image folder or a latents directory; {data!r} is not a directory"
        )
    if any(root.glob("*.safetensors")):
        return load_latents(root)
    return ImageFolderData(root, image_size or 256)


def batches(
    dataset, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches from ``start_step`` on. Each epoch is a fresh permutation drawn from
    (seed, epoch); rank ``r`` of ``world_size`` takes its own slice of each global batch."""
    global_batch = batch_size * world_size
    per_epoch = steps_per_epoch(dataset, global_batch)
    step = start_step
    while True:
        epoch, index = divmod(step, per_epoch)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        if len(dataset) < global_batch:
            order = order.repeat(global_batch // len(dataset) + 1)
        start = index * global_batch + rank * batch_size
        yield dataset.get(order[start : start + batch_size])
        step += 1


def steps_per_epoch(dataset, global_batch_size: int) -> int:
    """Full global batches per epoch; the remainder of each permutation is skipped."""
    return max(len(dataset) // global_batch_size, 1)


def load_vae(path: str, device: torch.device):
    """A diffusers ``AutoencoderKL`` from a local directory (the ``vae`` extra)."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as error:
        raise ValueError("--vae needs diffusers: pip install -e '.[vae]'") from error
    if not Path(path).exists():
        raise ValueError(f"--vae {path!r} does not exist; give the local directory of a diffusers AutoencoderKL")
    return AutoencoderKL.from_pretrained(path).to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents, one draw from the encoder's posterior."""
    return vae.encode(images).latent_dist.sample() * LATENT_SCALE


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    return vae.decode(latents / LATENT_SCALE).sample


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dit.data", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="encode an image folder to latent shards with a VAE")
    enc.add_argument("--data", required=True, help="image folder: DIR/<class>/<image>")
    enc.add_argument("--vae", required=True, help="local diffusers AutoencoderKL directory")
    enc.add_argument("--image-size", type=positive_int, default=256)
    enc.add_argument("--out", required=True)
    enc.add_argument("--batch-size", type=positive_int, default=64)
    enc.add_argument("--shard-size", type=positive_int, default=50_000)
    return parser


def main(argv: list[str] | None = None) -> None:
    """``python -m dit.data encode --data DIR --vae VAE --image-size 256 --out LATENTS``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.image_size % 8:
        parser.error(
            f"--image-size must be a multiple of 8 (the VAE's latents are 8 times smaller), got {args.image_size}"
        )

    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    try:
        if not Path(args.data).is_dir():
            raise ValueError(f"--data {args.data} is not a directory")
        dataset = ImageFolderData(Path(args.data), args.image_size)
        check_writable_dir(out, "--out")
        vae = load_vae(args.vae, device)
    except (ValueError, OSError) as error:
        raise SystemExit(f"error: {error}") from error
    for shard, first in enumerate(range(0, len(dataset), args.shard_size)):
        indices = torch.arange(first, min(first + args.shard_size, len(dataset)))
        latents = []
        for chunk in tqdm(indices.split(args.batch_size), desc=f"shard {shard}"):
            images, _ = dataset.get(chunk)
            latents.append(encode(vae, images.to(device)).half().cpu())
        save_file({"latents": torch.cat(latents), "labels": dataset.labels[indices]}, out / f"{shard:05d}.safetensors")


if __name__ == "__main__":
    main()
