"""What every router is: a linear map from tokens to router logits, and a decision made from them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..balance import router_z_loss
from ..dispatch import Dispatch
from ..rules import COEFFICIENT, Setting, check_k, check_positive_int
from ..validation import check_elements

Tensor = torch.Tensor


@dataclass
class Routed:
    """A router's decision for one forward.

    dispatch: which rows each expert computes and each slot's weight (``moe_kernels.Dispatch``,
        built with ``dispatch.by_token`` or ``dispatch.by_expert``).
    loss: the router's auxiliary loss (a balance loss, a predictor's loss), a function called in
        training mode only, so that inference never pays for it; ``None``: no loss.
    record: what ``MoE.on_route`` receives, a function called only when a hook is set; ``None``:
        nothing to record.
    counts: ``[E]`` int32 rows per expert (``MoE.expert_counts``); ``None``: from the dispatch.
    """

    dispatch: Dispatch
    loss: Callable[[], Tensor] | None = None
    record: Callable[[], tuple[Tensor, Tensor]] | None = None
    counts: Tensor | None = None


class Router(nn.Linear):
    """Scores every token against every expert and decides which experts compute which tokens.

    The scores are a linear map (``weight [E, D]``, ``bias [E]`` with ``router_bias``, initialised
    as ``nn.Linear``'s): ``router(tokens [T, D]) -> logits [T, E]``. A subclass says what the
    logits mean in ``route(tokens, logits, backend) -> Routed``; the layer runs the experts on the
    dispatch it returns, whatever the routing.

    Class attributes: ``static_shapes`` says whether the dispatch's sizes in eval mode follow
    from the input's shape alone, with no value read on the host: what CUDA graphs, ``torch.compile``
    without graph breaks and ``torch.export`` need. ``top_k_per_token`` says whether every token
    gets exactly ``top_k`` experts, and then ``Routed.record`` gives ``(experts [T, k], weights
    [T, k])``; else a token gets 0 to ``E`` and it gives ``(chosen [T, E] bool, scores [T, E])``.
    ``route_inputs`` names what the router reads besides the tokens, one value per token, which
    the caller passes to the layer by name (``moe(x, unconditional=mask)``) and ``route`` receives
    flattened to ``[T]`` (as keywords; an input not passed is not given).

    Args:
        dim: ``D``; num_experts: ``E``.
        top_k: the experts a token gets: exactly, or on average for a router where it varies
            (the FLOPs of the routed experts are those of ``top_k`` experts per token).
        router_bias: a bias in the linear map (GPT-OSS's router has one).
        z_loss_coef: ST-MoE's router z-loss, ``mean_t logsumexp(logits[t])^2``, times this,
            added to the auxiliary loss.
    """

    static_shapes: ClassVar[bool] = True
    top_k_per_token: ClassVar[bool] = True
    route_inputs: ClassVar[tuple[str, ...]] = ()
    z_loss_coef = Setting(COEFFICIENT)

    def __init__(self, dim: int, num_experts: int, top_k: int, *, router_bias: bool = False, z_loss_coef: float = 0.0):
        dim = check_positive_int("dim", dim)
        num_experts = check_positive_int("num_experts", num_experts)
        check_elements("the router's weight", (num_experts, dim), "dim and num_experts")
        super().__init__(dim, num_experts, bias=bool(router_bias))
        self.top_k = check_k(top_k, num_experts, name="top_k", experts="num_experts")
        self.z_loss_coef = z_loss_coef

    def __setattr__(self, name: str, value: object) -> None:
        # A setting of another router set on this one would be kept and never read: refuse it.
        if not name.startswith("_") and getattr(type(self), name, None) is None:
            owners = [cls.__name__ for cls in _routers() if isinstance(cls.__dict__.get(name), Setting)]
            if owners:
                raise AttributeError(
                    f"{type(self).__name__} has no setting {name}, a setting of {' and '.join(owners)}"
                )
        super().__setattr__(name, value)

    @property
    def dim(self) -> int:
        return self.in_features

    @property
    def num_experts(self) -> int:
        return self.out_features

    def route(self, tokens: Tensor, logits: Tensor, backend: str, **inputs: Tensor) -> Routed:
        """The decision for ``tokens [T, D]`` from their ``logits [T, E]`` (``self(tokens)``, with
        their graph), on ``backend`` (``"triton"`` or ``"torch"``, already resolved), and the
        ``route_inputs`` the caller gave (``[T]`` each)."""
        raise NotImplementedError(f"{type(self).__name__} must define route(tokens, logits, backend)")

    def aux_loss(self, routed: Routed, logits: Tensor) -> Tensor:
        """The auxiliary loss of a training-mode forward: the router's own plus the z-loss."""
        loss = logits.new_zeros((), dtype=torch.float32) if routed.loss is None else routed.loss()
        if self.z_loss_coef:
            loss = loss + self.z_loss_coef * router_z_loss(logits)
        return loss

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, router_bias={self.bias is not None}"
        )


def _routers() -> list[type[Router]]:
    """Every subclass of ``Router`` defined so far, the user's too."""
    found, todo = [], [Router]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def router_settings() -> set[str]:
    """The names of every router's checked settings (``rules.Setting``)."""
    return {name for cls in _routers() for name, value in vars(cls).items() if isinstance(value, Setting)}
