"""Fused Triton kernels for sparse Mixture-of-Experts, behind a small PyTorch API.

``topk_gating``, ``expert_choice_gating``, ``balance_loss``, ``grouped_mm``, ``moe_ffn`` and
``expert_choice_ffn`` are differentiable ops; ``MoE`` is a drop-in layer whose router
(``Router``: ``TokenChoice``, ``ExpertChoice``, ``DiffMoE``, ``ExpertRace``, ``ProMoE``, or your
own) decides which experts compute which tokens, as a ``Dispatch`` that one experts op runs. Every op takes
``backend=None|"auto"|"triton"|"torch"``: ``auto`` means Triton on CUDA tensors and PyTorch
elsewhere, and ``MOE_KERNELS_BACKEND`` overrides it. Underneath, each op is a custom op in
``torch.ops.moe_kernels`` (see ``moe_kernels.library``), so ``torch.compile``, ``torch.export``
and ``torch.func.grad`` work through them.

Public besides: ``moe_kernels.dispatch`` (building a dispatch), ``moe_kernels.routers``,
``moe_kernels.rules`` (the rules every public number follows), ``moe_kernels.parallel`` (expert
parallelism) and ``moe_kernels.integrations.huggingface``.
"""

from .activations import ACTIVATIONS, projection_width, swiglu_activation
from .backend import BACKENDS
from .balance import balance_loss, update_selection_bias
from .dispatch import Dispatch
from .expert_choice_gating import expert_choice_gating
from .ffn import expert_choice_ffn, moe_ffn
from .fp8 import dequantize_fp8, quantize_fp8
from .grouped_mm import grouped_mm, grouped_mm_fp8
from .layer import MoE
from .routers import ROUTERS, DiffMoE, ExpertChoice, ExpertRace, ProMoE, Routed, Router, TokenChoice
from .topk_gating import topk_gating

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "ROUTERS",
    "DiffMoE",
    "Dispatch",
    "ExpertChoice",
    "ExpertRace",
    "ProMoE",
    "MoE",
    "Routed",
    "Router",
    "TokenChoice",
    "balance_loss",
    "dequantize_fp8",
    "expert_choice_ffn",
    "expert_choice_gating",
    "grouped_mm",
    "grouped_mm_fp8",
    "moe_ffn",
    "projection_width",
    "quantize_fp8",
    "swiglu_activation",
    "topk_gating",
    "update_selection_bias",
]
__version__ = "0.1.0"
