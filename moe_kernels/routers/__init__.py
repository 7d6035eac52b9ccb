"""Routers: how an MoE layer decides which experts compute which tokens.

A router is a ``Router`` (a linear map from tokens to router logits) whose ``route(tokens,
logits, backend)`` returns a ``Routed``: a ``Dispatch`` (``moe_kernels.dispatch``), and
optionally an auxiliary loss, what ``MoE.on_route`` records, and the rows per expert. The layer
runs the experts on the dispatch whatever made it, so a new routing is one module: subclass
``Router``, build the dispatch with ``dispatch.by_token`` (``k`` experts per token) or
``dispatch.by_expert`` (experts that chose their tokens), and pass an instance to
``MoE(router=...)``. The names below are the layer's string shortcuts, each the constructor of
one router: ``MoE(dim, hidden, E, k, router="expert-choice", group_size=256)`` builds
``ExpertChoice(dim, E, k, group_size=256)``.
"""

from __future__ import annotations

import inspect

from .base import Routed, Router, router_settings
from .diffmoe import CapacityPredictor, DiffMoE
from .expert_choice import ExpertChoice
from .promoe import ProMoE
from .race import ExpertRace
from .token_choice import TokenChoice

ROUTERS: dict[str, type[Router]] = {
    "token-choice": TokenChoice,
    "expert-choice": ExpertChoice,
    "diffmoe": DiffMoE,
    "expert-race": ExpertRace,
    "promoe": ProMoE,
}


def make_router(name: str, dim: int, num_experts: int, top_k: int, **options) -> Router:
    """The router ``name`` (a key of ``ROUTERS``) for ``dim``-wide tokens and ``num_experts``
    experts, ``top_k`` per token, with its keyword ``options``; ``ValueError`` for an unknown
    name, ``TypeError`` naming an option the router does not take."""
    if name not in ROUTERS:
        raise ValueError(f"router must be one of {tuple(ROUTERS)} or a moe_kernels.Router, got {name!r}")
    router = ROUTERS[name]
    known = _options(router)
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(
            f"the {name} router takes no option {', '.join(unknown)} (its options: {', '.join(sorted(known))})"
        )
    return router(dim, num_experts, top_k, **options)


def router_attributes() -> frozenset[str]:
    """What the named routers take and hold: their options and checked settings."""
    return frozenset(set().union(*map(_options, ROUTERS.values())) | router_settings())


def _options(router: type[Router]) -> set[str]:
    """The keyword-only options of ``router``'s constructor and of its bases'."""
    names = set()
    for cls in router.__mro__:
        if cls is Router.__mro__[1]:  # nn.Linear: not a router's option
            break
        init = cls.__dict__.get("__init__")
        if init is not None:
            names |= {p.name for p in inspect.signature(init).parameters.values() if p.kind is p.KEYWORD_ONLY}
    return names


__all__ = [
    "ROUTERS",
    "CapacityPredictor",
    "DiffMoE",
    "ExpertChoice",
    "ExpertRace",
    "ProMoE",
    "Routed",
    "Router",
    "TokenChoice",
    "make_router",
]
