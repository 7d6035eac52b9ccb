"""``moe_kernels`` as a transformers experts implementation, on tiny random models of five MoE
families: the same logits, loss, router loss, gradients and greedy tokens as transformers' own
eager experts."""

import warnings

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", minversion="5", reason="the hf extra (transformers >= 5) is not installed"
)

import moe_kernels as mk  # noqa: E402
import moe_kernels.integrations.huggingface as mk_hf  # noqa: E402

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    output_router_logits=True,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(
        **COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2
    ),
    "olmoe": lambda: transformers.OlmoeConfig(**COMMON, intermediate_size=16, num_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **COMMON,
        intermediate_size=24,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON, intermediate_size=24, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, head_dim=8
    ),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **{**COMMON, "num_key_value_heads": 4},
        intermediate_size=24,
        moe_intermediate_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    ),
}


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = CONFIGS[family]()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random routers would leave DeepSeek-V3's correction bias at zero: give it values.
    for name, buffer in model.named_buffers():
        if "e_score_correction_bias" in name:
            buffer.uniform_(-0.1, 0.1)
    return model


def _run(model, implementation: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list]:
    model.set_experts_implementation(implementation)
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    loss = out.loss + (out.aux_loss if getattr(out, "aux_loss", None) is not None else 0)
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    return out.logits.detach(), out.loss.detach(), getattr(out, "aux_loss", None), grads


@pytest.mark.parametrize("family", CONFIGS)
def test_matches_transformers_eager_experts(family):
    name = mk_hf.register(backend="torch")
    assert name == "moe_kernels"
    model = _model(family).train()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    want = _run(model, "eager", ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: every family runs through moe_ffn
        got = _run(model, "moe_kernels", ids)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)
    if want[2] is not None:
        torch.testing.assert_close(got[2], want[2], atol=1e-6, rtol=1e-6)
    for (name, _), g, w in zip(model.named_parameters(), got[3], want[3]):
        assert (g is None) == (w is None), name
        if w is not None:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")

    model.eval()
    model.config.output_router_logits = False  # generate() cannot take the router loss of a cache step
    prompt = ids[:, :3]
    model.set_experts_implementation("eager")
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    model.set_experts_implementation("moe_kernels")
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), expected)


def test_triton_backend_through_the_interpreter():
    mk_hf.register(backend="triton")
    try:
        model = _model("mixtral")
        ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))
        want = _run(model, "eager", ids)
        got = _run(model, "moe_kernels", ids)
        torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
        for g, w in zip(got[3], want[3]):
            if w is not None:
                torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-3)
    finally:
        mk_hf.register()


def _logits_of_both(model, ids):
    model.set_experts_implementation("grouped_mm")
    want = model(ids).logits
    model.set_experts_implementation("moe_kernels")
    return model(ids).logits, want


def test_unsupported_experts_fall_back_with_a_warning():
    mk_hf.register(backend="torch")
    model = _model("mixtral")
    for module in model.modules():
        if hasattr(module, "gate_up_proj"):
            module.act_fn = torch.nn.Tanh()
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(3))
    mk_hf._warned.clear()
    with pytest.warns(UserWarning, match=r"its gate \(act_fn = Tanh\) computes none of moe_kernels' activations"):
        got, want = _logits_of_both(model, ids)
    torch.testing.assert_close(got, want)


def test_the_activation_comes_from_the_experts_not_the_config():
    """A config whose ``hidden_act`` is not what its experts compute (NemotronH's and Ergo's
    configs do this): what the experts compute decides, so the logits stay right."""
    mk_hf.register(backend="torch")
    model = _model("mixtral")
    for module in model.modules():
        if hasattr(module, "gate_up_proj"):
            module.config.hidden_act = "gelu"  # the experts still compute SiLU
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # served, no fallback
        got, want = _logits_of_both(model, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "act_fn, expected",
    [
        ("silu", "silu"),
        ("swish", "silu"),
        ("gelu", "gelu"),
        ("gelu_python", "gelu"),
        ("gelu_pytorch_tanh", "gelu_tanh"),
        ("gelu_new", "gelu_tanh"),
        ("relu", "relu"),
        ("relu2", "relu2"),
        ("quick_gelu", None),
        ("gelu_10", None),  # a clipped GELU: the probe's large inputs show the clip
    ],
)
def test_activations_are_recognised_by_what_they_compute(act_fn, expected):
    from transformers.activations import ACT2FN

    from moe_kernels.activations import ELEMENTWISE

    assert mk_hf._identify(ACT2FN[act_fn], ELEMENTWISE, torch.device("cpu")) == expected


def test_gates_are_recognised_by_what_they_compute():
    from moe_kernels.activations import GATED

    def gate(act, clamp=None, fp32=False):
        def fn(a):
            g, u = a.chunk(2, dim=-1)
            if clamp is not None:
                g, u = g.clamp(max=clamp), u.clamp(-clamp, clamp)
            out = act(g.float() if fp32 else g) * (u.float() if fp32 else u)
            return out.to(a.dtype)

        return fn

    silu, gelu_tanh = torch.nn.functional.silu, torch.nn.GELU(approximate="tanh")
    cpu = torch.device("cpu")
    assert mk_hf._identify(gate(silu), GATED, cpu) == "swiglu"
    assert mk_hf._identify(gate(silu, fp32=True), GATED, cpu) == "swiglu"  # beam's
    assert mk_hf._identify(gate(gelu_tanh), GATED, cpu) == "geglu_tanh"  # gemma4's
    assert mk_hf._identify(gate(silu, clamp=7.0), GATED, cpu) is None  # deepseek_v4's clamp, no limit known


def test_gates_with_options_are_served_from_the_modules_attributes():
    """GPT-OSS's gate (clamp, sigmoid scale, ``up + 1``, interleaved columns) and Inkling-2's
    softcapped SwiGLU: the options come from the module, and the probe confirms them."""
    from transformers.integrations.moe import use_experts_implementation

    E, D, inner = 3, 8, 8

    @use_experts_implementation(is_concatenated=False, has_bias=True)
    class OaiExperts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts, self.limit, self.alpha = E, 0.5, 1.702
            self.gate_up_proj = torch.nn.Parameter(torch.randn(E, 2 * inner, D))
            self.gate_up_proj_bias = torch.nn.Parameter(torch.randn(E, 2 * inner))
            self.down_proj = torch.nn.Parameter(torch.randn(E, D, inner))
            self.down_proj_bias = torch.nn.Parameter(torch.randn(E, D))

        def _apply_gate(self, gate_up):
            gate, up = gate_up[..., ::2].clamp(max=self.limit), gate_up[..., 1::2].clamp(-self.limit, self.limit)
            return (up + 1) * gate * torch.sigmoid(gate * self.alpha)

    experts = OaiExperts(transformers.PretrainedConfig())
    assert mk_hf._activation(experts) == (mk.swiglu_activation(limit=0.5, alpha=1.702, up_offset=1.0), "")
    experts.limit = 0.25  # the cached answer stays: the module's options are read once
    assert mk_hf._activation(experts)[0] == mk.swiglu_activation(limit=0.5, alpha=1.702, up_offset=1.0)
    name = mk_hf.register(backend="torch")
    x, index, weights = torch.randn(5, D), torch.randint(0, E, (5, 2)), torch.rand(5, 2)
    experts.limit = 0.5
    outputs = {}
    for implementation in ("grouped_mm", name):
        experts.config._experts_implementation = implementation
        outputs[implementation] = experts(x, index, weights)
    torch.testing.assert_close(outputs[name], outputs["grouped_mm"], atol=1e-5, rtol=1e-5)


def test_the_example_trains():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "hf_moe_training.py"
    spec = importlib.util.spec_from_file_location("hf_moe_training", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses = example.train(steps=8, backend="torch")
    assert len(losses) == 8 and all(map(lambda v: v == v, losses))
    assert losses[-1] < losses[0]


def test_from_pretrained_takes_the_name(tmp_path):
    _model("qwen3_moe").save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=mk_hf.register("torch"))
    assert model.config._experts_implementation == "moe_kernels"
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(4))
    got = model(ids).logits
    model.set_experts_implementation("eager")
    torch.testing.assert_close(got, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_experts_stored_transposed_match_eager():
    """Families whose experts keep ``[E, D, 2I]`` and ``[E, I, D]`` (``is_transposed``, as Aria's
    checkpoints do) are served with their weights as they are: outputs and gradients as eager."""
    from transformers.models.aria.modeling_aria import AriaTextMoELayer

    name = mk_hf.register(backend="torch")
    config = transformers.AriaTextConfig(
        hidden_size=16,
        intermediate_size=24,
        moe_num_experts=4,
        moe_topk=2,
        num_attention_heads=2,
        num_hidden_layers=1,
        moe_num_shared_experts=1,
    )
    torch.manual_seed(0)
    layer = AriaTextMoELayer(config)
    assert layer.experts.is_transposed
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x = torch.randn(2, 5, 16)
    results = {}
    for implementation in ("eager", name):
        layer.experts.config._experts_implementation = implementation
        layer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # served, not a fallback
            y = layer(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results[implementation] = (y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()})
    (want, want_grads), (got, got_grads) = results["eager"], results[name]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for param, grad in want_grads.items():
        torch.testing.assert_close(got_grads[param], grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{param}: {m}")


@pytest.mark.parametrize("gated", [True, False])
def test_experts_with_biases_are_served(gated):
    """Experts with biases (as GPT-2-style MLPs upcycled into experts have) run through moe_ffn,
    with the biases inside its GEMMs: the same outputs and gradients as transformers' grouped_mm."""
    from transformers.integrations.moe import use_experts_implementation

    E, D, inner = 4, 16, 12

    @use_experts_implementation(has_bias=True, has_gate=gated)
    class BiasedExperts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = E
            width = 2 * inner if gated else inner
            name = "gate_up_proj" if gated else "up_proj"
            setattr(self, name, torch.nn.Parameter(torch.randn(E, width, D) / 4))
            setattr(self, name + "_bias", torch.nn.Parameter(torch.randn(E, width)))
            self.down_proj = torch.nn.Parameter(torch.randn(E, D, inner) / 4)
            self.down_proj_bias = torch.nn.Parameter(torch.randn(E, D))
            self.act_fn = transformers.activations.ACT2FN[config.hidden_act]

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("the eager forward is not under test")

    name = mk_hf.register(backend="torch")
    config = transformers.PretrainedConfig(hidden_act="silu" if gated else "gelu_pytorch_tanh")
    torch.manual_seed(0)
    experts = BiasedExperts(config)
    x = torch.randn(9, D)
    top_k_index = torch.rand(9, E).argsort(dim=1)[:, :2]
    top_k_weights = torch.rand(9, 2)
    results = {}
    for implementation in ("grouped_mm", name):
        config._experts_implementation = implementation
        experts.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = experts(x, top_k_index, top_k_weights)
        y.square().sum().backward()
        results[implementation] = (y.detach(), {n: p.grad.clone() for n, p in experts.named_parameters()})
    (want, want_grads), (got, got_grads) = results["grouped_mm"], results[name]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for param, grad in want_grads.items():
        torch.testing.assert_close(got_grads[param], grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{param}: {m}")
