"""Nothing a command reads is trusted, and nothing it writes destroys what it reads: an output
naming an input (by its path, a symlink or a hard link) is refused before any work; a checkpoint
whose config, manifest or weights are damaged is one line, and skipped by ``--resume latest``; a
reference batch's statistics must be a mean and a covariance."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dit import checkpoint as ckpt
from dit.checkpoint import save_weights
from dit.convert import main as convert_main
from dit.evaluate import load_reference_statistics
from dit.evaluate import main as evaluate_main
from dit.export import main as export_main
from dit.models import create_model
from dit.sample import main as sample_main
from dit.train import main as train_main
from dit.upcycle import main as upcycle_main
from tests.dit.test_train import FAST, run

# --- No command overwrites its own input.


def _digits_samples(path: Path) -> Path:
    np.savez(path, arr_0=np.full((2, 8, 8, 1), 7, dtype=np.uint8), arr_1=np.arange(2))
    return path


def _alias(path: Path, how: str, tmp_path: Path) -> Path:
    """``path`` itself, a symlink to it or a hard link of it."""
    if how == "path":
        return path
    alias = tmp_path / f"alias-{how}{path.suffix}"
    (os.symlink if how == "symlink" else os.link)(path, alias)
    return alias


@pytest.mark.parametrize("how", ["path", "symlink", "hard link"])
@pytest.mark.parametrize("which", ["SAMPLES", "REF", "--inception-weights"])
def test_evaluate_never_writes_its_json_over_an_input(tmp_path, how, which):
    samples = _digits_samples(tmp_path / "samples.npz")
    reference = _digits_samples(tmp_path / "ref.npz")
    weights = tmp_path / "inception.pt"
    weights.write_bytes(b"weights")
    target = {"SAMPLES": samples, "REF": reference, "--inception-weights": weights}[which]
    before = target.read_bytes()
    argv = [str(samples), str(reference), "--inception-weights", str(weights)]
    with pytest.raises(SystemExit, match=f"--json .* is {which} .*which this command reads"):
        evaluate_main([*argv, "--json", str(_alias(target, how, tmp_path))])
    assert target.read_bytes() == before


def _dense_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    dense = create_model("DiT-Ti/2", moe_backend="torch", input_size=8, in_channels=1, num_classes=10)
    path = tmp_path / "dense.safetensors"
    save_weights(dense.state_dict(), path, dense.config)
    return path


@pytest.mark.parametrize("how", ["path", "symlink", "hard link"])
def test_upcycle_convert_and_export_never_write_over_what_they_read(tmp_path, how):
    dense = _dense_file(tmp_path)
    before = dense.read_bytes()
    alias = _alias(dense, how, tmp_path)
    with pytest.raises(SystemExit, match="--out .* is --dense .*which this command reads"):
        upcycle_main(["--dense", str(dense), "--model", "DiT-MoE-Ti/2-4E2A", "--out", str(alias)])
    official = tmp_path / "official.pt"
    official.write_bytes(b"not read: the output is refused first")
    with pytest.raises(SystemExit, match="output .* is input .*which this command reads"):
        convert_main([str(official), str(_alias(official, how, tmp_path))])
    package = tmp_path / "link.pt2"
    os.symlink(dense, package)  # a package name that is the weights it reads
    with pytest.raises(SystemExit, match="--out .* is --ckpt .*which this command reads"):
        export_main(["--ckpt", str(dense), "--out", str(package)])
    assert dense.read_bytes() == before


# --- Everything read from disk is checked before it is used.


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run with checkpoints at steps 1 and 2 (copied per test before anything is changed)."""
    return run(tmp_path_factory.mktemp("trained"), "--steps", "2", "--ckpt-every", "1")


def _copy_run(trained: Path, tmp_path: Path) -> Path:
    target = tmp_path / "runs" / trained.name
    shutil.copytree(trained, target)
    return target


def _rewrite(checkpoint: Path, name: str, change) -> None:
    """Rewrite one file of ``checkpoint`` with ``change`` and its manifest entry to match: the
    checkpoint stays intact by its hashes, so only the check of what the file holds can tell."""
    change(checkpoint / name)
    manifest = json.loads((checkpoint / ckpt.MANIFEST).read_text())
    data = (checkpoint / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(manifest))


def _with_config(change):
    def rewrite(path: Path) -> None:
        with open(path, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        metadata = header["__metadata__"]
        metadata["config"] = json.dumps(change(json.loads(metadata["config"])))
        save_file(load_file(str(path)), str(path), metadata=metadata)

    return rewrite


def _with_weight(value: float):
    def rewrite(path: Path) -> None:
        with open(path, "rb") as handle:
            metadata = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))["__metadata__"]
        weights = load_file(str(path))
        weights["blocks.0.ffn.w_in"][0, 0, 0] = value
        save_file(weights, str(path), metadata=metadata)

    return rewrite


_DAMAGED_CONFIGS = {
    "a string depth": lambda c: {**c, "depth": "4"},
    "a list for the config": lambda c: [c],
    "a negative width": lambda c: {**c, "hidden_size": -96},
}


@pytest.mark.parametrize("damage", sorted(_DAMAGED_CONFIGS))
def test_a_damaged_config_is_one_line_and_skipped_on_resume(trained, tmp_path, capsys, damage):
    run_dir = _copy_run(trained, tmp_path)
    newest = run_dir / "checkpoints" / "0000002"
    for name in ckpt.WEIGHT_FILES:
        _rewrite(newest, name, _with_config(_DAMAGED_CONFIGS[damage]))
    with pytest.raises(SystemExit, match="^error: checkpoint .* holds a damaged model config"):
        sample_main(["--ckpt", str(newest), "--out", str(tmp_path / "s.npz"), "--num-samples", "1"])
    with pytest.raises(SystemExit, match="^error: .*damaged model config"):
        ckpt.main(["verify", str(newest)])
    if damage != "a string depth":  # one resume shows the skip; every damage reaches the same check
        return
    train_main([*FAST, "--results-dir", str(tmp_path / "runs"), "--steps", "3", "--resume", "latest"])
    assert f"skipping checkpoint {newest}" in capsys.readouterr().err
    assert "resumed from " + str(run_dir / "checkpoints" / "0000001") in (run_dir / "log.txt").read_text()


def test_a_manifest_nested_too_deep_is_one_line_and_skipped_on_resume(trained, tmp_path, capsys):
    run_dir = _copy_run(trained, tmp_path)
    newest = run_dir / "checkpoints" / "0000002"
    (newest / ckpt.MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SystemExit, match="^error: .*is corrupt \\(nested too deep"):
        ckpt.main(["verify", str(newest)])
    with pytest.raises(SystemExit, match="^error: .*nested too deep"):
        sample_main(["--ckpt", str(newest), "--out", str(tmp_path / "s.npz"), "--num-samples", "1"])
    train_main([*FAST, "--results-dir", str(tmp_path / "runs"), "--steps", "3", "--resume", "latest"])
    assert f"skipping checkpoint {newest}" in capsys.readouterr().err


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_holding_nan_or_inf_are_refused_by_name(trained, tmp_path, value):
    checkpoint = _copy_run(trained, tmp_path) / "checkpoints" / "0000002"
    for name in ckpt.WEIGHT_FILES:
        _rewrite(checkpoint, name, _with_weight(value))
    with pytest.raises(SystemExit, match="^error: checkpoint .*: blocks.0.ffn.w_in holds NaN or Inf"):
        sample_main(["--ckpt", str(checkpoint), "--out", str(tmp_path / "s.npz"), "--num-samples", "1"])
    with pytest.raises(SystemExit, match="^error: checkpoint .*: blocks.0.ffn.w_in holds NaN or Inf"):
        train_main([*FAST, "--results-dir", str(tmp_path / "new"), "--init", str(checkpoint)])


def test_a_damaged_training_state_is_one_line(trained, tmp_path):
    run_dir = _copy_run(trained, tmp_path)
    checkpoint = run_dir / "checkpoints" / "0000002"
    _rewrite(checkpoint, ckpt.STATE_FILE, lambda path: torch.save({"step": "2", "args": []}, path))
    with pytest.raises(SystemExit, match="^error: training state .* is damaged: its step, args, config, rng"):
        train_main([*FAST, "--steps", "3", "--resume", str(checkpoint)])


def _reference(tmp_path: Path, mu: np.ndarray, sigma: np.ndarray) -> Path:
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=np.zeros((1, 8, 8, 3), dtype=np.uint8), mu=mu, sigma=sigma)
    return path


@pytest.mark.parametrize(
    "mu, sigma, match",
    [
        (np.array([0.0, np.nan]), np.eye(2), "mu holds NaN or Inf"),
        (np.zeros(2), np.array([[1.0, np.inf], [np.inf, 1.0]]), "sigma holds NaN or Inf"),
        (np.zeros(2), -np.eye(2), "sigma has a negative eigenvalue"),
        (np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), "sigma is not symmetric"),
    ],
)
def test_reference_statistics_must_be_a_mean_and_a_covariance(tmp_path, mu, sigma, match):
    with pytest.raises(ValueError, match=match):
        load_reference_statistics(_reference(tmp_path, mu, sigma))
    a = np.random.default_rng(0).normal(size=(5, 2))
    assert load_reference_statistics(_reference(tmp_path, np.zeros(2), a.T @ a))["pool"][0].shape == (2,)


# --- Silent wrong answers.


def test_a_resume_with_fewer_steps_than_reached_says_so(trained, tmp_path):
    run_dir = _copy_run(trained, tmp_path)
    with pytest.raises(SystemExit, match="^error: --steps 1 ends before step 2, which the run already reached"):
        train_main([*FAST, "--steps", "1", "--resume", str(run_dir)])


@pytest.mark.parametrize("ep", ["3", "16"])
def test_memory_refuses_an_expert_parallel_degree_that_does_not_fit(ep, capsys):
    from dit.memory import main as memory_main

    with pytest.raises(SystemExit) as exit_info:
        memory_main(["--gpus", "8", "--ep", ep])
    assert exit_info.value.code == 2 and f"--ep {ep} must divide --gpus 8" in capsys.readouterr().err


# --- Sizes that cannot fit are refused before they are allocated.


@pytest.mark.parametrize(
    "flags",
    [
        ["--global-batch-size", "1000000000"],
        ["--set", "hidden_size=1000000000"],
        ["--set", "num_experts=1000000"],
        ["--image-size", "1000000"],
    ],
)
def test_a_run_that_cannot_fit_is_refused_before_anything_is_allocated(tmp_path, flags):
    with pytest.raises(
        SystemExit, match=r"^error: this run needs about .* per process \(.*\) and cpu has .*--skip-memory-check"
    ):
        train_main(["--steps", "1", "--results-dir", str(tmp_path), *flags])
    assert not any(tmp_path.glob("*/checkpoints/*"))


def test_skip_memory_check_goes_ahead(tmp_path, monkeypatch):
    import dit.memory

    monkeypatch.setattr(dit.memory, "available_bytes", lambda device: 2**20)  # a 1 MiB machine
    with pytest.raises(SystemExit, match="this run needs about .* and cpu has 1 MiB"):
        train_main([*FAST, "--steps", "1", "--results-dir", str(tmp_path)])
    train_main([*FAST, "--steps", "1", "--results-dir", str(tmp_path), "--skip-memory-check"])
    assert any(tmp_path.glob("*/checkpoints/0000001"))
