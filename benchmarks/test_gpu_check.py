"""The prepared GPU script runs end to end (on CPU, tiny, through the interpreter), so a short
GPU lease is never spent on its bugs."""

import json
import types

import pytest

from benchmarks import gpu_check
from moe_kernels import tuning
from moe_kernels.backend import INTERPRET


@pytest.mark.skipif(not INTERPRET, reason="the smoke run needs the Triton interpreter")
def test_smoke_run_checks_and_times_every_backend(tmp_path):
    path = gpu_check.main(["--smoke", "--out", str(tmp_path)])
    assert path.name == "gpu_check_smoke_CPU_interpreter.json"
    report = json.loads(path.read_text())
    assert report["checks"] == {"fp32": "ok", "fp32 tma": "ok"}
    backends = {key.split(" | ")[1] for key in report["timings"]}
    assert backends == {
        "triton", "triton-tiled", "triton-prescaled", "triton-saved-out", "triton-scattered", "triton-pointer-gather",
        "triton-pointer-store", "torch", "dense-eq", "expert-choice", "fp8", "fp8-nmajor", "fp8-train",
    }  # fmt: skip
    trained = {
        key: row for key, row in report["timings"].items() if not key.endswith(("fp8", "nmajor"))
    }  # forward only
    assert all(row["fwd ms"] > 0 and row["fwd+bwd ms"] > 0 for row in trained.values())
    assert all(row["fwd+bwd / torch"] > 0 for key, row in trained.items() if not key.endswith("torch"))
    assert all(row["fwd / triton"] > 0 for key, row in report["timings"].items() if "fp8" in key)
    assert all(
        row["fwd+bwd / triton"] > 0
        for key, row in report["timings"].items()
        if key.endswith(
            ("fp8-train", "tiled", "prescaled", "saved-out", "scattered", "pointer-gather", "pointer-store")
        )
    )
    assert report["check errors"]["fp32"]["moe_ffn swiglu dw_in"] < 1e-5
    assert report["check errors"]["fp32"]["moe_ffn swiglu biased prescaled dw_out"] < 1e-5
    assert report["check errors"]["fp32"]["moe_ffn swiglu saved-out dweights"] < 1e-5
    assert report["check errors"]["fp32"]["moe_ffn swiglu scattered dx"] < 1e-5
    assert all(row["host fwd+bwd ms"] > 0 for row in trained.values())
    assert {name.split(" | ")[1] for name in report["profile"]} == {"triton fwd+bwd"}  # fp8-train: on the GPU
    for profile in report["profile"].values():
        assert profile["total ms"] > 0 and "moe_kernels::experts_backward" in profile
        gemms = {name.split()[0]: row for name, row in profile["gemms"].items()}
        assert {"grouped_mm[act]", "grouped_mm[none]", "grouped_mm[act_grad]", "grouped_wgrad"} == set(gemms)
        assert all(row["ms"] > 0 and row["TFLOP/s"] > 0 for row in gemms.values())
    assert {name.split(" | ")[1] for name in report["sampling"]} == {"triton", "torch", "fp8"}
    assert all(row["eager ms"] > 0 for row in report["sampling"].values())
    assert all(row["img/s"] > 0 for row in report["training"].values()) and report["training"]
    assert set(report["first step"]) == {"autotuned", "with table"}
    assert all(row["seconds"] > 0 for row in report["first step"].values())
    table = json.loads((tmp_path / "configs" / "smoke_CPU_interpreter.json").read_text())
    assert set(table["kernels"]) == {"grouped_mm", "grouped_mm_fp8", "grouped_wgrad"}


@pytest.mark.skipif(not INTERPRET, reason="the smoke run needs the Triton interpreter")
def test_a_failing_row_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setattr(gpu_check, "training_step", broken)
    path = gpu_check.main(["--smoke", "--parts", "training,profile", "--out", str(tmp_path)])
    report = json.loads(path.read_text())
    assert report["training"] and all(row == {"error": "RuntimeError: planted"} for row in report["training"].values())
    assert all(row["total ms"] > 0 for row in report["profile"].values())
    assert report["checks"] == {} and report["timings"] == {} and report["sampling"] == {}


def test_unknown_parts_and_dtypes_are_refused(capsys):
    for argv in (["--smoke", "--parts", "layers,speed"], ["--smoke", "--checks", "fp8"]):
        with pytest.raises(SystemExit):
            gpu_check.main(argv)
    assert "unknown parts ['speed']" in capsys.readouterr().err


def test_without_a_gpu_the_full_run_says_so(capsys):
    if gpu_check.torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", "unused"])
    assert "no CUDA device" in capsys.readouterr().err


def test_a_forward_that_cannot_be_captured_keeps_its_row():
    if gpu_check.torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = gpu_check.graphed_ms(lambda: None, gpu_check._time_once)
    assert isinstance(result, str) and result  # the capture's error, recorded in place of a time


def test_design_timings_compare_the_designs_launch_by_launch():
    """The autotuner keeps only the last key's timings: the recorder takes each newly tuned key's
    best time per design, and says where the TMA design won."""
    tiled, tma = (tuning.designed(tuning.config(64, 64, 64, 4, 4), design) for design in tuning.DESIGNS)
    kernel = types.SimpleNamespace(keys=["N"], cache={}, configs_timings=None)

    def run(n, ms):
        kernel.cache.setdefault((n, "torch.bfloat16"), tiled)
        kernel.configs_timings = {tiled: [ms[0], 0.0, 0.0], tma: [ms[1], 0.0, 0.0]}

    timings = gpu_check.DesignTimings()
    recorded = timings._recorded("grouped_mm", kernel, run)
    recorded(64, (2.0, 1.0))
    recorded(64, (9.0, 9.0))  # a key tuned already: not timed again, not recorded
    recorded(128, (1.0, 2.0))
    assert timings.rows == {
        "grouped_mm": {
            "N=64,dtypes=torch.bfloat16": {"tiled": 2.0, "tma": 1.0},
            "N=128,dtypes=torch.bfloat16": {"tiled": 1.0, "tma": 2.0},
        }
    }
    assert timings.summary() == {"grouped_mm": {"launches": 2, "tma won": 1, "median tiled / tma": 2.0}}
