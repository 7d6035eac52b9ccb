"""Expert choice (EC-DiT): each expert takes its best tokens of each group of tokens."""

from __future__ import annotations

import math

import torch

from ..expert_choice_gating import check_groups, choice_dispatch, expert_choice_gating_apply
from ..rules import POSITIVE_INT, SCALE, Setting
from .base import Routed, Router

Tensor = torch.Tensor


class ExpertChoice(Router):
    """Each expert takes the ``C`` highest-scoring tokens of each group of ``group_size``
    consecutive tokens (``None``: all the tokens of a forward), scores being the softmax over
    experts (``expert_choice_gating``); a token gets 0 to ``E`` experts, weighted by their scores.

    ``capacity_factor`` (default ``top_k``) is the average number of experts per token:
    ``C = round(group_size * capacity_factor / num_experts)`` (halves up), so at ``top_k`` the
    FLOPs are token choice's; change it at evaluation to spend more or less compute. Balanced by
    construction: no balance loss (the z-loss if asked), and ``counts`` is ``G * C`` for every
    expert. Every expert owns ``G * C`` rows whatever the data, so under expert parallelism the
    exchange sizes follow from the shapes (no host sync); every rank must then pass the same
    number of tokens.

    Args:
        dim, num_experts, top_k, router_bias, z_loss_coef: as for ``Router``.
        group_size: the tokens of a group (a DiT image's ``S``), or ``None``: one group per forward.
        capacity_factor: the average experts per token, default ``top_k``.
    """

    top_k_per_token = False
    # Checked when set: a factor beyond E, or one that rounds to no token per group, is refused then.
    group_size = Setting(POSITIVE_INT, lambda router, size: router._check_capacity(size, None), optional=True)
    capacity_factor = Setting(SCALE, lambda router, factor: router._check_capacity(None, factor))

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        group_size: int | None = None,
        capacity_factor: float | None = None,
        router_bias: bool = False,
        z_loss_coef: float = 0.0,
    ):
        super().__init__(dim, num_experts, top_k, router_bias=router_bias, z_loss_coef=z_loss_coef)
        self.group_size = group_size
        self.capacity_factor = float(self.top_k) if capacity_factor is None else capacity_factor

    def capacity(self, group_size: int, capacity_factor: float | None = None) -> int:
        """``C``, the tokens each expert takes from a group of ``group_size``, at ``capacity_factor``
        (default: the router's); ``ValueError`` where none can work."""
        factor = SCALE.check("capacity_factor", self.capacity_factor if capacity_factor is None else capacity_factor)
        if factor > self.num_experts:
            raise ValueError(f"capacity_factor ({factor}) cannot exceed num_experts ({self.num_experts})")
        capacity = math.floor(group_size * factor / self.num_experts + 0.5)
        if capacity < 1:
            raise ValueError(
                f"group_size ({group_size}) x capacity_factor ({factor}) / num_experts ({self.num_experts}) rounds "
                "to 0 tokens per expert: use larger groups or a larger capacity_factor"
            )
        return capacity

    def _check_capacity(self, group_size: int | None, factor: float | None) -> None:
        """Refuse a new group size or factor that ``capacity`` would refuse with the other one:
        a factor beyond ``num_experts``, or a group of known size left with no token per expert."""
        factor = self.__dict__.get("capacity_factor") if factor is None else factor
        size = self.__dict__.get("group_size") if group_size is None else group_size
        if factor is None:  # constructing: the factor is set next
            return
        if factor > self.num_experts:
            raise ValueError(f"capacity_factor ({factor}) cannot exceed num_experts ({self.num_experts})")
        if size is not None:
            self.capacity(size, factor)

    def choose(self, logits: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
        """``expert_choice_gating`` of ``logits [T, E]`` at this router's groups and capacity:
        ``weights, tokens [G, E, C]`` and ``probs [T, E]``."""
        T = logits.shape[0]
        capacity = self.capacity(self.group_size or max(T, 1))
        return expert_choice_gating_apply(
            logits, capacity, check_groups(T, capacity, self.group_size, backend), backend
        )

    @staticmethod
    def chosen_mask(tokens: Tensor, num_tokens: int) -> Tensor:
        """``[T, E]`` bool: which experts took each token, from ``tokens [G, E, C]``."""
        E = tokens.shape[1]
        mask = torch.zeros(num_tokens, E, dtype=torch.bool, device=tokens.device)
        return mask.scatter_(0, tokens.transpose(1, 2).reshape(-1, E), True)

    def route(self, tokens: Tensor, logits: Tensor, backend: str) -> Routed:
        return self.routed(*self.choose(logits, backend))

    def routed(self, weights: Tensor, chosen: Tensor, probs: Tensor) -> Routed:
        """The decision of an expert choice (``choose``'s outputs)."""
        T = probs.shape[0]
        per_expert = chosen.shape[0] * chosen.shape[2]
        counts = torch.full((self.num_experts,), per_expert, dtype=torch.int32, device=probs.device)
        return Routed(
            choice_dispatch(weights, chosen, T), record=lambda: (self.chosen_mask(chosen, T), probs), counts=counts
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}, capacity_factor={self.capacity_factor}"
