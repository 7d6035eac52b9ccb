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
the expert GEMMs. Experts this path does not cover (interleaved gate/up, a custom gate, a post-expert norm,
an activation ``moe_ffn`` lacks, expert parallelism inside transformers) run through
transformers' own ``grouped_mm`` implementation, with a warning saying why, once per class.
"""

from __future__ import annotations

import warnings

import torch

from ..ffn import moe_ffn

NAME = "moe_kernels"
# transformers' activation names (config.hidden_act) and moe_ffn's, gated and not.
_GATED = {"silu": "swiglu", "swish": "swiglu"}
_PLAIN = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_warned: set[type] = set()


def _activation(experts: torch.nn.Module) -> tuple[str | None, str]:
    """``moe_ffn``'s activation for this experts module, or ``None`` and why it has none."""
    act = getattr(experts.config, "hidden_act", None)
    if getattr(experts, "has_post_expert_norm", False):
        return None, "its experts have a post-expert norm"
    if getattr(experts, "_is_expert_parallel", False):
        return None, "transformers' expert parallelism is on"
    if experts.has_gate:
        if not getattr(experts, "is_concatenated", True):
            return None, "its gate and up projections are interleaved"
        if type(experts)._apply_gate.__name__ != "_default_apply_gate":
            return None, "it has a custom gate"
        return _GATED.get(act), f"its gated activation {act!r} is not SiLU"
    return _PLAIN.get(act), f"its activation {act!r} is not one of {sorted(_PLAIN)}"


def _biases(experts: torch.nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``b_in [E, 2I or I]`` and ``b_out [E, D]``, or ``None`` for experts without biases."""
    if not getattr(experts, "has_bias", False):
        return None, None
    b_in = experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias
    return b_in, experts.down_proj_bias


def _weights(experts: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``w_in [E, D, 2I or I]`` and ``w_out [E, I, D]`` as views of the module's weights."""
    w_in = experts.gate_up_proj if experts.has_gate else experts.up_proj
    w_out = experts.down_proj
    if getattr(experts, "is_transposed", False):
        return w_in, w_out
    return w_in.transpose(1, 2), w_out.transpose(1, 2)


def register(backend: str | None = None) -> str:
    """Register ``moe_kernels`` as a transformers experts implementation; return its name.

    ``backend`` is ``moe_ffn``'s (``None``: Triton on CUDA, PyTorch elsewhere). Calling it again
    replaces the earlier registration. Needs transformers >= 5 (``pip install 'moe-kernels[hf]'``).
    """
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
