"""``dit.train --ep``/``--fsdp`` on 2 and 4 CPU processes: the same losses as one process with
the same global batch, sharded checkpoints that resume in other layouts, and
``python -m dit.checkpoint consolidate``."""

import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.testing._internal.distributed.fake_pg import FakeStore

from dit import checkpoint as ckpt
from dit import parallel
from dit.checkpoint import main as checkpoint_main
from dit.models import create_model
from dit.sample import main as sample_main
from dit.train import main as train_main
from tests.distributed.helpers import torchrun, torchrun_nodes

STEPS = 10
# The balance loss is each process's own (as in the official code), so it would make the runs
# differ; without it, a run does not depend on how it is laid out.
ARGS = [
    "--global-batch-size",
    "16",
    "--steps",
    str(STEPS),
    "--log-every",
    "1",
    "--sample-steps",
    "2",
    "--balance-alpha",
    "0",
    "--ckpt-every",
    "6",
    "--set",
    "depth=2",
]


def losses(run_dir: Path) -> dict[int, float]:
    found = re.findall(r"step +(\d+) \| loss ([0-9.]+)", (run_dir / "log.txt").read_text())
    return {int(step): float(loss) for step, loss in found}


def determined(name: str, value: torch.Tensor) -> torch.Tensor:
    """What the mathematics fixes of a trained parameter. Softmax attention ignores the key bias
    (it adds the same ``q . b_k`` to every logit of a query), so that bias's gradient is pure
    rounding noise, which Adam turns into steps of about the learning rate: its value depends on
    the CPU and the thread count. The query and value biases are compared; the key bias is not."""
    if not name.endswith("qkv.bias"):
        return value
    q, _, v = value.chunk(3)
    return torch.cat([q, v])


def only_run(results: Path) -> Path:
    (run_dir,) = results.glob("[0-9][0-9][0-9]-*")
    return run_dir


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("one")
    train_main([*ARGS, "--results-dir", str(results)])
    return only_run(results)


def test_parallel_training_matches_one_process(one_process, tmp_path):
    expected = losses(one_process)
    assert sorted(expected) == list(range(1, STEPS + 1))

    def check(run_dir: Path, steps: range, layout: str) -> None:
        got = losses(run_dir)
        assert sorted(got) == list(steps), layout
        for step in steps:
            assert got[step] == pytest.approx(expected[step], rel=2e-5, abs=2e-6), (layout, step)
        assert layout in (run_dir / "log.txt").read_text()

    torchrun(2, "dit.train", *ARGS, "--ep", "2", "--results-dir", str(tmp_path / "ep"))
    check(only_run(tmp_path / "ep"), range(1, STEPS + 1), "2 process(es) (data 1 x expert 2)")
    torchrun(
        4, "dit.train", *ARGS, "--ep", "2", "--fsdp", "--grad-checkpointing", "--results-dir", str(tmp_path / "fsdp")
    )
    run_dir = only_run(tmp_path / "fsdp")
    check(run_dir, range(1, STEPS + 1), "4 process(es) (data 2 x expert 2, FSDP)")

    # The sharded checkpoint holds the one-process run's weights.
    sharded = run_dir / "checkpoints" / f"{STEPS:07d}"
    assert ckpt.is_sharded(sharded)
    checkpoint_main(["verify", str(sharded)])
    out = tmp_path / "ema.safetensors"
    checkpoint_main(["consolidate", str(sharded), str(out)])
    reference = one_process / "checkpoints" / f"{STEPS:07d}" / "ema.safetensors"
    want, got = load_file(reference), load_file(out)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(
            determined(name, got[name]),
            determined(name, want[name]),
            atol=1e-5,
            rtol=1e-4,
            msg=lambda m: f"{name}: {m}",
        )
    assert ckpt.read_config(out) == ckpt.read_config(reference)
    # A damaged shard stops every reader of the sharded checkpoint, the model weights as the EMA.
    damaged = tmp_path / "damaged" / sharded.name
    shutil.copytree(sharded, damaged)
    shard = next((damaged / ckpt.SHARDED_DIR).glob("__0_*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1] + bytes([shard.read_bytes()[-1] ^ 0xFF]))
    for which in ("model", "ema"):
        with pytest.raises(SystemExit, match=f"{shard.name} does not match the SHA-256"):
            checkpoint_main(["consolidate", str(damaged), str(tmp_path / "w.safetensors"), "--which", which])
    # dit.sample reads a sharded checkpoint directly.
    sample_main(["--ckpt", str(sharded), "--num-samples", "2", "--steps", "2", "--out", str(tmp_path / "samples")])
    assert (tmp_path / "samples.npz").is_file()

    # Step 6 of the 4-process FSDP run, resumed in other layouts: the rest of the run as before.
    # On one process, --ep 2 --fsdp (taken from the checkpoint, not given again) cannot hold:
    # the layout follows the processes, and the log says so.
    for nproc, flags, layout in (
        (4, ["--no-fsdp"], "4 process(es) (data 2 x expert 2)"),
        (2, ["--ep", "1"], "2 process(es) (data 2 x expert 1, FSDP)"),
        (1, [], "resuming with --ep 1 --no-fsdp on 1 process(es)"),
    ):
        resumed = tmp_path / f"resume{nproc}"
        shutil.copytree(run_dir, resumed / run_dir.name)
        shutil.rmtree(resumed / run_dir.name / "checkpoints" / f"{STEPS:07d}")
        (resumed / run_dir.name / "log.txt").unlink()
        argv = ["dit.train", "--resume", "latest", "--results-dir", str(resumed), *flags]
        if nproc == 1:
            train_main(argv[1:])
        else:
            torchrun(nproc, *argv)
        check(resumed / run_dir.name, range(7, STEPS + 1), layout)


def test_two_nodes_by_the_c10d_rendezvous_train_as_one_process(one_process, tmp_path):
    """Two torchrun agents (one process each, ``--nnodes 2 --node-rank 0|1 --rdzv-backend c10d``)
    joined on localhost, as on two machines, train an ``--ep 2`` model: the losses of one process."""
    torchrun_nodes(2, "dit.train", *ARGS, "--steps", "5", "--ep", "2", "--results-dir", str(tmp_path))
    run_dir = only_run(tmp_path)
    assert "2 process(es) (data 1 x expert 2)" in (run_dir / "log.txt").read_text()
    got, expected = losses(run_dir), losses(one_process)
    assert sorted(got) == list(range(1, 6))
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], rel=2e-5, abs=2e-6), step


def test_layout_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--ep 2 must divide the number of processes"):
        train_main([*ARGS, "--ep", "2", "--results-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--fsdp shards over several processes"):
        train_main([*ARGS, "--fsdp", "--results-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        train_main([*ARGS, "--ep", "0", "--results-dir", str(tmp_path)])
    assert exit_info.value.code == 2


def test_ep_must_divide_the_experts():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        model = create_model("DiT-MoE-Ti/2-8E2A", input_size=8, in_channels=1, num_classes=10, num_experts=3, top_k=1)
        with pytest.raises(ValueError, match=r"--ep 2 must divide the experts per layer \(3 in DiT-MoE-Ti/2-8E2A\)"):
            parallel.shard_experts(model, parallel.build_mesh(2, 2, torch.device("cpu")))
        dense = create_model("DiT-Ti/2", input_size=8, in_channels=1, num_classes=10)
        with pytest.raises(ValueError, match="needs a model with MoE layers"):
            parallel.shard_experts(dense, parallel.build_mesh(2, 2, torch.device("cpu")))
    finally:
        dist.destroy_process_group()
