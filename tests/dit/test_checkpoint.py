"""Checkpoints a user can trust: a manifest checked on load, resuming past a corrupt checkpoint,
leftovers of killed saves cleared, training state that never runs code, flags that must agree."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dit import checkpoint as ckpt
from dit.analyze import main as analyze_main
from dit.files import sha256
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
            analyze_main(
                ["--ckpt", str(checkpoint), "--samples-per-class", "1", "--steps", "2", "--out", str(tmp_path / "r")]
            )
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
    manifest["files"]["state.pt"] = {
        "bytes": (checkpoint / "state.pt").stat().st_size,
        "sha256": sha256(checkpoint / "state.pt"),
    }
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match="refusing to load .*state.pt: it holds a reference to io.open"):
        train_main([*FAST, "--steps", "3", "--resume", str(checkpoint)])
    assert not marker.exists()


@pytest.mark.parametrize(
    "flag",
    [
        ["--seed", "1"],
        ["--global-batch-size", "8"],
        ["--set", "num_shared_experts=0"],
        ["--objective", "rectified-flow"],
        ["--image-size", "16"],
        ["--data", "."],
        ["--ema-decay", "0.5"],
        ["--hflip"],
    ],
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
    train_main(
        [
            "--global-batch-size",
            "16",
            "--set",
            "num_shared_experts=0",
            "--steps",
            "2",
            "--lr",
            "1e-3",
            "--log-every",
            "1",
            "--sample-steps",
            "2",
            "--resume",
            str(run_dir),
        ]
    )
    state = ckpt.load_state(run_dir / "checkpoints" / "0000002")
    args = state["args"]
    assert (args["ema_decay"], args["seed"], args["model"], args["lr"]) == (0.5, 3, "DiT-MoE-Ti/2-4E2A", 1e-3)
    assert state["optimizer"]["param_groups"][0]["lr"] == 1e-3
    assert state["config"]["num_shared_experts"] == 0


# --- No command writes into a checkpoint, and every checkpoint is judged by one manifest schema.


@pytest.mark.parametrize("command", ["consolidate", "sample", "grid", "analyze", "export", "evaluate", "train"])
def test_no_command_writes_into_a_checkpoint(trained, tmp_path, command):
    from dit.evaluate import main as evaluate_main
    from dit.export import main as export_main

    checkpoint = _copy_run(trained, tmp_path) / "checkpoints" / "0000002"
    inside = checkpoint / "sub" / ("out.pt2" if command == "export" else "out")
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=np.full((2, 8, 8, 1), 7, dtype=np.uint8), arr_1=np.arange(2))
    main, argv = {
        "consolidate": (ckpt.main, ["consolidate", str(checkpoint), str(checkpoint / "model.safetensors")]),
        "sample": (sample_main, ["--ckpt", str(checkpoint), "--out", str(inside)]),
        "grid": (sample_main, ["--ckpt", str(checkpoint), "--out", str(tmp_path / "x.npz"), "--grid", str(inside)]),
        "analyze": (analyze_main, ["--ckpt", str(checkpoint), "--out", str(inside)]),
        "export": (export_main, ["--ckpt", str(checkpoint), "--out", str(inside)]),
        "evaluate": (evaluate_main, [str(samples), "--digits", "--json", str(inside)]),
        "train": (train_main, [*FAST, "--results-dir", str(inside)]),
    }[command]
    with pytest.raises(SystemExit, match=f"lies inside the checkpoint {checkpoint}"):
        main(argv)
    ckpt.verify(checkpoint)


_MALFORMED = {
    "files a list": lambda m: {**m, "files": list(m["files"])},
    "bytes a string": lambda m: {**m, "files": {**m["files"], "state.pt": {**m["files"]["state.pt"], "bytes": "12"}}},
    "no sha256": lambda m: {**m, "files": {**m["files"], "state.pt": {"bytes": m["files"]["state.pt"]["bytes"]}}},
    "an entry with more keys": lambda m: {
        **m,
        "files": {**m["files"], "state.pt": {**m["files"]["state.pt"], "mode": 420}},
    },
    "sha256 not hex": lambda m: {
        **m,
        "files": {**m["files"], "state.pt": {**m["files"]["state.pt"], "sha256": "x" * 64}},
    },
    "a path outside": lambda m: {**m, "files": {**m["files"], "../other/state.pt": m["files"]["state.pt"]}},
    "no format": lambda m: {key: value for key, value in m.items() if key != "format"},
    "another step": lambda m: {**m, "step": 7},
    "not an object": lambda m: [m],
}


@pytest.mark.parametrize("damage", sorted(_MALFORMED))
def test_a_malformed_manifest_is_refused_and_skipped_on_resume(trained, tmp_path, capsys, damage):
    run_dir = _copy_run(trained, tmp_path)
    newest = run_dir / "checkpoints" / "0000002"
    manifest = json.loads((newest / ckpt.MANIFEST).read_text())
    (newest / ckpt.MANIFEST).write_text(json.dumps(_MALFORMED[damage](manifest)))
    with pytest.raises(ckpt.CheckpointError, match=f"{ckpt.MANIFEST} is malformed"):
        ckpt.verify(newest)
    with pytest.raises(SystemExit, match="error: .*malformed"):
        ckpt.main(["verify", str(newest)])
    train_main([*FAST, "--results-dir", str(tmp_path / "runs"), "--steps", "3", "--resume", "latest"])
    assert f"skipping checkpoint {newest}" in capsys.readouterr().err
    assert "resumed from " + str(run_dir / "checkpoints" / "0000001") in (run_dir / "log.txt").read_text()


def test_a_file_the_manifest_does_not_list_fails_verification(trained, tmp_path, capsys):
    run_dir = _copy_run(trained, tmp_path)
    newest = run_dir / "checkpoints" / "0000002"
    (newest / "notes.txt").write_text("added later")
    with pytest.raises(ckpt.CheckpointError, match="holds notes.txt, which its manifest.json does not list"):
        ckpt.verify(newest)
    train_main([*FAST, "--results-dir", str(tmp_path / "runs"), "--steps", "3", "--resume", "latest"])
    assert f"skipping checkpoint {newest}" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["ema", "model"])
def test_every_command_verifies_the_weights_it_loads(trained, tmp_path, which):
    from dit.export import main as export_main

    checkpoint = _copy_run(trained, tmp_path) / "checkpoints" / "0000002"
    _flip_a_byte(checkpoint / f"{which}.safetensors")
    other = "model" if which == "ema" else "ema"
    ckpt.load_weights(checkpoint, other)  # the intact file still loads
    failure = f"{which}.safetensors does not match the SHA-256"
    with pytest.raises(ckpt.CheckpointError, match=failure):
        ckpt.load_weights(checkpoint, which)
    with pytest.raises(ckpt.CheckpointError, match=failure):
        ckpt.build_from_checkpoint(checkpoint, which)
    with pytest.raises(SystemExit, match=failure):
        ckpt.main(["consolidate", str(checkpoint), str(tmp_path / "w.safetensors"), "--which", which])
    assert not (tmp_path / "w.safetensors").exists()
    with pytest.raises(SystemExit, match=failure):
        train_main([*FAST, "--steps", "3", "--resume", str(checkpoint)])
    if which == "ema":  # sampling, analysis and export read the EMA weights
        with pytest.raises(SystemExit, match=failure):
            export_main(["--ckpt", str(checkpoint), "--out", str(tmp_path / "m.pt2")])


def test_checkpoint_files_share_one_mode_and_the_resume_is_logged(trained, tmp_path):
    from dit.files import default_file_mode

    run_dir = _copy_run(trained, tmp_path)
    checkpoint = run_dir / "checkpoints" / "0000002"
    modes = {path.name: path.stat().st_mode & 0o777 for path in checkpoint.iterdir()}
    assert set(modes.values()) == {default_file_mode()}, modes
    out = tmp_path / "ema.safetensors"
    ckpt.main(["consolidate", str(checkpoint), str(out)])
    assert out.stat().st_mode & 0o777 == default_file_mode()
    train_main([*FAST, "--steps", "3", "--resume", str(run_dir)])
    assert f"resumed from {checkpoint} (step 2)" in (run_dir / "log.txt").read_text()


# --- A restarted job never trips over the one before it.


def test_a_second_job_waits_for_the_run_then_names_its_holder(trained, tmp_path, monkeypatch, capsys):
    import dit.train_args
    from dit.run_lock import RunLock

    run_dir = _copy_run(trained, tmp_path)
    held = RunLock()
    held.acquire(run_dir)
    monkeypatch.setattr(dit.train_args, "LOCK_WAIT", 0.5)
    try:
        with pytest.raises(SystemExit, match=f"run {run_dir} is in use by process {os.getpid()} on "):
            train_main([*FAST, "--steps", "3", "--resume", str(run_dir)])
        assert "waiting up to 0 s for it to end" in capsys.readouterr().err
        assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == "0000002"
    finally:
        held.release()
    train_main([*FAST, "--steps", "3", "--resume", str(run_dir)])  # free again
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == "0000003"


def test_the_lock_of_a_killed_job_is_free_at_once(trained, tmp_path):
    import subprocess
    import sys

    from dit.run_lock import LOCK_FILE

    run_dir = _copy_run(trained, tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from dit.run_lock import RunLock; "
            f"RunLock().acquire(Path({str(run_dir)!r})); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert f'"pid": {holder.pid}' in (run_dir / LOCK_FILE).read_text()
    finally:
        holder.kill()
        holder.wait()
    train_main([*FAST, "--steps", "3", "--resume", str(run_dir)])
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == "0000003"


def test_a_refused_new_run_leaves_no_directory(tmp_path):
    with pytest.raises(SystemExit, match="ddpm sampling takes 2 to 1000 steps"):
        train_main([*FAST, "--results-dir", str(tmp_path), "--sample-steps", "1"])
    assert list(tmp_path.iterdir()) == []


def test_cleanup_tolerates_files_vanishing_and_appearing_under_it(tmp_path):
    import threading

    checkpoints = tmp_path / "checkpoints"
    leftover = checkpoints / ".0000003.tmp-1" / "sharded"
    leftover.mkdir(parents=True)
    for i in range(200):
        (leftover / f"__0_{i}.distcp").write_bytes(b"x")

    def straggler():  # a worker of the killed job, still writing its shards and removing others
        for i in range(2000):
            try:
                (leftover / f"__1_{i}.distcp").write_bytes(b"y")
                (leftover / f"__0_{i % 200}.distcp").unlink(missing_ok=True)
            except FileNotFoundError:  # its directory is gone
                return

    thread = threading.Thread(target=straggler)
    thread.start()
    try:
        assert ckpt.remove_stale(checkpoints) == [f"removed {leftover.parent}, left by an interrupted save"]
    finally:
        thread.join()
    assert not leftover.parent.exists()


def test_a_worker_whose_agent_is_gone_stops_without_saving(tmp_path, monkeypatch):
    import dit.parallel

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    parents = iter([os.getppid(), os.getppid()])
    monkeypatch.setattr(dit.parallel.os, "getppid", lambda: next(parents, 1))  # the agent dies after the first step
    with pytest.raises(dit.parallel.AgentGone, match="torchrun agent that started process .* is gone"):
        train_main([*FAST, "--results-dir", str(tmp_path), "--steps", "3", "--ckpt-every", "1"])
    (run_dir,) = tmp_path.iterdir()
    assert not any((run_dir / "checkpoints").iterdir())
    assert not (run_dir / "samples.png").exists()


def test_the_lock_record_replaces_a_longer_stale_one(tmp_path):
    """The holder's record is written over whatever a killed job left, truncated: a longer stale
    record would leave its tail behind and the file would not parse."""
    from dit.run_lock import LOCK_FILE, RunLock

    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "x" * 500, "pid": 1, "since": "long ago"}))
    lock = RunLock()
    lock.acquire(tmp_path)
    try:
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] != "x" * 500
    finally:
        lock.release()
