"""Expert Race (Race-DiT): tokens and experts race together, the best (token, expert) pairs win.

Token choice gives every token ``k`` experts; expert choice every expert ``C`` tokens. Expert
Race ranks every (token, expert) pair of a forward by its router logit and keeps the best
``T * k``: a token may get any number of experts (zero included), an expert any number of
tokens, so the compute goes where the scores say it matters (the hard timesteps, the busy
regions of an image). Each winning pair is weighted by its sigmoid score, which compares across
tokens as a softmax over experts would not.

Training races within the forward's tokens, which makes a token's experts depend on its batch.
To route each token on its own at inference, the router keeps a running average of the logit
that separated winners from losers in training (midway between the ``T * k``-th best pair and
the next) and, in eval mode, a pair wins when its logit passes that threshold plus
``capacity_offset`` (positive: less compute, negative: more), as DiffMoE's predictor does.

Against collapse (a few experts taking everything) the paper pairs the race with a router
similarity loss; here, the mean square of the off-diagonal correlations between the experts'
logits over the forward's tokens: zero when no two experts score the tokens alike, so the
experts spread over different tokens. Its weight is ``similarity_coef``.
"""

from __future__ import annotations

import torch

from ..dispatch import by_expert
from ..rules import COEFFICIENT, OFFSET, PROBABILITY, Setting
from .base import Routed, Router

Tensor = torch.Tensor


def race(logits: Tensor, winners: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``winners`` best (token, expert) pairs of ``logits [T, E]``, ties to the lower token,
    then the lower expert (a NaN logit above every number, so that it shows): ``experts, rows``,
    int64 ``[winners]`` each, expert-major and by token within an expert, and the cut: the logit
    midway between the last winner and the first loser (the last winner's minus 1 when all win,
    0 when none plays)."""
    T, E = logits.shape
    flat = logits.detach().float().flatten()
    if winners == 0:
        none = flat.new_zeros(0, dtype=torch.int64)
        return none, none, flat.new_zeros(())
    values, order = torch.sort(flat, descending=True, stable=True)
    pairs = order[:winners]
    experts, rows = pairs % E, pairs // E
    by_expert_order = torch.argsort(experts * T + rows)
    if winners < flat.numel():
        cut = (values[winners - 1] + values[winners]) / 2
    else:
        cut = values[-1] - 1
    return experts[by_expert_order], rows[by_expert_order], cut


def similarity_loss(logits: Tensor) -> Tensor:
    """The mean square of the off-diagonal correlations between the experts' columns of
    ``logits [T, E]`` over the tokens (0 for fewer than two tokens or one expert)."""
    T, E = logits.shape
    values = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
    if T < 2 or E < 2:
        return values.sum() * 0.0
    centred = values - values.mean(0)
    normed = centred / centred.square().mean(0).add(1e-6).sqrt()
    correlation = normed.t() @ normed / T
    off_diagonal = correlation - torch.diag_embed(correlation.diagonal())
    return off_diagonal.square().sum() / (E * (E - 1))


class ExpertRace(Router):
    """Expert Race's router (see the module): in training the best ``T * top_k`` (token, expert)
    pairs of a forward win, by router logit; in eval mode the pairs whose logit passes the
    running threshold plus ``capacity_offset``. A winning pair's weight is its sigmoid score;
    a token gets 0 to ``E`` experts. Rows per expert are data: eval mode reads them on the host
    (``nonzero``), so no CUDA graph there.

    Args:
        dim, num_experts, router_bias, z_loss_coef: as for ``Router``.
        top_k: the experts a token gets on average (``T * top_k`` pairs win in training).
        similarity_coef: the weight of the router similarity loss (the auxiliary loss).
        momentum: of the threshold's running average (0.99: about the last 100 steps).
    """

    static_shapes = False  # eval mode's rows per expert are data (nonzero)
    top_k_per_token = False
    capacity_offset = Setting(OFFSET)
    similarity_coef = Setting(COEFFICIENT)
    momentum = Setting(PROBABILITY)

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        similarity_coef: float = 0.01,
        momentum: float = 0.99,
        router_bias: bool = False,
        z_loss_coef: float = 0.0,
    ):
        super().__init__(dim, num_experts, top_k, router_bias=router_bias, z_loss_coef=z_loss_coef)
        self.similarity_coef = similarity_coef
        self.momentum = momentum
        self.capacity_offset = 0.0
        self.register_buffer("threshold", torch.zeros(()))

    def route(self, tokens: Tensor, logits: Tensor, backend: str) -> Routed:
        T, E = logits.shape
        if self.training:
            experts, rows, cut = race(logits, T * self.top_k)
            if T:
                self.threshold.lerp_(cut.to(self.threshold.dtype), 1.0 - self.momentum)
        else:
            if logits.is_meta:
                raise ValueError(
                    "ExpertRace's eval-mode routing reads its rows per expert, which meta tensors do not hold"
                )
            passed = logits.detach().float() > self.threshold + self.capacity_offset
            experts, rows = passed.t().nonzero().unbind(1)
        counts = torch.zeros(E, dtype=torch.int32, device=logits.device).index_add_(
            0, experts, torch.ones_like(experts, dtype=torch.int32)
        )
        scores = torch.sigmoid(logits.float())
        dispatch = by_expert(rows, scores[rows, experts], counts.cumsum(0, dtype=torch.int32), T)
        coef = self.similarity_coef

        def mask() -> Tensor:
            chosen = torch.zeros(T, E, dtype=torch.bool, device=logits.device)
            chosen[rows, experts] = True
            return chosen

        return Routed(
            dispatch, loss=(lambda: coef * similarity_loss(logits)), record=lambda: (mask(), scores), counts=counts
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", similarity_coef={self.similarity_coef}, momentum={self.momentum}"
