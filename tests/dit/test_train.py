import errno
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dit import checkpoint as ckpt
from dit.analyze import main as analyze_main
from dit.export import main as export_main
from dit.files import is_checkpoint
from dit.precision import use_precision
from dit.sample import main as sample_main
from dit.train import main as train_main
from tests.distributed.helpers import torchrun

FAST = ["--model", "DiT-MoE-Ti/2-4E2A", "--global-batch-size", "16", "--sample-steps", "2", "--log-every", "1"]


def run(tmp_path: Path, *args: str) -> Path:
    train_main([*FAST, "--results-dir", str(tmp_path), *args])
    return sorted(tmp_path.glob("[0-9][0-9][0-9]-*"))[-1]


def weights(checkpoint: Path) -> dict:
    return {name: load_file(checkpoint / name) for name in ckpt.WEIGHT_FILES}


def test_train_writes_checkpoint_log_and_samples(tmp_path):
    run_dir = run(tmp_path, "--steps", "3")
    assert (run_dir / "samples.png").is_file()
    log = (run_dir / "log.txt").read_text()
    assert "| aux " in log and "expert load" in log
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert latest.name == "0000003" and is_checkpoint(latest)
    state = ckpt.load_state(latest)
    assert state["step"] == 3 and "optimizer" in state and len(state["rng"]) == 1


def test_resume_continues_exactly(tmp_path):
    straight = run(tmp_path / "a", "--steps", "4", "--ckpt-every", "2")
    run(tmp_path / "b", "--steps", "2")
    resumed = run(tmp_path / "b", "--steps", "4", "--resume", "latest")
    assert resumed.name.startswith("000")
    expected = weights(straight / "checkpoints" / "0000004")
    got = weights(resumed / "checkpoints" / "0000004")
    for name in ckpt.WEIGHT_FILES:
        assert expected[name].keys() == got[name].keys()
        for key in expected[name]:
            assert torch.equal(expected[name][key], got[name][key]), (name, key)


def test_a_full_disk_mid_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run_dir = run(tmp_path, "--steps", "2")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SystemExit, match="No space left on device; the last checkpoint, .*0000002, is intact"):
        run(tmp_path, "--steps", "3", "--resume", str(run_dir))
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["0000002"]  # no partial directory
    ckpt.verify(run_dir / "checkpoints" / "0000002")
    ckpt.load_state(run_dir / "checkpoints" / "0000002")


def test_corrupt_and_mismatched_checkpoints_give_clear_errors(tmp_path):
    run_dir = run(tmp_path, "--steps", "1")
    checkpoint = run_dir / "checkpoints" / "0000001"
    with pytest.raises(SystemExit, match="--model 'DiT-MoE-Ti/2-8E2A' contradicts the checkpoint"):
        train_main(
            [
                *FAST,
                "--results-dir",
                str(tmp_path),
                "--model",
                "DiT-MoE-Ti/2-8E2A",
                "--steps",
                "2",
                "--resume",
                str(checkpoint),
            ]
        )
    state, config = ckpt.load_weights(checkpoint, "model")
    state["blocks.0.ffn.w_in"] = state["blocks.0.ffn.w_in"][:2]
    from dit.models import DiT

    with pytest.raises(ValueError, match="blocks.0.ffn.w_in"):
        ckpt.load_into(DiT(config), state, checkpoint)
    (checkpoint / "ema.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="ema.safetensors is 22 bytes, its manifest says"):
        ckpt.build_from_checkpoint(checkpoint)
    with pytest.raises(SystemExit, match="not a directory"):
        train_main(["--data", str(tmp_path / "missing")])


def test_sample_cli(tmp_path):
    run_dir = run(tmp_path, "--steps", "1")
    checkpoint = run_dir / "checkpoints" / "0000001"
    out, grid = tmp_path / "s.npz", tmp_path / "g.png"
    sample_main(
        ["--ckpt", str(checkpoint), "--num-samples", "12", "--steps", "3", "--out", str(out), "--grid", str(grid)]
    )
    data = np.load(out)
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (12, 8, 8, 1)
    assert data["arr_1"].dtype == np.int64 and data["arr_1"].tolist() == [i % 10 for i in range(12)]
    assert grid.is_file()
    sample_main(
        [
            "--ckpt",
            str(checkpoint),
            "--num-samples",
            "3",
            "--steps",
            "2",
            "--class",
            "7",
            "--sampler",
            "ddim",
            "--out",
            str(out),
        ]
    )
    assert np.load(out)["arr_1"].tolist() == [7, 7, 7]
    with pytest.raises(SystemExit, match="class"):
        sample_main(["--ckpt", str(checkpoint), "--class", "10", "--out", str(out)])


def test_precisions(tmp_path):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    run_dir = run(tmp_path, "--steps", "1", "--precision", "bf16")
    out = tmp_path / "s.npz"
    for precision in ("bf16", "fp32"):
        sample_main(
            [
                "--ckpt",
                str(run_dir / "checkpoints" / "0000001"),
                "--num-samples",
                "2",
                "--steps",
                "2",
                "--precision",
                precision,
                "--out",
                str(out),
            ]
        )
        assert np.load(out)["arr_0"].shape == (2, 8, 8, 1)
    # The switches are torch's globals: each command sets them for its own run only.
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with use_precision("tf32", torch.device("cpu")):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with use_precision("fp32", torch.device("cpu")):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with pytest.raises(ValueError, match="precision"):
        with use_precision("fp16", torch.device("cpu")):
            pass


def test_rectified_flow_objective(tmp_path):
    run_dir = run(tmp_path, "--steps", "2", "--objective", "rectified-flow")
    _, config = ckpt.load_weights(run_dir / "checkpoints" / "0000002")
    assert config.objective == "rectified-flow" and not config.learn_sigma


def test_two_process_ddp_on_gloo(tmp_path):
    torchrun(2, "dit.train", *FAST, "--steps", "2", "--results-dir", str(tmp_path))
    run_dir = sorted(tmp_path.glob("[0-9][0-9][0-9]-*"))[-1]
    state = ckpt.load_state(run_dir / "checkpoints" / "0000002")
    assert state["world_size"] == 2 and len(state["rng"]) == 2


def test_model_overrides(tmp_path, capsys):
    from dit.train_args import parse_overrides

    parsed = parse_overrides(["mlp_ratio=15", "qk_norm=true", "num_shared_experts=0"])
    assert parsed == {"mlp_ratio": 15.0, "qk_norm": True, "num_shared_experts": 0}
    assert type(parsed["mlp_ratio"]) is float and type(parsed["num_shared_experts"]) is int
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["mlp_ratio"])
    for bad, message in [
        ("width=3", "unknown model setting 'width'"),
        ("mlp_ratio=abc", "mlp_ratio takes a number, got 'abc'"),
        ("depth=2.5", "depth takes an integer"),
        ("qk_norm=maybe", "qk_norm takes true or false"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            run(tmp_path, "--steps", "1", "--set", bad)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    for bad, message in [
        ("depth=-1", "depth must be an integer >= 1, got -1"),
        ("num_heads=5", "multiple of num_heads"),
        ("top_k=9", r"top_k must be <= num_experts \(4\), got 9"),
    ]:
        with pytest.raises(SystemExit, match=message):
            run(tmp_path, "--steps", "1", "--set", bad)
    run_dir = run(tmp_path, "--steps", "1", "--set", "num_shared_experts=0")
    _, config = ckpt.load_weights(run_dir / "checkpoints" / "0000001")
    assert config.num_shared_experts == 0


def test_image_folder_and_latent_directories(tmp_path):
    from PIL import Image
    from safetensors.torch import save_file

    folder = tmp_path / "images"
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            pixels = np.random.default_rng(i).integers(0, 256, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / label / f"{i}.png")
    run_dir = run(
        tmp_path / "runs", "--data", str(folder), "--image-size", "8", "--steps", "1", "--global-batch-size", "2"
    )
    _, config = ckpt.load_weights(run_dir / "checkpoints" / "0000001")
    assert (config.in_channels, config.input_size, config.num_classes, config.latent) == (3, 8, 2, False)
    assert (run_dir / "samples.png").is_file()

    latents = tmp_path / "latents"
    latents.mkdir()
    save_file(
        {"latents": torch.randn(6, 4, 4, 4).half(), "labels": torch.tensor([0, 1, 2, 0, 1, 2])},
        str(latents / "00000.safetensors"),
    )
    run_dir = run(tmp_path / "runs", "--data", str(latents), "--steps", "1", "--global-batch-size", "2")
    _, config = ckpt.load_weights(run_dir / "checkpoints" / "0000001")
    assert (config.in_channels, config.input_size, config.num_classes, config.latent) == (4, 4, 3, True)
    assert "no sample grid" in (run_dir / "log.txt").read_text()


def test_init_starts_a_new_run_from_upcycled_weights(tmp_path, capsys):
    from dit.upcycle import main as upcycle_main

    common = ["--global-batch-size", "16", "--sample-steps", "2", "--log-every", "1"]
    train_main(["--model", "DiT-Ti/2", *common, "--steps", "2", "--results-dir", str(tmp_path / "dense")])
    dense = ckpt.latest_checkpoint(next((tmp_path / "dense").iterdir()) / "checkpoints")
    upcycled = tmp_path / "upcycled.safetensors"
    upcycle_main(["--dense", str(dense), "--model", "DiT-MoE-Ti/2-4E2A", "--out", str(upcycled)])
    train_main(
        ["--init", str(upcycled), *common, "--steps", "1", "--lr", "1e-12", "--results-dir", str(tmp_path / "moe")]
    )
    run_dir = sorted((tmp_path / "moe").iterdir())[-1]
    assert run_dir.name.endswith("DiT-MoE-Ti-2-4E2A")
    assert f"initialised from {upcycled}" in (run_dir / "log.txt").read_text()
    start = load_file(upcycled)
    trained = load_file(run_dir / "checkpoints" / "0000001" / "model.safetensors")
    assert start.keys() == trained.keys()
    for key in start:
        torch.testing.assert_close(trained[key], start[key], atol=1e-9, rtol=0)

    bad = [
        (["--model", "DiT-MoE-Ti/2-8E2A"], "contradicts --init"),
        (["--set", "mlp_ratio=2"], "--set cannot change"),
        (["--objective", "rectified-flow"], "contradicts --init"),
        (["--image-size", "16"], "does not fit the data"),
    ]
    for extra, match in bad:
        with pytest.raises(SystemExit, match=match):
            train_main(
                ["--init", str(upcycled), *common, "--steps", "1", "--results-dir", str(tmp_path / "bad"), *extra]
            )
    with pytest.raises(SystemExit):
        train_main(["--init", str(upcycled), "--resume", "latest", "--results-dir", str(tmp_path / "moe")])
    assert "give one of them" in capsys.readouterr().err


def _check_the_capacity_offset(tmp_path: Path, checkpoint: Path, ema) -> None:
    """dit.sample takes --capacity-offset, and the model's experts per token fall as it rises."""
    counts = {}
    for offset in ("-2", "0", "2"):
        out = tmp_path / f"s{offset}.npz"
        sample_main(["--ckpt", str(checkpoint), "--num-samples", "2", "--steps", "2", "--capacity-offset", offset]
                    + ["--out", str(out)])  # fmt: skip
        assert np.load(out)["arr_0"].shape == (2, 8, 8, 1)
        ema.set_expert_compute(capacity_offset=float(offset))
        with torch.no_grad():
            ema.eval()(torch.randn(2, 1, 8, 8), torch.tensor([5, 500]), torch.tensor([1, 2]))
        counts[offset] = sum(int(moe.expert_counts.sum()) for moe in ema.moe_layers())
    assert counts["-2"] >= counts["0"] >= counts["2"]


def test_diffmoe_trains_its_predictor_and_samples_with_the_compute_dial(tmp_path):
    """router=diffmoe: expert choice over the whole batch in training, the capacity thresholds
    averaged into the EMA as the weights are, then per-token routing when sampling, where
    --capacity-offset moves the compute."""
    run_dir = run(tmp_path, "--steps", "3", "--set", "router=diffmoe")
    checkpoint = run_dir / "checkpoints" / "0000003"
    ema = ckpt.build_from_checkpoint(str(checkpoint), "ema")
    for moe in ema.moe_layers():
        assert moe.router.group_size is None and (moe.router.capacity_predictor.thresholds != 0).all()
    _check_the_capacity_offset(tmp_path, checkpoint, ema)
    with pytest.raises(SystemExit, match="capacity_factor sets the compute of expert-choice models"):
        sample_main(["--ckpt", str(checkpoint), "--capacity-factor", "1", "--out", str(tmp_path / "x.npz")])
    with pytest.raises(SystemExit, match="--compile and --cuda-graphs cannot take it"):
        sample_main(["--ckpt", str(checkpoint), "--compile", "--out", str(tmp_path / "x.npz")])


def test_expert_race_trains_its_threshold_samples_with_the_dial_and_is_analysed(tmp_path, capsys):
    """router=expert-race (with the per-layer regularization): the batch's best (token, expert) pairs win in training, the threshold
    averaged into the EMA as the weights are; sampling routes each token by it, --capacity-offset
    moves the compute; dit.analyze draws its experts per token; dit.export refuses it in one line."""
    run_dir = run(tmp_path, "--steps", "3", "--set", "router=expert-race", "--set", "layer_regularization_coef=0.5")
    assert "| aux " in (run_dir / "log.txt").read_text()  # the similarity loss joins the auxiliary losses
    checkpoint = run_dir / "checkpoints" / "0000003"
    ema = ckpt.build_from_checkpoint(str(checkpoint), "ema")
    assert all(float(moe.router.threshold) != 0.0 for moe in ema.moe_layers())
    _check_the_capacity_offset(tmp_path, checkpoint, ema)
    analyze_main(["--ckpt", str(checkpoint), "--samples-per-class", "1", "--classes", "2", "--steps", "2"]
                 + ["--out", str(tmp_path / "routing")])  # fmt: skip
    assert (tmp_path / "routing" / "experts_per_token_by_step.png").is_file()
    assert "mean experts per token" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="cannot package a model routed by expert-race"):
        export_main(["--ckpt", str(checkpoint), "--out", str(tmp_path / "race.pt2")])


def test_promoe_sends_the_null_labels_to_their_experts_in_training_and_guided_sampling(tmp_path):
    """router=promoe: the dropped labels' tokens (training) and the unguided half of a guided
    batch (sampling) go to the unconditional experts alone, the others never do; dit.analyze
    reads it as token choice; dit.export refuses it in one line."""
    run_dir = run(tmp_path, "--steps", "2", "--set", "router=promoe")  # 4 experts, top-2: 2 unconditional
    checkpoint = run_dir / "checkpoints" / "0000002"
    model = ckpt.build_from_checkpoint(str(checkpoint), "ema").eval()
    seen = []
    for moe in model.moe_layers():
        moe.on_route = lambda experts, weights: seen.append(experts)
    labels = torch.tensor([3, 7, 10, 10])  # a guided batch: two images, then their null-label pass
    with torch.no_grad():
        model(torch.randn(4, 1, 8, 8), torch.tensor([500, 500, 500, 500]), labels)
    tokens = model.grid_size**2
    for experts in seen:
        unconditional = (experts >= 2).view(4, tokens, -1)
        assert not unconditional[:2].any() and unconditional[2:].all()
    out = tmp_path / "guided.npz"
    sample_main(
        ["--ckpt", str(checkpoint), "--num-samples", "2", "--steps", "2", "--cfg-scale", "3", "--out", str(out)]
    )
    assert np.load(out)["arr_0"].shape == (2, 8, 8, 1)
    analyze_main(["--ckpt", str(checkpoint), "--samples-per-class", "1", "--classes", "2", "--steps", "2"]
                 + ["--out", str(tmp_path / "routing")])  # fmt: skip
    with pytest.raises(SystemExit, match="its routing reads the class labels"):
        export_main(["--ckpt", str(checkpoint), "--out", str(tmp_path / "promoe.pt2")])
    with pytest.raises(SystemExit, match="unconditional_experts must leave top_k"):
        run(tmp_path / "bad", "--steps", "1", "--set", "router=promoe", "--set", "unconditional_experts=3")


def test_training_and_sampling_with_fp8_experts(tmp_path):
    """--precision fp8: training runs every MoE layer's routed experts in FP8 from fp32 weights
    (the checkpoint holds fp32 weights, as any run's); sampling stores them in FP8."""
    run_dir = run(tmp_path, "--steps", "2", "--precision", "fp8")
    assert "loss" in (run_dir / "log.txt").read_text()
    checkpoint = run_dir / "checkpoints" / "0000002"
    for name, tensors in weights(checkpoint).items():
        assert all(t.dtype == torch.float32 and t.isfinite().all() for t in tensors.values()), name
    out = tmp_path / "fp8.npz"
    sample_main(
        ["--ckpt", str(checkpoint), "--num-samples", "2", "--steps", "2", "--precision", "fp8", "--out", str(out)]
    )
    assert np.load(out)["arr_0"].shape == (2, 8, 8, 1)
    with pytest.raises(SystemExit, match="--compile cannot take it"):
        sample_main(["--ckpt", str(checkpoint), "--precision", "fp8", "--compile", "--out", str(out)])
