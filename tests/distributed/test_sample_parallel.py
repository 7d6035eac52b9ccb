"""dit.sample over processes: the same .npz for any number of them, and resuming from shards."""

from pathlib import Path

import numpy as np
import pytest
import torch

import dit.sample
from dit.checkpoint import save_weights
from dit.models import create_model
from dit.sample import main as sample_main
from tests.distributed.helpers import torchrun

# 7 samples in shards of 3 (3 + 3 + 1), batches of 2: every boundary falls somewhere odd.
SMALL = ["--num-samples", "7", "--shard-size", "3", "--batch-size", "2", "--steps", "3", "--cfg-scale", "2"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("DiT-MoE-Ti/2-4E2A", input_size=8, in_channels=1, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_weights(model.state_dict(), path, model.config)
    return path


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        return data["arr_0"], data["arr_1"]


@pytest.mark.parametrize("sampler, processes", [("ddpm", 2), ("ddim", 2), ("ddpm", 4)])
def test_the_npz_is_the_same_for_any_number_of_processes(tmp_path, weights, sampler, processes):
    """4 processes for 3 shards: one process has none and only waits for the merge. The single
    process runs one thread, as torchrun's workers do (OMP_NUM_THREADS=1): the guarantee is at
    equal thread counts, since CPU products sum in another order with more threads."""
    args = ["--ckpt", str(weights), *SMALL, "--sampler", sampler]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sample_main([*args, "--out", str(tmp_path / "one.npz")])
    finally:
        torch.set_num_threads(threads)
    result = torchrun(processes, "dit.sample", *args, "--out", str(tmp_path / "many.npz"))
    assert f"samples (process 0 of {processes}" in result.stderr  # one progress bar, the main process's
    one, many = _read(tmp_path / "one.npz"), _read(tmp_path / "many.npz")
    assert one[0].shape == (7, 8, 8, 1) and one[0].dtype == np.uint8 and one[1].dtype == np.int64
    assert np.array_equal(one[0], many[0]) and np.array_equal(one[1], many[1])
    assert np.array_equal(one[1], np.arange(7) % 10)
    assert not (tmp_path / "one.npz.parts").exists() and not (tmp_path / "many.npz.parts").exists()


def test_an_interrupted_run_resumes_from_its_shards(tmp_path, weights, monkeypatch):
    args = ["--ckpt", str(weights), *SMALL]
    sample_main([*args, "--out", str(tmp_path / "straight.npz")])

    drawn = []
    real_generate, real_write = dit.sample.generate, dit.sample.ShardedRun.write

    def counting_generate(model, labels, *a, first_index, **kw):
        drawn.extend(range(first_index, first_index + len(labels)))
        return real_generate(model, labels, *a, first_index=first_index, **kw)

    def write_then_die(self, first, end, images, labels):
        real_write(self, first, end, images, labels)
        if first == 0:
            raise KeyboardInterrupt  # the job is killed after its first shard

    monkeypatch.setattr(dit.sample, "generate", counting_generate)
    monkeypatch.setattr(dit.sample.ShardedRun, "write", write_then_die)
    out = tmp_path / "resumed.npz"
    with pytest.raises(KeyboardInterrupt):
        sample_main([*args, "--out", str(out)])
    assert not out.exists() and sorted(p.name for p in (tmp_path / "resumed.npz.parts").iterdir()) == [
        "settings.json",
        "shard-000000000-000000003.npz",
    ]
    sample_main([*args, "--out", str(out)])
    assert sorted(drawn) == list(range(7))  # every sample drawn once: none twice, none lost
    straight, resumed = _read(tmp_path / "straight.npz"), _read(out)
    assert np.array_equal(straight[0], resumed[0]) and np.array_equal(straight[1], resumed[1])


def test_resuming_with_other_settings_is_refused(tmp_path, weights, monkeypatch):
    args = ["--ckpt", str(weights), *SMALL, "--out", str(tmp_path / "s.npz")]
    real_write = dit.sample.ShardedRun.write

    def write_then_die(self, *a):
        real_write(self, *a)
        raise KeyboardInterrupt

    monkeypatch.setattr(dit.sample.ShardedRun, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        sample_main(args)
    monkeypatch.undo()
    with pytest.raises(SystemExit, match=r"other settings \(cfg_scale 2.0 -> 3.0\)"):
        sample_main([*args, "--cfg-scale", "3"])
    # A damaged shard is drawn again, with a warning, and the run finishes.
    shard = next((tmp_path / "s.npz.parts").glob("shard-*"))
    shard.write_bytes(shard.read_bytes()[:50])
    sample_main(args)
    assert _read(tmp_path / "s.npz")[0].shape == (7, 8, 8, 1)
