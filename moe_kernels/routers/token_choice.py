"""Token choice: each token takes its ``top_k`` best experts (DiT-MoE, Mixtral, DeepSeek-V3, ...)."""

from __future__ import annotations

import torch

from ..balance import CONVENTIONS, loss_from_stats
from ..dispatch import by_token
from ..rules import COEFFICIENT, Setting
from ..topk_gating import GatingInputs, check_routing_options, gating_with_stats
from .base import Routed, Router

Tensor = torch.Tensor


class TokenChoice(Router):
    """Top-k gating (``topk_gating``) with the expert-level balance loss of DiT-MoE.

    Args:
        dim, num_experts, top_k, router_bias, z_loss_coef: as for ``Router``.
        normalize_weights: divide each token's ``top_k`` weights by their sum (DiT-MoE does not).
        balance_loss_alpha: the balance loss's factor (the paper's 0.05); its
            ``balance_loss_convention`` is ``"dit-moe"`` or ``"switch"`` (see ``balance_loss``).
        score: ``"softmax"`` over the experts, or ``"sigmoid"`` per expert (DeepSeek-V3).
        selection_bias: a buffer ``expert_bias [E]`` that shifts selection but not the weights,
            moved by ``moe_kernels.update_selection_bias`` (DeepSeek-V3's balancing).
        num_groups, topk_groups: group-limited routing (see ``topk_gating``).
        routed_scale: a factor on the routed weights.
    """

    balance_loss_alpha = Setting(COEFFICIENT)

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        normalize_weights: bool = False,
        balance_loss_alpha: float = 0.05,
        balance_loss_convention: str = "dit-moe",
        score: str = "softmax",
        selection_bias: bool = False,
        num_groups: int = 1,
        topk_groups: int | None = None,
        routed_scale: float = 1.0,
        router_bias: bool = False,
        z_loss_coef: float = 0.0,
    ):
        super().__init__(dim, num_experts, top_k, router_bias=router_bias, z_loss_coef=z_loss_coef)
        self.num_groups, self.topk_groups, self.routed_scale = check_routing_options(
            num_experts, self.top_k, score, num_groups, topk_groups, routed_scale,
            names=("num_experts", "top_k", "routed_scale"),
        )  # fmt: skip
        if balance_loss_convention not in CONVENTIONS:
            raise ValueError(f"balance_loss_convention must be one of {CONVENTIONS}, got {balance_loss_convention!r}")
        self.score, self.balance_loss_convention = score, balance_loss_convention
        self.normalize_weights = bool(normalize_weights)
        self.balance_loss_alpha = balance_loss_alpha
        if selection_bias:
            # Not a parameter: update_selection_bias moves it between steps (DeepSeek-V3).
            self.register_buffer("expert_bias", torch.zeros(num_experts))
        else:
            self.expert_bias = None

    def route(self, tokens: Tensor, logits: Tensor, backend: str) -> Routed:
        gating = gating_with_stats(
            GatingInputs(logits, self.top_k, self.normalize_weights, backend, self.score, self.expert_bias,
                         self.num_groups, self.topk_groups, self.routed_scale)
        )  # fmt: skip

        def balance_loss() -> Tensor:
            return loss_from_stats(
                gating.counts, gating.prob_sums, tokens.shape[0], self.top_k, self.balance_loss_alpha,
                self.balance_loss_convention,
            )  # fmt: skip

        return Routed(
            by_token(gating.experts, gating.weights, self.num_experts, backend),
            loss=balance_loss,
            record=lambda: (gating.experts, gating.weights),
            counts=gating.counts,
        )

    def extra_repr(self) -> str:
        options = f", normalize_weights={self.normalize_weights}, score={self.score!r}"
        if self.expert_bias is not None:
            options += ", selection_bias=True"
        if self.num_groups > 1:
            options += f", num_groups={self.num_groups}, topk_groups={self.topk_groups}"
        return super().extra_repr() + options
