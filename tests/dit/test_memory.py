"""``dit.memory``: the per-GPU estimates against real models, sharded on the meta device under a
fake process group, and against the activations autograd really saves."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import _init_optim_state
from torch.testing._internal.distributed.fake_pg import FakeStore

from dit import parallel
from dit.flops import main as flops_main
from dit.memory import Layout, activation_bytes, estimate, local_parameters
from dit.memory import main as memory_main
from dit.models import create_model, parse_model_name


@pytest.mark.parametrize("gpus, ep, fsdp, rank", [(8, 8, True, 0), (8, 2, False, 3), (8, 1, True, 7), (4, 2, True, 1)])
def test_local_parameters_and_optimizer_state_match_a_sharded_model(gpus, ep, fsdp, rank):
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=gpus)
    try:
        with torch.device("meta"):
            model = create_model("DiT-MoE-G/2-16E2A", input_size=32)
        # What FSDP gathers for the block it computes: the block whole but the experts of
        # the other ep ranks (counted on the unsharded model).
        block = model.blocks[0]
        experts = block.ffn.w_in.numel() + block.ffn.w_out.numel()
        gathered = sum(p.numel() for p in block.parameters()) - experts * (1 - 1 / ep)
        dtypes = {p.dtype for p in model.parameters()}
        mesh = parallel.build_mesh(gpus, ep, torch.device("cpu"))
        if ep > 1:
            parallel.shard_experts(model, mesh)
        if fsdp:
            parallel.fully_shard_model(model, mesh)
        stored = sum(parallel.local(p).numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters())
        _init_optim_state(optimizer)
        moments = sum(
            parallel.local(v).numel() for state in optimizer.state.values() for k, v in state.items() if k != "step"
        )
    finally:
        dist.destroy_process_group()
    layout = Layout(gpus, ep, fsdp)
    # FSDP pads each parameter to a multiple of the shard count: a few hundred values.
    assert stored == pytest.approx(local_parameters(model.config, layout), rel=1e-5)
    assert moments == 2 * stored
    memory = estimate(model.config, layout, batch=1, compute_bytes=2)
    assert memory.optimizer == pytest.approx(8 * stored, rel=1e-5)
    # Gradients and the EMA are kept in the parameters' dtype (fp32); with FSDP, two blocks
    # (the one computing and the one prefetched) are gathered whole, weights and gradients, in
    # the compute dtype (bf16 here).
    assert dtypes == {torch.float32}
    prefetch = 2 * gathered * 2 if fsdp else 0
    assert memory.params == pytest.approx(4 * stored + prefetch, rel=1e-5)
    assert memory.grads == pytest.approx(4 * stored + prefetch, rel=1e-5)
    assert memory.ema == pytest.approx(4 * stored, rel=1e-5)


@pytest.mark.parametrize("name", ["DiT-MoE-S/2-8E2A", "DiT-S/2"])
def test_activation_estimate_matches_what_autograd_saves(name):
    torch.manual_seed(0)
    model = create_model(name, input_size=8, depth=6, moe_backend="torch")
    parameters = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.numel() and t.data_ptr() not in parameters:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    batch = 8
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(batch, 4, 8, 8), torch.randint(0, 1000, (batch,)), torch.randint(0, 1000, (batch,)))
    assert activation_bytes(model.config, batch, grad_checkpointing=False, compute_bytes=4) == pytest.approx(
        sum(saved.values()), rel=0.1
    )


def test_the_cli_shows_a_layout_that_fits_the_flagship(capsys):
    memory_main(["--gpus", "8", "--ep", "8", "--fsdp", "--grad-checkpointing"])
    out = capsys.readouterr().out
    flagship = next(line for line in out.splitlines() if line.startswith("DiT-MoE-G/2-16E2A "))
    assert flagship.endswith("yes")
    assert "8 GPU(s), ep 1  " in out and out.rstrip().endswith("no")  # replicated: about 300 GiB


def test_bad_layouts_are_refused(capsys):
    config = parse_model_name("DiT-MoE-S/2-8E2A")
    with pytest.raises(ValueError, match="--ep 3 must divide --gpus 8"):
        estimate(config, Layout(8, 3), batch=1)
    with pytest.raises(ValueError, match="must divide the experts per layer"):
        estimate(config, Layout(16, 16), batch=1)
    with pytest.raises(SystemExit):
        memory_main(["--gpus", "0"])
    with pytest.raises(SystemExit) as exit_info:  # the old place of the report says where it went
        flops_main(["--memory", "--gpus", "8"])
    assert exit_info.value.code == 2 and "python -m dit.memory" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp8"])
def test_sampling_weights_are_what_the_sampler_holds(precision):
    from dit.memory import sampling_weight_bytes
    from dit.precision import inference_weights

    model = create_model("DiT-MoE-Ti/2-8E2A", input_size=8, in_channels=1, num_classes=10).eval()
    inference_weights(model, precision)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    held += sum(b.numel() * b.element_size() for name, b in model.named_buffers() if name != "pos_embed")
    assert held == sampling_weight_bytes(model.config, precision)


def test_the_cli_shows_sampling_weights(capsys):
    memory_main(["--sampling"])
    out = capsys.readouterr().out
    assert "fp8 experts" in out and "DiT-MoE-XL/2-8E2A" in out
