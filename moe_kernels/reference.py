"""Plain PyTorch implementations of every op: the executable specification.

They favour obviousness over speed (loops over experts, explicit masks) and are what the
tests compare both backends against. Shapes: ``T`` tokens, ``D`` model width, ``E`` experts,
``k`` experts per token, ``H`` expert hidden width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .activations import parse_activation


def activation_fn(activation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map between the two expert GEMMs. The gated ones (``"swiglu"``, ``"geglu"``,
    ``"geglu_tanh"``, SwiGLU with options) take ``[..., 2H]`` (gate half first, then up half) to
    ``act(gate) * up``; the others keep the width."""
    elementwise = {
        "gelu": F.gelu,
        "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"),
        "silu": F.silu,
        "relu": F.relu,
        "relu2": lambda a: F.relu(a) ** 2,
    }
    name, glu = parse_activation(activation)
    if glu is None:
        return elementwise[name]

    def gated(a: torch.Tensor) -> torch.Tensor:
        gate, up = a[..., : a.shape[-1] // 2], a[..., a.shape[-1] // 2 :]
        if glu.limit is not None:
            gate, up = torch.clamp(gate, max=glu.limit), torch.clamp(up, -glu.limit, glu.limit)
        linear = gate if glu.gate_softcap is None else glu.gate_softcap * torch.tanh(gate / glu.gate_softcap)
        up = up if glu.up_softcap is None else glu.up_softcap * torch.tanh(up / glu.up_softcap)
        if glu.alpha == 1 and glu.gate_softcap is None:
            return elementwise[glu.elementwise](gate) * (up + glu.up_offset)
        return linear * torch.sigmoid(glu.alpha * gate) * (up + glu.up_offset)

    return gated


def topk_gating(
    logits: torch.Tensor,
    k: int,
    normalize: bool = False,
    *,
    score: str = "softmax",
    bias: torch.Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int | None = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores (softmax over ``E`` experts, or a sigmoid each), then the ``k`` largest, one argmax
    at a time, among the experts of the best ``topk_groups`` groups when ``num_groups > 1``.

    Selection ranks ``scores + bias``; the weights are the unbiased scores (renormalised over the
    ``k`` if ``normalize``), times ``scale``; all NaN if any bias is not finite. A group's rank is
    the sum of its two best biased scores. Ties go to the lower index. A NaN score ranks above
    every number, as ``torch.sort`` ranks it, so such a row still names ``k`` valid experts and its
    NaN weights carry on.

    Args:
        logits: ``[T, E]``; bias: ``[E]`` or ``None``.
    Returns:
        ``weights [T, k]`` fp32, ``experts [T, k]`` int64, ``probs [T, E]`` fp32 (the scores).
    """
    logits = logits.float()
    probs = torch.sigmoid(logits) if score == "sigmoid" else torch.softmax(logits, dim=-1)
    num_tokens, num_experts = probs.shape
    rank = probs if bias is None else probs + bias.float()
    rank = torch.where(rank.isnan(), torch.inf, rank)
    allowed = torch.ones_like(rank, dtype=torch.bool)
    if num_groups > 1:
        size = num_experts // num_groups
        group_rank = torch.stack(
            [
                rank[:, g * size : (g + 1) * size].sort(dim=-1, descending=True).values[:, :2].sum(dim=-1)
                for g in range(num_groups)
            ],
            dim=1,
        )
        allowed = torch.zeros_like(allowed)
        for t in range(num_tokens):
            for g in _argmax_rounds(group_rank[t], topk_groups or num_groups):
                allowed[t, g * size : (g + 1) * size] = True
    experts = (
        torch.stack(
            [
                torch.tensor(_argmax_rounds(torch.where(allowed[t], rank[t], -torch.inf), k), dtype=torch.int64)
                for t in range(num_tokens)
            ]
        )
        .reshape(num_tokens, k)
        .to(probs.device)
    )
    weights = probs.gather(1, experts)
    if bias is not None and not bool(bias.isfinite().all()):  # a bad bias shows, never skews silently
        weights = torch.full_like(weights, torch.nan)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * scale, experts, probs


def _argmax_rounds(values: torch.Tensor, n: int) -> list[int]:
    """The indices of the ``n`` largest of ``values`` [E], largest first, ties to the lower index."""
    taken: list[int] = []
    for _ in range(n):
        best = max((i for i in range(values.shape[0]) if i not in taken), key=lambda i: (values[i].item(), -i))
        taken.append(best)
    return taken


def balance_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int, alpha: float = 0.05) -> torch.Tensor:
    """Expert-level balance loss (DiT-MoE eq. 5): ``alpha * sum_i f_i * P_i``.

    ``f_i = E * count_i / (T * k)`` is expert ``i``'s share of the ``T * k`` routed slots, times
    ``E``; ``P_i`` is its mean router probability. Equals ``alpha`` under perfect balance.
    """
    num_tokens, k = experts.shape
    one_hot = F.one_hot(experts.reshape(-1), num_experts).float()
    f = num_experts * one_hot.sum(dim=0) / (num_tokens * k)
    return alpha * (f * probs.float().mean(dim=0)).sum()


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``y[offsets[e-1]:offsets[e]] = x[offsets[e-1]:offsets[e]] @ w[e]``.

    Args:
        x: ``[M, K]``; w: ``[E, K, N]``; offsets: ``[E]`` cumulative row ends.
    Returns:
        ``[M, N]``.
    """
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    return torch.cat([x[s:e] @ w[g] for g, (s, e) in enumerate(zip(starts, ends))])


def moe_ffn(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: str = "swiglu",
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[t] = sum_j weights[t, j] * (act(x[t] @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e])``
    with ``e = experts[t, j]`` (a missing bias is zero).

    Args:
        x: ``[T, D]``; weights: ``[T, k]``; experts: ``[T, k]``;
        w_in: ``[E, D, 2H]`` for swiglu, else ``[E, D, H]``; w_out: ``[E, H, D]``;
        b_in: ``[E, 2H or H]``; b_out: ``[E, D]``.
    Returns:
        ``[T, D]`` in ``x.dtype``; the weighted combine is accumulated in fp32.
    """
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w_in.shape[0]):
        token, slot = (experts == e).nonzero(as_tuple=True)
        out = expert_mlp(x[token], e, w_in, w_out, activation, b_in, b_out)
        y = y.index_add(0, token, weights[token, slot, None].float() * out.float())
    return y.to(x.dtype)


def expert_mlp(
    rows: torch.Tensor,
    e: int,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: str,
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expert ``e``'s MLP on ``rows [N, D]``: ``act(rows @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]``."""
    preact = rows @ w_in[e] + (0 if b_in is None else b_in[e])
    return activation_fn(activation)(preact) @ w_out[e] + (0 if b_out is None else b_out[e])


def expert_choice_gating(
    logits: torch.Tensor, capacity: int, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each expert's ``capacity`` highest softmax scores among each group's tokens, one token at
    a time (ties to the lower index; a NaN score above every number).

    Returns:
        ``weights [G, E, C]`` fp32, ``tokens [G, E, C]`` int64 (row indices of ``logits``),
        ``probs [T, E]`` fp32.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    num_tokens, num_experts = probs.shape
    size = group_size or num_tokens
    weights, tokens = [], []
    for first in range(0, num_tokens, size):
        group = probs[first : first + size]
        rank = torch.where(group.isnan(), torch.inf, group)
        chosen = [[first + i for i in _argmax_rounds(rank[:, e], capacity)] for e in range(num_experts)]
        index = torch.tensor(chosen, dtype=torch.int64, device=probs.device)
        tokens.append(index)
        weights.append(torch.stack([probs[index[e], e] for e in range(num_experts)]))
    return torch.stack(weights), torch.stack(tokens), probs


def expert_choice_ffn(
    x: torch.Tensor,
    weights: torch.Tensor,
    tokens: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: str = "swiglu",
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[t] = sum over the (g, e, c) with tokens[g, e, c] = t of weights[g, e, c] * FFN_e(x[t])``:
    a token chosen by no expert gets 0, one chosen by several the sum of their outputs."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w_in.shape[0]):
        token = tokens[:, e].reshape(-1)
        out = expert_mlp(x[token], e, w_in, w_out, activation, b_in, b_out)
        y = y.index_add(0, token, weights[:, e].reshape(-1, 1).float() * out.float())
    return y.to(x.dtype)


def expert_race(logits: torch.Tensor, winners: int) -> torch.Tensor:
    """``[T, E]`` bool: the ``winners`` best (token, expert) pairs of ``logits``, one pair at a
    time (ties to the lower token, then the lower expert; a NaN logit above every number)."""
    flat = logits.detach().float().flatten()
    rank = torch.where(flat.isnan(), torch.inf, flat)
    chosen = torch.zeros(flat.shape, dtype=torch.bool, device=logits.device)
    chosen[_argmax_rounds(rank, winners)] = True
    return chosen.view(logits.shape)
