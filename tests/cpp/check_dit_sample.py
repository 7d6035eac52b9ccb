"""The ctest of ``CMakeLists.txt``: ``dit_sample`` against ``python -m dit.sample``.

    python -m tests.cpp.check_dit_sample build/dit_sample
    python -m tests.cpp.check_dit_sample build/dit_sample --device cuda   # on a GPU

For a diffusion model (DDPM, DDIM, DPM-Solver++(2M), and DDIM guided only inside an interval)
and a rectified-flow model routed by expert choice (Euler; Heun with a time shift and a guidance
interval), each the documented digits model (``DiT-MoE-Ti/2-8E2A``, ``make train``'s) trained for a few steps: exports it
(``python -m dit.export``, guided, batch 8), samples 12 images (a full batch and a padded one)
with both programs from the same seed, guidance 4, and requires the same labels and images within
one grey level (the two run the same float32 arithmetic; a level can flip where a value rounds at
.5), but for at most 1% of the pixels, by at most 32 levels (see ``OUTLIERS``). Both programs' defaults (sampler, steps, guidance) are compared the same way, on one batch.
Then checks that bad input gets a one-line error and a non-zero exit code. Prints the export
time, the package size, and the time per sampling step of both programs (batch 8, guided; each
from its own clock around the whole loop, the GPU synchronised at the end).

With ``--device cuda`` the packages are exported for the GPU and ``python -m dit.sample`` runs
there with IEEE fp32 products (``--precision fp32``), as the C++ program does: the GPU's kernels
round differently from the CPU's, so ``--tolerance`` says how many grey levels may differ.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dit.checkpoint import build_from_checkpoint
from dit.export import main as export_main
from dit.precision import use_precision
from dit.sample import main as sample_main
from dit.sampling import generate
from dit.train import main as train_main

SAMPLING = ["--num-samples", "12", "--seed", "3", "--steps", "10", "--cfg-scale", "4"]
# The package's fused kernels round differently from eager PyTorch: where a value sits at a
# discontinuity (a router's near tie, which sends a token to another expert; the clip of x0 at
# +-1), a few pixels of one sample can move further than the tolerance. Up to 1% of the pixels may,
# by at most 32 grey levels; a real fault (a wrong noise draw, a bad step) moves nearly all of them.
OUTLIERS, MAX_LEVELS = 0.01, 32


def run(binary: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=600)


def train_and_export(tmp: Path, objective: str, device: str, router: str = "token-choice") -> tuple[Path, Path]:
    """A checkpoint of the digits model trained for a few steps, and its guided batch-8 package."""
    runs = tmp / objective
    train_main(
        [
            "--steps",
            "10",
            "--global-batch-size",
            "32",
            "--sample-steps",
            "2",
            "--log-every",
            "10",
            "--objective",
            objective,
            "--set",
            f"router={router}",
            "--results-dir",
            str(runs),
        ]
    )
    (checkpoint,) = runs.glob("*/checkpoints/0000010")
    package = runs / "model.pt2"
    start = time.perf_counter()
    export_main(["--ckpt", str(checkpoint), "--out", str(package), "--batch", "8", "--cfg", "--device", device])
    print(f"{objective}: export {time.perf_counter() - start:.1f} s, package {package.stat().st_size / 2**20:.1f} MiB")
    return checkpoint, package


def compare(binary: str, checkpoint: Path, package: Path, sampling: list[str], device: str, tolerance: int) -> None:
    """Sample with both programs and the same flags; require the same labels and images."""
    out = package.parent
    result = run(binary, "--package", str(package), "--out", str(out / "cpp.npz"), "--batch", "8", *sampling)
    assert result.returncode == 0, result.stderr
    print("dit_sample:", result.stderr.strip())
    start = time.perf_counter()
    sample_main(
        [
            "--ckpt",
            str(checkpoint),
            "--out",
            str(out / "python.npz"),
            "--batch-size",
            "8",
            "--moe-backend",
            "torch",
            "--precision",
            "fp32",
            *sampling,
        ]
    )
    print(f"python -m dit.sample {' '.join(sampling)}: {time.perf_counter() - start:.2f} s")
    cpp, python = np.load(out / "cpp.npz"), np.load(out / "python.npz")
    assert cpp["arr_0"].shape == python["arr_0"].shape and cpp["arr_0"].dtype == np.uint8
    assert np.array_equal(cpp["arr_1"], python["arr_1"])
    difference = np.abs(cpp["arr_0"].astype(int) - python["arr_0"].astype(int))
    beyond = float((difference > tolerance).mean())
    assert beyond <= OUTLIERS and difference.max() <= MAX_LEVELS, (
        f"{' '.join(sampling)}: {beyond:.1%} of the pixels differ by more than {tolerance} grey levels "
        f"(at most {OUTLIERS:.0%} may), by up to {difference.max()} (at most {MAX_LEVELS})"
    )
    print(
        f"images: {int((difference > 0).sum())} of {difference.size} pixels differ, by at most {difference.max()}; "
        f"{int((difference > tolerance).sum())} by more than {tolerance}"
    )


def python_step_ms(checkpoint: Path, sampler: str, device: str, steps: int = 10) -> float:
    """Python eager's time per guided sampling step of batch 8, timed as dit_sample times its own:
    the whole loop, after a first run that warms up."""
    model = build_from_checkpoint(str(checkpoint), "ema", moe_backend="torch").to(device).eval()
    labels = torch.arange(8) % model.config.num_classes
    with torch.no_grad(), use_precision("fp32", torch.device(device)):
        for _ in range(2):
            start = time.perf_counter()
            generate(model, labels, 4.0, steps, sampler, seed=0).cpu()
    return (time.perf_counter() - start) * 1e3 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary", help="the built dit_sample")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the packages run")
    parser.add_argument("--tolerance", type=int, default=1, help="grey levels the two programs' images may differ by")
    args = parser.parse_args()
    binary = args.binary
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint, package = train_and_export(tmp, "diffusion", args.device)
        for sampler in ("ddpm", "ddim", "dpm++2m"):
            compare(binary, checkpoint, package, [*SAMPLING, "--sampler", sampler], args.device, args.tolerance)
            print(
                f"python eager ({sampler}): {python_step_ms(checkpoint, sampler, args.device):.2f} ms per step of batch 8"
            )
        interval = [*SAMPLING, "--sampler", "ddim", "--cfg-interval", "0.3", "0.7"]
        compare(binary, checkpoint, package, interval, args.device, args.tolerance)
        compare(binary, checkpoint, package, ["--num-samples", "8"], args.device, args.tolerance)  # the defaults
        # The flow model routes by expert choice: the C++ ops of both routings get checked.
        flow_checkpoint, flow_package = train_and_export(tmp, "rectified-flow", args.device, "expert-choice")
        compare(binary, flow_checkpoint, flow_package, SAMPLING, args.device, args.tolerance)
        heun = [*SAMPLING, "--sampler", "heun", "--time-shift", "3", "--cfg-interval", "0.2", "0.9"]
        compare(binary, flow_checkpoint, flow_package, heun, args.device, args.tolerance)
        print(
            f"python eager (euler): {python_step_ms(flow_checkpoint, 'euler', args.device):.2f} ms per step of batch 8"
        )
        # Another program's package, labelled as one of the format before the experts op (whose
        # ops this sampler no longer has): one compile serves both refusals.
        foreign = tmp / "foreign.pt2"
        exported = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
        older = {"aot_inductor.metadata": {"format": "dit-moe-denoiser/1"}}
        torch._inductor.aoti_compile_and_package(exported, package_path=str(foreign), inductor_configs=older)
        result = run(binary, "--package", str(foreign), "--out", str(tmp / "x.npz"))
        assert result.returncode != 0 and "export the checkpoint again" in result.stderr, result.stderr

        bad = {
            "missing package": ["--package", str(tmp / "none.pt2"), "--out", str(tmp / "x.npz")],
            "not a package": ["--package", str(tmp / "diffusion" / "cpp.npz"), "--out", str(tmp / "x.npz")],
            "wrong batch": ["--package", str(package), "--out", str(tmp / "x.npz"), "--batch", "4"],
            "unknown class": ["--package", str(package), "--out", str(tmp / "x.npz"), "--class", "10"],
            "unwritable output": ["--package", str(package), "--out", str(tmp / "no" / "such" / "x.npz")],
            "bad number": ["--package", str(package), "--out", str(tmp / "x.npz"), "--steps", "ten"],
            "too few steps": ["--package", str(package), "--out", str(tmp / "x.npz"), "--steps", "1"],
            "wrong sampler": ["--package", str(package), "--out", str(tmp / "x.npz"), "--sampler", "heun"],
            "time shift of diffusion": ["--package", str(package), "--out", str(tmp / "x.npz"), "--time-shift", "2"],
            "reversed interval": [
                "--package",
                str(package),
                "--out",
                str(tmp / "x.npz"),
                "--cfg-interval",
                "0.8",
                "0.2",
            ],
            "half an interval": ["--package", str(package), "--out", str(tmp / "x.npz"), "--cfg-interval", "0.8"],
            "another program's package": ["--package", str(foreign), "--out", str(tmp / "x.npz")],
            "infinite guidance": ["--package", str(package), "--out", str(tmp / "x.npz"), "--cfg-scale", "inf"],
            "NaN guidance": ["--package", str(package), "--out", str(tmp / "x.npz"), "--cfg-scale", "nan"],
            "negative seed": ["--package", str(package), "--out", str(tmp / "x.npz"), "--seed", "-1"],
        }
        for case, args in bad.items():
            result = run(binary, *args)
            first = result.stderr.splitlines()[0] if result.stderr else ""
            assert result.returncode != 0 and first.startswith("error: "), (case, result.returncode, result.stderr)
            assert "frame #" not in result.stderr and "Exception raised from" not in result.stderr, (
                case,
                result.stderr,
            )
            print(f"{case}: {first}")


if __name__ == "__main__":
    main()
