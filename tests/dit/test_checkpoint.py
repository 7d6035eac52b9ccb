"""Checkpoints a user can trust: a manifest checked on load, resuming past a corrupt checkpoint,
leftovers of killed saves cleared, training state that never runs code, flags that must agree."""

import json
import os
from pathlib import Path

import pytest
import torch

from dit import checkpoint as ckpt
from dit.analyze import main as analyze_main
from dit.sample import main as sample_main
from dit.train import main as train_main
from tests.dit.test_train import FAST, run


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run with checkpoints at steps 1 and 2 (copied per test before anything is changed)."""
    return run(tmp_path_factory.mktemp("trained"), "--steps", "2", "--ckpt-every", "1")


def _copy_run(trained: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "runs" / trained.name
    shutil.copytree(trained, target)
    return target


def test_manifest_lists_every_file_and_the_state_loads_without_pickled_objects(trained):
    checkpoint = trained / "checkpoints" / "0000002"
    manifest = json.loads((checkpoint / ckpt.MANIFEST).read_text())
    assert set(manifest["files"]) == {"model.safetensors", "ema.safetensors", "state.pt"}
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (checkpoint / name).stat().st_size and len(entry["sha256"]) == 64
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    assert state["step"] == 2 and isinstance(state["rng"][0]["numpy"]["keys"], torch.Tensor)


@pytest.mark.parametrize("name", ["ema.safetensors", "model.safetensors", "state.pt"])
def test_flipped_bytes_are_caught_on_load(trained, tmp_path, name):
    checkpoint = _copy_run(trained, tmp_path) / "checkpoints" / "0000002"
    _flip_a_byte(checkpoint / name)
    with pytest.raises(ValueError, match=f"{name} does not match the SHA-256 in its manifest"):
        ckpt.verify(checkpoint)
    if name == "ema.safetensors":
        out = tmp_path / "s.npz"
        with pytest.raises(SystemExit, match="ema.safetensors does not match"):
            sample_main(["--ckpt", str(checkpoint), "--num-samples", "2", "--steps", "2", "--out", str(out)])
        assert not out.exists()
        with pytest.raises(SystemExit, match="ema.safetensors does not match"):
            analyze_main(["--ckpt", str(checkpoint), "--samples-per-class", "1", "--steps", "2", "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match=f"{name} does not match"):
        train_main([*FAST, "--steps", "3", "--resume", str(checkpoint)])


@pytest.mark.parametrize("damage", ["corrupt", "incomplete"])
def test_resume_latest_skips_a_damaged_newest_checkpoint(trained, tmp_path, capsys, damage):
    run_dir = _copy_run(trained, tmp_path)
    newest = run_dir / "checkpoints" / "0000002"
    if damage == "corrupt":
        _flip_a_byte(newest / "model.safetensors")
    else:
        (newest / ckpt.MANIFEST).unlink()
    train_main([*FAST, "--results-dir", str(tmp_path / "runs"), "--steps", "3", "--resume", "latest"])
    warning = f"skipping checkpoint {newest}"
    assert warning in capsys.readouterr().err
    assert warning in (run_dir / "log.txt").read_text()
    # It resumed from step 1: steps 2 and 3 were trained again and saved intact.
    assert ckpt.load_state(run_dir / "checkpoints" / "0000003")["step"] == 3
    ckpt.verify(newest)


def test_resume_with_no_intact_checkpoint_says_so(trained, tmp_path):
    run_dir = _copy_run(trained, tmp_path)
    for step in ("0000001", "0000002"):
        _flip_a_byte(run_dir / "checkpoints" / step / "ema.safetensors")
    with pytest.raises(SystemExit, match="no intact checkpoint"):
        train_main([*FAST, "--steps", "3", "--resume", str(run_dir)])


def test_leftovers_of_killed_saves_are_cleared_at_the_next_start(trained, tmp_path):
    run_dir = _copy_run(trained, tmp_path)
    checkpoints = run_dir / "checkpoints"
    (checkpoints / f".0000003.tmp-{os.getpid() + 1}").mkdir()  # killed while writing step 3
    (checkpoints / ".0000003.tmp-1" / "nested").mkdir(parents=True)
    (checkpoints / "0000001").rename(checkpoints / ".0000001.old-7")  # killed while re-saving step 1
    (checkpoints / "0000002").rename(checkpoints / ".0000002.old-8")
    (checkpoints / ".0000002.old-8").rename(checkpoints / "0000002")
    assert ckpt.remove_stale(checkpoints) and sorted(p.name for p in checkpoints.iterdir()) == ["0000001", "0000002"]
    ckpt.verify(checkpoints / "0000001")

    (checkpoints / ".0000004.tmp-3").mkdir()
    train_main([*FAST, "--steps", "3", "--resume", str(run_dir)])
    assert sorted(p.name for p in checkpoints.iterdir()) == ["0000001", "0000002", "0000003"]
    assert "removed" in (run_dir / "log.txt").read_text()


class _RunsCode:
    """Unpickling this creates a file: a stand-in for arbitrary code in a crafted checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_crafted_training_state_is_refused_without_running_it(trained, tmp_path):
    checkpoint = _copy_run(trained, tmp_path) / "checkpoints" / "0000002"
    marker = tmp_path / "code-ran"
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    state["extra"] = _RunsCode(marker)
    torch.save(state, checkpoint / "state.pt")
    # The attacker rewrites the manifest too, so only the unpickling rule stands in the way.
    manifest = json.loads((checkpoint / ckpt.MANIFEST).read_text())
    manifest["files"]["state.pt"] = {"bytes": (checkpoint / "state.pt").stat().st_size, "sha256": ckpt._sha256(checkpoint / "state.pt")}
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match="refusing to load .*state.pt: it holds a reference to io.open"):
        train_main([*FAST, "--steps", "3", "--resume", str(checkpoint)])
    assert not marker.exists()


@pytest.mark.parametrize(
    "flag",
    [["--seed", "1"], ["--global-batch-size", "8"], ["--set", "num_shared_experts=0"], ["--objective", "rectified-flow"],
     ["--image-size", "16"], ["--data", "."], ["--ema-decay", "0.5"], ["--hflip"]],
    ids=lambda flag: flag[0],
)
def test_resume_refuses_flags_that_contradict_the_checkpoint(trained, tmp_path, flag):
    run_dir = _copy_run(trained, tmp_path)
    with pytest.raises(SystemExit, match=f"{flag[0]} .* contradicts the checkpoint"):
        train_main([*FAST, "--steps", "3", "--resume", str(run_dir), *flag])
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == "0000002"


def test_resume_takes_the_checkpoints_flags_and_accepts_those_that_may_change(tmp_path):
    run_dir = run(tmp_path, "--steps", "1", "--ema-decay", "0.5", "--set", "num_shared_experts=0", "--seed", "3")
    # The same flags in another order and spelling agree; --lr and --steps may change.
    train_main(["--global-batch-size", "16", "--set", "num_shared_experts=0", "--steps", "2", "--lr", "1e-3",
                "--log-every", "1", "--sample-steps", "2", "--resume", str(run_dir)])
    state = ckpt.load_state(run_dir / "checkpoints" / "0000002")
    args = state["args"]
    assert (args["ema_decay"], args["seed"], args["model"], args["lr"]) == (0.5, 3, "DiT-MoE-Ti/2-4E2A", 1e-3)
    assert state["optimizer"]["param_groups"][0]["lr"] == 1e-3
    assert state["config"]["num_shared_experts"] == 0
