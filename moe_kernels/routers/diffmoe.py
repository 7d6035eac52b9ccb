"""DiffMoE: expert choice over a pool of tokens in training, and a capacity predictor that routes
each token on its own at inference.

Training routes by expert choice over a pool of tokens (DiffMoE pools the whole batch), which
needs every token of the pool at once. The predictor learns to tell, from one token alone,
whether an expert would have chosen it: a small MLP on the token's features (detached, so it
never shapes the model) trained with a binary cross-entropy against the selection mask. Each
expert's threshold on the predictor's logit is kept as a running average of the cut that the
training selection implies (midway between the logits of the expert's ``G * C``-th and next
best tokens), so at inference
an expert takes, on average, as many tokens as in training, but more from the tokens that need
it. Moving every threshold by an offset spends more or less compute without retraining.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..dispatch import by_expert
from ..rules import OFFSET, Setting
from .base import Routed
from .expert_choice import ExpertChoice

Tensor = torch.Tensor


class CapacityPredictor(nn.Module):
    """``[T, D]`` tokens -> ``[T, E]`` logits of "expert ``e`` would take this token".

    Args:
        dim: ``D``; num_experts: ``E``; hidden_dim: the MLP's width (default ``D``).
        momentum: of the thresholds' running average (0.99: about the last 100 steps).
    """

    def __init__(self, dim: int, num_experts: int, hidden_dim: int | None = None, momentum: float = 0.99):
        super().__init__()
        hidden = hidden_dim or dim
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, num_experts))
        self.momentum = momentum
        self.register_buffer("thresholds", torch.zeros(num_experts))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens.detach())

    def train_step(self, tokens: torch.Tensor, chosen: torch.Tensor, per_expert: int) -> torch.Tensor:
        """The predictor's loss against ``chosen [T, E]`` (bool: the training selection, each
        expert taking ``per_expert`` tokens), and the thresholds' update from the same logits."""
        logits = self(tokens).float()
        T = logits.shape[0]
        if T == 0:
            return logits.sum()
        with torch.no_grad():
            best = logits.topk(min(per_expert + 1, T), dim=0).values
            # Midway between the logits of each expert's last token in and first token out.
            cut = (best[per_expert - 1] + best[per_expert]) / 2 if per_expert < T else best[-1] - 1
            self.thresholds.lerp_(cut, 1.0 - self.momentum)
        return F.binary_cross_entropy_with_logits(logits, chosen.float())

    def select(self, tokens: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
        """``[T, E]`` bool: the (token, expert) pairs whose logit passes the expert's threshold
        plus ``offset`` (positive: fewer tokens, less compute; negative: more)."""
        return self(tokens).float() > self.thresholds + offset

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


class DiffMoE(ExpertChoice):
    """DiffMoE's router: training routes by expert choice (``ExpertChoice``; DiffMoE pools the
    batch: ``group_size=None``) and trains a ``CapacityPredictor`` on the selection (its loss is the
    auxiliary loss); in eval mode each expert takes the tokens whose predicted logit passes its
    threshold plus ``capacity_offset`` (default 0; positive spends less compute, negative more),
    weighted by their scores, so every token is routed on its own and the compute per token
    varies. That mode reads its row count on the host (``nonzero``): no CUDA graph there.

    Args: as for ``ExpertChoice``.
    """

    static_shapes = False  # eval mode's rows per expert are data (nonzero)
    capacity_offset = Setting(OFFSET)

    def __init__(self, dim: int, num_experts: int, top_k: int, **options):
        super().__init__(dim, num_experts, top_k, **options)
        self.capacity_predictor = CapacityPredictor(self.dim, self.num_experts)
        self.capacity_offset = 0.0

    def route(self, tokens: Tensor, logits: Tensor, backend: str) -> Routed:
        if not self.training:
            return self._predicted(tokens, logits)
        weights, chosen, probs = self.choose(logits, backend)
        routed = self.routed(weights, chosen, probs)
        mask = self.chosen_mask(chosen, tokens.shape[0])
        per_expert = chosen.shape[0] * chosen.shape[2]
        routed.loss = lambda: self.capacity_predictor.train_step(tokens, mask, per_expert)
        routed.record = lambda: (mask, probs)
        return routed

    def _predicted(self, tokens: Tensor, logits: Tensor) -> Routed:
        """Each expert takes the tokens whose predicted logit passes its threshold (plus
        ``capacity_offset``), weighted by their scores; no groups. One host read (``nonzero``)."""
        if tokens.is_meta:
            raise ValueError("DiffMoE's eval-mode routing reads its rows per expert, which meta tensors do not hold")
        mask = self.capacity_predictor.select(tokens, self.capacity_offset)  # [T, E]
        probs = torch.softmax(logits.float(), dim=-1)
        experts, rows = mask.t().nonzero().unbind(1)  # expert-major, tokens in order within an expert
        counts = mask.sum(0, dtype=torch.int32)
        dispatch = by_expert(rows, probs[rows, experts], counts.cumsum(0, dtype=torch.int32), tokens.shape[0])
        return Routed(dispatch, record=lambda: (mask, probs), counts=counts)
