"""The prepared GPU script runs end to end (on CPU, tiny, through the interpreter), so a short
GPU lease is never spent on its bugs."""

import json

import pytest

from benchmarks import gpu_check
from moe_kernels.backend import INTERPRET


@pytest.mark.skipif(not INTERPRET, reason="the smoke run needs the Triton interpreter")
def test_smoke_run_checks_and_times_every_backend(tmp_path):
    path = gpu_check.main(["--smoke", "--out", str(tmp_path)])
    assert path.name == "gpu_check_smoke_CPU_interpreter.json"
    report = json.loads(path.read_text())
    assert report["checks"] == {"torch.float32": "ok"}
    backends = {key.split(" | ")[1] for key in report["timings"]}
    assert backends == {"triton", "torch", "dense-eq"}
    assert all(row["fwd"] > 0 and row["fwd+bwd"] > 0 for row in report["timings"].values())
    assert {key.split(" | ")[1] for key in report["sampling"]} == {"triton", "torch"}
    assert all(row["eager"] > 0 for row in report["sampling"].values())


def test_without_a_gpu_the_full_run_says_so(capsys):
    if gpu_check.torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", "unused"])
    assert "no CUDA device" in capsys.readouterr().err
