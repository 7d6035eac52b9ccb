"""Meta tensors (shapes without values, as in a model built on the meta device): every op and the
layer return what the same call on real tensors returns, shapes and dtypes, forward and backward,
instead of failing where a value would be read. Mixing meta and real tensors is a device error."""

import pytest
import torch

import moe_kernels as mk

T, E, k, D, H = 7, 4, 2, 8, 6


def _inputs(device: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    real = {
        "logits": torch.randn(T, E, generator=generator),
        "x": torch.randn(T, D, generator=generator),
        "weights": torch.rand(T, k, generator=generator),
        "experts": torch.randint(0, E, (T, k), generator=generator),
        "w_in": torch.randn(E, D, 2 * H, generator=generator),
        "w_out": torch.randn(E, H, D, generator=generator),
        "w": torch.randn(E, D, H, generator=generator),
        "offsets": torch.tensor([2, 2, 5, T], dtype=torch.int32),
    }
    return {name: t.to(device).requires_grad_(t.is_floating_point()) for name, t in real.items()}


CALLS = {
    "topk_gating": lambda i: mk.topk_gating(i["logits"], k, backend="torch"),
    "balance_loss": lambda i: (mk.balance_loss(torch.softmax(i["logits"], -1), i["experts"], E, backend="torch"),),
    "grouped_mm": lambda i: (mk.grouped_mm(i["x"], i["w"], i["offsets"], backend="torch"),),
    "moe_ffn": lambda i: (mk.moe_ffn(i["x"], i["weights"], i["experts"], i["w_in"], i["w_out"], backend="torch"),),
    "moe_ffn fp8": lambda i: (
        mk.moe_ffn(i["x"], i["weights"], i["experts"], i["w_in"], i["w_out"], backend="torch", precision="fp8"),
    ),
    "expert_choice_gating": lambda i: mk.expert_choice_gating(i["logits"][:6], 2, 3, backend="torch"),
    "expert_choice_ffn": lambda i: (
        mk.expert_choice_ffn(
            i["x"],
            *mk.expert_choice_gating(i["logits"], 3, backend="torch")[:2],
            i["w_in"],
            i["w_out"],
            backend="torch",
        ),
    ),
    "quantize_fp8": lambda i: mk.quantize_fp8(i["w"].detach()),
    "dequantize_fp8": lambda i: (mk.dequantize_fp8(*mk.quantize_fp8(i["w"].detach())),),
    "grouped_mm_fp8": lambda i: (
        mk.grouped_mm_fp8(i["x"].detach(), *mk.quantize_fp8(i["w"].detach()), i["offsets"], backend="torch"),
    ),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_ops_on_meta_tensors_match_real_shapes(name):
    results = {}
    for device in ("cpu", "meta"):
        inputs = _inputs(device)
        outputs = CALLS[name](inputs)
        floats = [out for out in outputs if out.requires_grad]
        if floats:
            sum(out.float().sum() for out in floats).backward()
        grads = {key: t.grad for key, t in inputs.items() if t.grad is not None}
        results[device] = (
            [(o.shape, o.dtype, o.device.type) for o in outputs],
            {key: (g.shape, g.dtype) for key, g in grads.items()},
        )
    (cpu_outs, cpu_grads), (meta_outs, meta_grads) = results["cpu"], results["meta"]
    assert [(s, d) for s, d, _ in meta_outs] == [(s, d) for s, d, _ in cpu_outs]
    assert {device for _, _, device in meta_outs} == {"meta"}
    assert meta_grads == cpu_grads


@pytest.mark.parametrize(
    "options", [dict(selection_bias=True), dict(router="expert-choice", group_size=T), dict(precision="fp8")]
)
def test_a_layer_built_on_meta_runs_forward_and_backward(options):
    with torch.device("meta"):
        moe = mk.MoE(D, H, E, k, backend="torch", **options)
    x = torch.randn(3, T, D, device="meta", requires_grad=True)
    y = moe(x)
    (y.sum() + moe.aux_loss).backward()
    assert y.shape == x.shape and y.is_meta and moe.aux_loss.shape == ()
    assert x.grad.shape == x.shape and moe.w_in.grad.shape == moe.w_in.shape
    assert moe.expert_counts.shape == (E,)


def test_a_layer_on_meta_stores_its_experts_in_fp8():
    with torch.device("meta"):
        moe = mk.MoE(D, H, E, k, backend="torch").eval().to_fp8()
    with torch.no_grad():
        y = moe(torch.randn(T, D, device="meta"))
    assert y.shape == (T, D) and moe.w_in.dtype == torch.float8_e4m3fn and moe.w_in_scale.shape == (E, 1, 1)


def test_diffmoe_eval_says_it_needs_values():
    with torch.device("meta"):
        moe = mk.MoE(D, H, E, k, backend="torch", router="diffmoe").eval()
    with pytest.raises(ValueError, match="meta tensors do not hold"):
        moe(torch.randn(T, D, device="meta"))


def test_meta_and_real_tensors_do_not_mix():
    with pytest.raises(ValueError, match="on meta but .* on cpu|on cpu but .* on meta"):
        mk.grouped_mm(
            torch.randn(T, D, device="meta"), torch.randn(E, D, H), torch.tensor([2, 2, 5, T], dtype=torch.int32)
        )
    moe = mk.MoE(D, H, E, k, backend="torch")
    with pytest.raises(ValueError, match="x is on meta but the MoE's parameters are on cpu"):
        moe(torch.randn(T, D, device="meta"))
