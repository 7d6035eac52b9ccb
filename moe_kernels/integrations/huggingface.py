"""Hugging Face transformers: run the experts of its MoE models through ``moe_kernels``.

    import moe_kernels.integrations.huggingface as mk_hf
    mk_hf.register()                      # once; returns "moe_kernels"
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="moe_kernels")
    model.set_experts_implementation("moe_kernels")   # or switch a loaded model

transformers (5.x) lets an MoE model's experts module (a class decorated with
``use_experts_implementation``: Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 and more) be
computed by a registered function of ``(hidden_states [T, D], top_k_index [T, k],
top_k_weights [T, k]) -> [T, D]``. The model keeps its own router, shared experts and losses;
only the routed experts run through ``moe_ffn``. Its stacked weights already fit ours:
``gate_up_proj [E, 2I, D]`` (gate rows first) and ``down_proj [E, D, I]`` are ``w_in`` and
``w_out`` transposed, so they are passed as views, never copied.

Expert biases (``gate_up_proj_bias``/``up_proj_bias`` and ``down_proj_bias``) are added inside
the expert GEMMs. The activation is the one the experts module computes, found by running its
gate (or ``act_fn``) on probe inputs and comparing with each of ``moe_ffn``'s activations, not
``config.hidden_act``, which some families set to another activation than their experts use:
a custom gate is served when it computes one of them: plain SwiGLU (a clamp switched off, SwiGLU
in fp32), or SwiGLU with the options its module holds (``limit``/``swiglu_limit``,
``alpha``/``swiglu_alpha``, softcaps: DeepSeek-V4's clamped SwiGLU, GPT-OSS's activation,
Inkling-2's softcapped SwiGLU). Interleaved
gate and up columns (GPT-OSS) are put in halves by a copy of the weights on each call. Experts
this path does not cover (a post-expert norm, an activation ``moe_ffn`` lacks, expert parallelism
inside transformers) run through transformers' own ``grouped_mm`` implementation, with a warning
naming what was found, once per class.
"""

from __future__ import annotations

import itertools
import numbers
import warnings

import torch

from ..activations import ELEMENTWISE, GATED, activation_fn, swiglu_activation
from ..backend import BACKENDS
from ..ffn import moe_ffn

NAME = "moe_kernels"
_warned: set[type] = set()


def _probe(device: torch.device) -> torch.Tensor:
    """Inputs ``[256, 128]`` spanning magnitudes 1e-3 to 1e3, signs and zeros: wide enough that
    a clamp, a cap or a scale in an activation shows."""
    generator = torch.Generator().manual_seed(0)
    magnitudes = torch.logspace(-3, 3, 256).unsqueeze(1)
    probe = torch.randn(256, 128, generator=generator) * magnitudes
    probe[::17] = 0.0
    return probe.to(device)


def _identify(fn, candidates: tuple[str, ...], device: torch.device) -> str | None:
    """The activation of ``candidates`` that ``fn`` computes (on ``_probe``, in float32), if any."""
    probe = _probe(device)
    with torch.no_grad():
        out = fn(probe)
        for name in candidates:
            want = activation_fn(name)(probe)
            if out.shape == want.shape and torch.allclose(out.float(), want, rtol=1e-5, atol=1e-6):
                return name
    return None


def _describe(act_fn: object) -> str:
    return getattr(act_fn, "__name__", None) or type(act_fn).__name__


def _activation(experts: torch.nn.Module) -> tuple[str | None, str]:
    """``moe_ffn``'s activation for this experts module, or ``None`` and why it has none (cached
    on the module). It is what the module itself computes, its gate (``_apply_gate``) or its
    ``act_fn`` run on probe inputs, never ``config.hidden_act``, which some families set to
    another activation than their experts use."""
    if getattr(experts, "has_post_expert_norm", False):
        return None, "its experts have a post-expert norm"
    if getattr(experts, "_is_expert_parallel", False):
        return None, "transformers' expert parallelism is on"
    cached = experts.__dict__.get("_moe_kernels_activation")
    if cached is None:
        cached = experts.__dict__["_moe_kernels_activation"] = _identify_experts(experts)
    return cached


def _identify_experts(experts: torch.nn.Module) -> tuple[str | None, str]:
    device = next(experts.parameters()).device
    if experts.has_gate:
        custom = type(experts)._apply_gate.__name__ != "_default_apply_gate"
        if not custom and not hasattr(experts, "act_fn"):
            return None, "it has no act_fn to read its activation from"
        found = f"{type(experts).__name__}._apply_gate" if custom else f"act_fn = {_describe(experts.act_fn)}"
        what, candidates = f"its gate ({found})", _gate_candidates(experts)

        def fn(halves: torch.Tensor) -> torch.Tensor:
            return experts._apply_gate(halves if _concatenated(experts) else _interleave(halves))
    else:
        if not hasattr(experts, "act_fn"):
            return None, "it has no act_fn to read its activation from"
        what, candidates = f"its activation (act_fn = {_describe(experts.act_fn)})", ELEMENTWISE
        fn = experts.act_fn
    try:
        activation = _identify(fn, candidates, device)
    except Exception as error:  # noqa: BLE001 - a gate that cannot run alone is not one we know
        return None, f"{what} could not be probed ({type(error).__name__}: {error})"
    if activation is None:
        kinds = ", ".join(candidates) if not experts.has_gate else f"{', '.join(GATED)}, SwiGLU with its options"
        return None, f"{what} computes none of moe_kernels' activations ({kinds})"
    return activation, ""


def _gate_candidates(experts: torch.nn.Module) -> tuple[str, ...]:
    """The gated activations a gate may compute: ours, and SwiGLU with the options the module
    (or its ``act_fn``) holds: a limit, a sigmoid scale, softcaps of the gate and up halves, with
    or without GPT-OSS's ``up + 1``."""

    def number(*names: str) -> float | None:
        for owner, name in itertools.product((experts, getattr(experts, "act_fn", None)), names):
            value = getattr(owner, name, None)
            value = getattr(value, "softcap", value)  # a softcap module holding its cap
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                return float(value)
        return None

    limit, alpha = number("limit", "swiglu_limit"), number("alpha", "swiglu_alpha")
    caps = number("gate_softcap", "mlp_gate_softcap"), number("up_softcap", "mlp_up_softcap")

    def unique(*values):  # in order: the plain option first
        return tuple(dict.fromkeys(values))

    options = itertools.product(unique(None, limit), unique(1.0, alpha or 1.0), (0.0, 1.0), unique((None, None), caps))
    variants = [
        swiglu_activation(limit, alpha, offset, *caps)
        for limit, alpha, offset, caps in options
        if all(v is None or v > 0 for v in (limit, *caps))
    ]
    return tuple(dict.fromkeys([*GATED, *variants]))


def _concatenated(experts: torch.nn.Module) -> bool:
    return getattr(experts, "is_concatenated", True)


def _interleave(halves: torch.Tensor) -> torch.Tensor:
    """``[..., gate | up]`` as ``[..., g0, u0, g1, u1, ...]``."""
    gate, up = halves.chunk(2, dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


def _halves(interleaved: torch.Tensor) -> torch.Tensor:
    """``[..., g0, u0, g1, u1, ...]`` as ``[..., gate | up]`` (a copy)."""
    return torch.cat([interleaved[..., 0::2], interleaved[..., 1::2]], dim=-1)


def _biases(experts: torch.nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``b_in [E, 2I or I]`` and ``b_out [E, D]``, or ``None`` for experts without biases."""
    if not getattr(experts, "has_bias", False):
        return None, None
    b_in = experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias
    return b_in if _concatenated(experts) else _halves(b_in), experts.down_proj_bias


def _weights(experts: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``w_in [E, D, 2I or I]`` and ``w_out [E, I, D]`` as views of the module's weights (gate
    and up columns put in halves by a copy if interleaved)."""
    w_in = experts.gate_up_proj if experts.has_gate else experts.up_proj
    w_out = experts.down_proj
    if not getattr(experts, "is_transposed", False):
        w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
    return w_in if _concatenated(experts) else _halves(w_in), w_out


def register(backend: str | None = None) -> str:
    """Register ``moe_kernels`` as a transformers experts implementation; return its name.

    ``backend`` is ``moe_ffn``'s (``None``: Triton on CUDA, PyTorch elsewhere), checked here.
    Calling it again replaces the earlier registration. Needs transformers >= 5 (``pip install
    'moe-kernels[hf]'``).
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    try:
        from transformers.integrations.moe import ExpertsInterface, grouped_mm_experts_forward
    except ImportError as error:
        raise ImportError(
            "moe_kernels.integrations.huggingface needs transformers >= 5 with ExpertsInterface: "
            "pip install 'moe-kernels[hf]'"
        ) from error

    def experts_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        activation, reason = _activation(self)
        if activation is None:
            if type(self) not in _warned:
                _warned.add(type(self))
                warnings.warn(
                    f"moe_kernels does not run {type(self).__name__}: {reason}; using transformers' grouped_mm",
                    stacklevel=2,
                )
            return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        w_in, w_out = _weights(self)
        b_in, b_out = _biases(self)
        x = hidden_states.to(w_in.dtype)
        y = moe_ffn(
            x, top_k_weights, top_k_index, w_in, w_out, activation=activation, backend=backend, b_in=b_in, b_out=b_out
        )
        return y.to(hidden_states.dtype)

    ExpertsInterface.register(NAME, experts_forward)
    return NAME
