"""Fused Triton kernels for sparse Mixture-of-Experts, behind a small PyTorch API.

``topk_gating``, ``balance_loss``, ``grouped_mm`` and ``moe_ffn`` are differentiable ops, and
``expert_choice_gating`` with ``expert_choice_ffn`` serve expert-choice routing; ``MoE`` is a
drop-in layer for either routing. Every op takes ``backend=None|"auto"|"triton"|"torch"``: ``auto`` means
Triton on CUDA tensors and PyTorch elsewhere, and ``MOE_KERNELS_BACKEND`` overrides it.
Underneath, each op is a custom op in ``torch.ops.moe_kernels`` (see ``moe_kernels.library``), so
``torch.compile``, ``torch.export`` and ``torch.func.grad`` work through them.
"""

from .activations import swiglu_activation
from .balance import balance_loss, update_selection_bias
from .expert_choice import expert_choice_ffn, expert_choice_gating
from .ffn import moe_ffn
from .fp8 import dequantize_fp8, grouped_mm_fp8, quantize_fp8
from .gating import topk_gating
from .grouped_mm import grouped_mm
from .layer import MoE

__all__ = [
    "MoE",
    "balance_loss",
    "dequantize_fp8",
    "expert_choice_ffn",
    "expert_choice_gating",
    "grouped_mm",
    "grouped_mm_fp8",
    "moe_ffn",
    "quantize_fp8",
    "swiglu_activation",
    "topk_gating",
    "update_selection_bias",
]
__version__ = "0.1.0"
