"""DiffMoE's capacity predictor: at inference, each expert's token count set per token.

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
