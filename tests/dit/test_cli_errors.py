"""Bad numbers and bad files get a clear error before any expensive work: an argparse error (exit
code 2) for a bad flag value, a one-line ``error: ...`` naming the input otherwise."""

from pathlib import Path

import numpy as np
import pytest
import torch

from dit.convert import main as convert_main
from dit.evaluate import main as evaluate_main
from dit.sample import main as sample_main
from dit.train import main as train_main
from tests.dit.test_train import FAST, run


def _argparse_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--global-batch-size", "-4"],
        ["--global-batch-size", "0"],
        ["--ckpt-every", "0"],
        ["--log-every", "0"],
        ["--steps", "0"],
        ["--steps", "-5"],
        ["--epochs", "0"],
        ["--image-size", "0"],
        ["--lr", "0"],
        ["--lr", "nan"],
        ["--ema-decay", "1.5"],
        ["--sample-steps", "0"],
        ["--balance-alpha", "-1"],
        ["--steps", "ten"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_train_rejects_bad_numbers_while_parsing(tmp_path, capsys, argv):
    err = _argparse_error(train_main, ["--results-dir", str(tmp_path), *argv], capsys)
    assert argv[0] in err and "expected" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sample-steps", "1"], "ddpm sampling takes 2 to 1000 steps, got 1"),
        (["--set", "depth=-1"], "depth must be an integer >= 1"),
        (["--set", "hidden_size=30"], "multiple of num_heads"),
        (["--image-size", "7"], "input_size \\(7\\) must be a multiple of patch_size"),
    ],
)
def test_train_rejects_bad_settings_before_training(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        train_main([*FAST, "--results-dir", str(tmp_path), "--steps", "1", *argv])
    assert not list(tmp_path.glob("*/checkpoints"))


def test_a_corrupt_image_stops_the_run_at_the_start(tmp_path):
    from PIL import Image

    folder = tmp_path / "images" / "cat"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes(b"this is not a png")
    with pytest.raises(SystemExit, match="3.png is not a readable image"):
        train_main(
            [*FAST, "--results-dir", str(tmp_path / "runs"), "--data", str(tmp_path / "images"), "--image-size", "8"]
        )
    assert not list((tmp_path / "runs").glob("*/checkpoints"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return run(tmp_path_factory.mktemp("sample"), "--steps", "1") / "checkpoints" / "0000001"


@pytest.mark.parametrize(
    "argv",
    [["--batch-size", "0"], ["--steps", "0"], ["--num-samples", "0"], ["--num-samples", "-3"]],
    ids=lambda argv: " ".join(argv),
)
def test_sample_rejects_bad_numbers_while_parsing(checkpoint, capsys, argv):
    err = _argparse_error(sample_main, ["--ckpt", str(checkpoint), *argv], capsys)
    assert argv[0] in err


def test_sample_checks_steps_and_output_before_sampling(checkpoint, tmp_path, monkeypatch):
    import dit.sample

    def never(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(dit.sample, "generate", never)
    with pytest.raises(SystemExit, match="ddpm sampling takes 2 to 1000 steps, got 1"):
        sample_main(["--ckpt", str(checkpoint), "--steps", "1", "--out", str(tmp_path / "s.npz")])
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="--out .* cannot be written"):
        sample_main(["--ckpt", str(checkpoint), "--out", str(blocker / "s.npz")])
    with pytest.raises(SystemExit, match="--grid .* cannot be written"):
        sample_main(["--ckpt", str(checkpoint), "--grid", str(blocker / "g.png"), "--out", str(tmp_path / "s.npz")])


def test_sample_reports_the_file_it_writes(checkpoint, tmp_path, capsys):
    sample_main(["--ckpt", str(checkpoint), "--num-samples", "2", "--steps", "2", "--out", str(tmp_path / "samples")])
    assert (tmp_path / "samples.npz").is_file() and not (tmp_path / "samples").exists()
    assert f"to {tmp_path / 'samples.npz'}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]  # no temporary file left


def test_evaluate_rejects_bad_files(tmp_path):
    images = np.zeros((4, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "labels.npz", arr_0=images, arr_1=np.arange(3))
    with pytest.raises(SystemExit, match="one label per image"):
        evaluate_main([str(tmp_path / "labels.npz"), "--digits"])
    np.savez(tmp_path / "good.npz", arr_0=images, arr_1=np.arange(4))
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="truncated.npz is not a readable .npz"):
        evaluate_main([str(tmp_path / "truncated.npz"), "--digits"])
    (tmp_path / "inception.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(SystemExit, match="--allow-pickle"):
        evaluate_main(
            [
                str(tmp_path / "good.npz"),
                str(tmp_path / "good.npz"),
                "--inception-weights",
                str(tmp_path / "inception.pkl"),
            ]
        )


def test_evaluate_loads_a_pickled_inception_only_when_allowed(tmp_path):
    import pickle

    from tests.dit.test_evaluate import FakeInception, _digits_npz

    _digits_npz(tmp_path / "a.npz")
    with open(tmp_path / "inception.pkl", "wb") as handle:
        pickle.dump(FakeInception(), handle)
    evaluate_main(
        [
            str(tmp_path / "a.npz"),
            str(tmp_path / "a.npz"),
            "--inception-weights",
            str(tmp_path / "inception.pkl"),
            "--allow-pickle",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert (tmp_path / "r.json").is_file()


@pytest.mark.parametrize(
    "content, message",
    [
        ([1, 2, 3], "got a list"),
        ({"x_embedder.proj.weight": torch.zeros(4, 1, 2, 2)}, "lacks final_layer.linear.weight"),
        ({"model": {"a": 1}}, "expected a state dict of tensors"),
    ],
    ids=["not a dict", "missing keys", "not tensors"],
)
def test_convert_rejects_what_is_not_an_official_checkpoint(tmp_path, content, message):
    torch.save(content, tmp_path / "in.pt")
    with pytest.raises(SystemExit, match=message):
        convert_main([str(tmp_path / "in.pt"), str(tmp_path / "out.safetensors")])
    assert not (tmp_path / "out.safetensors").exists()


def test_an_impossible_results_dir_is_one_line_on_every_process(tmp_path):
    from tests.distributed.helpers import torchrun

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=f"error: --results-dir {blocker / 'runs'} cannot be written"):
        train_main([*FAST, "--results-dir", str(blocker / "runs")])
    result = torchrun(2, "dit.train", *FAST, "--results-dir", str(blocker / "runs"), check=False, timeout=120)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert ours == [f"error: --results-dir {blocker / 'runs'} cannot be written: Not a directory"], result.stderr
    assert "Connection" not in result.stderr and "dit/train.py" not in result.stderr, result.stderr


def test_evaluate_refuses_labels_outside_the_digits(tmp_path):
    images = np.full((3, 8, 8, 1), 128, dtype=np.uint8)
    for labels, shown in (
        (np.array([0, 4, 12]), r"labels in \[0, 12\]"),
        (np.array([0.5, 1.0, 2.0]), "float64 labels"),
    ):
        np.savez(tmp_path / "s.npz", arr_0=images, arr_1=labels)
        with pytest.raises(
            SystemExit, match=rf"arr_1 must hold integer labels in \[0, 10\) for the digits report, got {shown}"
        ):
            evaluate_main([str(tmp_path / "s.npz"), "--digits"])


def test_a_damaged_checkpoint_and_a_layout_that_does_not_fit_are_one_line_under_torchrun(tmp_path):
    """Every process finds the same fault; the main one says it, once, and none shows a traceback
    of its own (torchrun's banner about the failed workers follows)."""
    from tests.distributed.helpers import torchrun
    from tests.dit.test_inputs import _rewrite, _with_config

    checkpoint = run(tmp_path, "--steps", "1") / "checkpoints" / "0000001"
    for name in ("model.safetensors", "ema.safetensors"):
        _rewrite(checkpoint, name, _with_config(lambda config: {**config, "depth": "4"}))
    for argv, message in (
        (["dit.sample", "--ckpt", str(checkpoint), "--out", str(tmp_path / "s.npz"), "--num-samples", "2"],
         f"error: checkpoint {checkpoint / 'ema.safetensors'} holds a damaged model config: depth must be an integer"),
        (["dit.train", *FAST, "--steps", "1", "--ep", "3", "--results-dir", str(tmp_path / "runs")],
         "error: --ep 3 must divide the number of processes (2)"),
    ):  # fmt: skip
        result = torchrun(2, *argv, check=False, timeout=120)
        ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode != 0 and len(ours) == 1 and ours[0].startswith(message), result.stderr
        assert "Connection" not in result.stderr and "/dit/" not in result.stderr, result.stderr
