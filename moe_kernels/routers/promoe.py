"""ProMoE's two-step router: the guidance condition first, then prototypes.

Classifier-free guidance runs every image twice, with its label and with the null label, and the
two passes ask different things of the network. ProMoE routes on that explicitly. Step one,
conditional routing: the tokens of the unconditional pass (the caller says which, as the
``unconditional`` input, one bool per token) may only go to the last ``unconditional_experts``
experts, and every other token only to the rest. Step two, prototypical routing: within its
experts a token takes the ``top_k`` whose learnable prototype (a row of the router's weight) it
is most similar to, by cosine similarity over a temperature, weighted by the softmax of those
similarities over its allowed experts.

The routing contrastive loss makes the prototypes worth routing by: for each token, the
cross-entropy of its similarities against its first expert (InfoNCE with that prototype as the
positive and the other allowed ones as negatives), which draws a token's features and its
expert's prototype together (coherence within an expert) and apart from the other prototypes
(diversity between experts). Its weight is ``contrastive_coef``; DiT-MoE's balance loss is added
as token choice's (``balance_loss_alpha``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..balance import loss_from_stats
from ..dispatch import by_token
from ..rules import COEFFICIENT, POSITIVE, Setting, check_positive_int
from ..topk_gating import GatingInputs, gating_with_stats
from .base import Routed, Router

Tensor = torch.Tensor


class ProMoE(Router):
    """ProMoE's router (see the module): ``router(tokens)`` gives the cosine similarities of the
    tokens to the experts' prototypes (the weight's rows) over ``temperature``; ``route`` keeps
    each token to its side of the guidance split (the ``unconditional`` input: the last
    ``unconditional_experts`` experts for those tokens, the others for the rest; without the
    input every token is conditional) and takes its ``top_k`` there, weighted by the softmax over
    its side. Exactly ``top_k`` experts per token, static shapes.

    Args:
        dim, num_experts, top_k, router_bias, z_loss_coef: as for ``Router``.
        unconditional_experts: the experts of the unconditional tokens, from ``top_k`` (the
            default) to ``num_experts - top_k`` (each side must offer ``top_k``).
        temperature: divides the cosine similarities (0.1: logits in [-10, 10]).
        contrastive_coef: the routing contrastive loss's weight.
        balance_loss_alpha: DiT-MoE's balance loss's factor (0 leaves it out).
    """

    route_inputs = ("unconditional",)
    temperature = Setting(POSITIVE)
    contrastive_coef = Setting(COEFFICIENT)
    balance_loss_alpha = Setting(COEFFICIENT)

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        unconditional_experts: int | None = None,
        temperature: float = 0.1,
        contrastive_coef: float = 0.01,
        balance_loss_alpha: float = 0.05,
        router_bias: bool = False,
        z_loss_coef: float = 0.0,
    ):
        super().__init__(dim, num_experts, top_k, router_bias=router_bias, z_loss_coef=z_loss_coef)
        unconditional = check_positive_int(
            "unconditional_experts", self.top_k if unconditional_experts is None else unconditional_experts
        )
        if not self.top_k <= unconditional <= num_experts - self.top_k:
            raise ValueError(
                f"unconditional_experts must leave top_k ({self.top_k}) experts on each side of the guidance split: "
                f"from {self.top_k} to num_experts - top_k ({num_experts - self.top_k}), got {unconditional}"
            )
        self.unconditional_experts = unconditional
        self.temperature = temperature
        self.contrastive_coef = contrastive_coef
        self.balance_loss_alpha = balance_loss_alpha

    def forward(self, tokens: Tensor) -> Tensor:
        similarity = F.linear(F.normalize(tokens, dim=-1), F.normalize(self.weight, dim=-1))
        logits = similarity / self.temperature
        return logits if self.bias is None else logits + self.bias

    def route(self, tokens: Tensor, logits: Tensor, backend: str, unconditional: Tensor | None = None) -> Routed:
        T, E = logits.shape
        if unconditional is None:
            unconditional = torch.zeros(T, dtype=torch.bool, device=logits.device)
        if unconditional.dtype != torch.bool:
            raise TypeError(
                f"unconditional must be a bool tensor (True: a token of the unguided pass), got {unconditional.dtype}"
            )
        their_side = torch.arange(E, device=logits.device) >= E - self.unconditional_experts
        allowed = their_side[None, :] == unconditional[:, None]
        sided = logits.float().masked_fill(~allowed, -torch.inf)
        gating = gating_with_stats(GatingInputs(sided, self.top_k, False, backend))
        contrastive, alpha = self.contrastive_coef, self.balance_loss_alpha

        def loss() -> Tensor:
            first = gating.experts[:, :1].long()
            nce = -torch.log_softmax(sided, dim=-1).gather(1, first).mean() if T else sided.sum()
            balance = loss_from_stats(gating.counts, gating.prob_sums, T, self.top_k, alpha, "dit-moe")
            return contrastive * nce + balance

        return Routed(
            by_token(gating.experts, gating.weights, E, backend),
            loss=loss,
            record=lambda: (gating.experts, gating.weights),
            counts=gating.counts,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", unconditional_experts={self.unconditional_experts}, temperature={self.temperature}, "
            f"contrastive_coef={self.contrastive_coef}"
        )
