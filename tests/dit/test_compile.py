"""DiT-MoE under torch.compile and torch.export: a training step's loss traces as one graph on
both backends and matches eager, forward and backward; the CLIs' --compile runs end to end; the
guided denoiser exports and survives save/load. (Its AOTInductor package is built and run, from
C++, by the ctest in tests/cpp.)"""

import numpy as np
import pytest
import torch

from dit.diffusion import create_diffusion
from dit.models import create_model
from dit.precision import autocast
from dit.sample import main as sample_main
from dit.sampling import GuidedDenoiser, cuda_graphed
from tests.dit.test_train import run
from tests.moe_kernels.helpers import BACKENDS


def _model(backend):
    torch.manual_seed(0)
    return create_model(
        "DiT-MoE-Ti/2-4E2A",
        input_size=8,
        in_channels=1,
        num_classes=10,
        depth=1,
        hidden_size=32,
        num_heads=2,
        moe_backend=backend,
    )


def _loss_fn(model, precision):
    diffusion = create_diffusion()

    def loss_fn(x, y):
        with autocast(precision, x.device):
            loss = diffusion.training_losses(model, x, {"y": y})["loss"].mean()
        return loss + model.aux_loss

    return loss_fn


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_training_loss_is_one_graph(backend):
    torch._dynamo.reset()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    explanation = torch._dynamo.explain(_loss_fn(_model(backend), "tf32"))(x, y)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_a_compiled_training_step_matches_eager(backend, precision):
    torch._dynamo.reset()
    model = _model(backend)
    loss_fn = _loss_fn(model, precision)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    tolerance = dict(atol=1e-5, rtol=1e-5) if precision == "tf32" else dict(atol=2e-2, rtol=2e-2)
    # A second batch size recompiles with dynamic shapes (the interpreter is slow: torch only).
    for batch in (4, 6) if backend == "torch" else (4,):
        x, y = torch.randn(batch, 1, 8, 8), torch.randint(0, 10, (batch,))
        torch.manual_seed(batch)
        loss = compiled(x, y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        torch.manual_seed(batch)
        ref = loss_fn(x, y)
        ref_grads = torch.autograd.grad(ref, list(model.parameters()))
        torch.testing.assert_close(loss, ref, **tolerance)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, **tolerance)


def test_train_and_sample_with_compile(tmp_path):
    """Inductor on the CPU, end to end: the slowest test here (compiling takes a minute)."""
    run_dir = run(tmp_path, "--steps", "2", "--compile", "--moe-backend", "torch")
    out = tmp_path / "s.npz"
    sample_main(
        [
            "--ckpt",
            str(run_dir / "checkpoints" / "0000002"),
            "--num-samples",
            "3",
            "--steps",
            "2",
            "--moe-backend",
            "torch",
            "--compile",
            "--out",
            str(out),
        ]
    )
    assert np.load(out)["arr_0"].shape == (3, 8, 8, 1)


def _guided(backend):
    model = _model(backend).eval()
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero starts at an all-zero output: make it say something
            p.normal_(0, 0.1)
    return GuidedDenoiser(model, cfg_scale=4.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_of_the_guided_denoiser_survives_save_and_load(backend, tmp_path):
    denoiser = _guided(backend)
    args = (torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 999]), torch.tensor([1, 2, 3]))
    with torch.no_grad():
        exported = torch.export.export(denoiser, args)
        expected = denoiser(*args)
    ops = {str(node.target) for node in exported.graph.nodes if "moe_kernels" in str(node.target)}
    assert ops == {
        "moe_kernels.topk_gating.default",
        "moe_kernels.sort_by_expert.default",
        "moe_kernels.experts.default",
    }
    torch.export.save(exported, tmp_path / "denoiser.pt2")
    loaded = torch.export.load(tmp_path / "denoiser.pt2").module()
    torch.testing.assert_close(loaded(*args), expected)


def test_cuda_graphs_without_a_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="--cuda-graphs needs a CUDA device"):
        sample_main(["--ckpt", str(tmp_path), "--cuda-graphs", "--out", str(tmp_path / "s.npz")])
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        cuda_graphed(lambda x, t: x)(torch.zeros(1), torch.zeros(1))
