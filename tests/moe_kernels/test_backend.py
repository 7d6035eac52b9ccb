import pytest
import torch

from moe_kernels import backend as backend_module
from moe_kernels import tuning
from moe_kernels.backend import resolve_backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_picks_triton_on_cuda_and_torch_elsewhere(monkeypatch):
    monkeypatch.delenv("MOE_KERNELS_BACKEND", raising=False)
    for choice in (None, "auto"):
        assert resolve_backend(choice, CPU) == "torch"
        assert resolve_backend(choice, CUDA) == "triton"


def test_environment_overrides_auto_only(monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_BACKEND", "torch")
    assert resolve_backend("auto", CUDA) == "torch"
    assert resolve_backend("triton", CUDA) == "triton"
    monkeypatch.setenv("MOE_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MOE_KERNELS_BACKEND"):
        resolve_backend(None, CPU)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(backend_module, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend("triton", CPU)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cutlass", CPU)


def test_autotune_off_keeps_the_smallest_config(monkeypatch):
    import triton

    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 64}, num_stages=s)
        for m, n, s in ((128, 128, 3), (64, 64, 4), (128, 64, 4))
    ]
    interpreter = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32})]
    monkeypatch.setattr(tuning, "INTERPRET", False)
    assert tuning.autotune_configs(configs, interpreter) == configs
    monkeypatch.setattr(tuning, "AUTOTUNE", False)
    assert tuning.autotune_configs(configs, interpreter) == [configs[1]]
    monkeypatch.setattr(tuning, "INTERPRET", True)
    assert tuning.autotune_configs(configs, interpreter) == interpreter
