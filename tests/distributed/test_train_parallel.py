"""``dit.train --ep`` on 1, 2 and 4 CPU processes: the same losses as one process with the same
global batch, sharded checkpoints that resume on another number of processes, and
``python -m dit.checkpoint consolidate``."""

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dit import checkpoint as ckpt
from dit.checkpoint import main as checkpoint_main
from dit.sample import main as sample_main
from dit.train import main as train_main
from tests.distributed.helpers import torchrun

STEPS = 20
# The balance loss is each process's own (as in the official code), so it would make the runs
# differ; without it, a run does not depend on how it is laid out.
ARGS = ["--global-batch-size", "32", "--steps", str(STEPS), "--log-every", "1", "--sample-steps", "2",
        "--balance-alpha", "0", "--ckpt-every", "10"]


def losses(run_dir: Path) -> dict[int, float]:
    found = re.findall(r"step +(\d+) \| loss ([0-9.]+)", (run_dir / "log.txt").read_text())
    return {int(step): float(loss) for step, loss in found}


def only_run(results: Path) -> Path:
    (run_dir,) = results.glob("[0-9][0-9][0-9]-*")
    return run_dir


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("one")
    train_main([*ARGS, "--results-dir", str(results)])
    return only_run(results)


def test_expert_parallel_training_matches_one_process(one_process, tmp_path):
    expected = losses(one_process)
    assert sorted(expected) == list(range(1, STEPS + 1))
    for nproc in (2, 4):  # expert x data parallel: 1 x 2, then 2 x 2
        torchrun(nproc, "dit.train", *ARGS, "--ep", "2", "--results-dir", str(tmp_path / str(nproc)))
        run_dir = only_run(tmp_path / str(nproc))
        got = losses(run_dir)
        assert got.keys() == expected.keys()
        for step in expected:
            assert got[step] == pytest.approx(expected[step], rel=2e-5, abs=2e-6), (nproc, step)
        assert "4 process(es) (data 2 x expert 2)" in (run_dir / "log.txt").read_text() or nproc == 2

    # The 4-process run's sharded checkpoint holds the same weights as the one-process run's.
    sharded = run_dir / "checkpoints" / f"{STEPS:07d}"
    assert ckpt.is_sharded(sharded)
    checkpoint_main(["verify", str(sharded)])
    out = tmp_path / "ema.safetensors"
    checkpoint_main(["consolidate", str(sharded), str(out)])
    want = load_file(one_process / "checkpoints" / f"{STEPS:07d}" / "ema.safetensors")
    got = load_file(out)
    assert got.keys() == want.keys()
    for name in want:
        # Attention ignores the key bias, so its gradient is rounding noise, which Adam scales to
        # steps of about the learning rate: it may differ more.
        atol = 1e-4 if name.endswith("qkv.bias") else 1e-5
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert ckpt.read_config(out) == ckpt.read_config(one_process / "checkpoints" / f"{STEPS:07d}" / "ema.safetensors")

    # dit.sample reads the sharded checkpoint directly.
    sample_main(["--ckpt", str(sharded), "--num-samples", "2", "--steps", "2", "--out", str(tmp_path / "samples")])
    assert (tmp_path / "samples.npz").is_file()

    # Written by 4 processes, resumed by 2 (expert-parallel 2) and by 1: the rest of the run as before.
    for nproc in (2, 1):
        resumed = tmp_path / f"resume{nproc}"
        shutil.copytree(run_dir, resumed / run_dir.name)
        shutil.rmtree(resumed / run_dir.name / "checkpoints" / f"{STEPS:07d}")
        (resumed / run_dir.name / "log.txt").unlink()
        if nproc == 1:
            train_main(["--resume", "latest", "--results-dir", str(resumed), "--ep", "1"])
        else:
            torchrun(nproc, "dit.train", "--resume", "latest", "--results-dir", str(resumed))
        got = losses(resumed / run_dir.name)
        assert sorted(got) == list(range(11, STEPS + 1))
        for step in got:
            assert got[step] == pytest.approx(expected[step], rel=2e-5, abs=2e-6), (nproc, step)


def test_ep_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--ep 2 must divide the number of processes"):
        train_main([*ARGS, "--ep", "2", "--results-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        train_main([*ARGS, "--ep", "0", "--results-dir", str(tmp_path)])
    assert exit_info.value.code == 2


def test_ep_must_divide_the_experts(tmp_path):
    result = torchrun(2, "dit.train", *ARGS, "--ep", "2", "--set", "num_experts=3", "--set", "top_k=1",
                      "--results-dir", str(tmp_path), check=False)
    assert result.returncode != 0
    assert "--ep 2 must divide the experts per layer (3 in DiT-MoE-Ti/2-8E2A)" in result.stderr
