"""The rules every public number follows: an integer or a finite real, within bounds.

Each rule is defined once here and used wherever such a number enters, the layer, the routers, the
ops and the command lines alike (``dit`` builds its argument types from these), so a value is
accepted everywhere or nowhere. Public: ``from moe_kernels.rules import POSITIVE_INT``.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """What a public number must be: an integer or a finite real, within bounds."""

    integer: bool
    low: float | None = None
    high: float | None = None
    open_low: bool = False  # ``low`` itself excluded
    open_high: bool = False

    @property
    def wanted(self) -> str:
        """The rule in words, e.g. ``"an integer >= 1"`` or ``"a finite number in [0, 1)"``."""
        kind = "an integer" if self.integer else "a finite number"
        low = None if self.low is None else f"{self.low:g}"
        high = None if self.high is None else f"{self.high:g}"
        if low is not None and high is not None:
            return f"{kind} in {'(' if self.open_low else '['}{low}, {high}{')' if self.open_high else ']'}"
        if low is not None:
            return f"{kind} {'>' if self.open_low else '>='} {low}"
        if high is not None:
            return f"{kind} {'<' if self.open_high else '<='} {high}"
        return kind

    def check(self, name: str, value: object) -> int | float:
        """``value`` as an ``int`` (integer rules) or ``float``: a ``TypeError`` if it is not a
        number of the kind (a bool, a string, a tensor), a ``ValueError`` if it breaks the rule,
        each naming ``name``."""
        if isinstance(value, bool):
            raise TypeError(f"{name} must be {self.wanted}, got bool")
        if self.integer:
            try:
                value = operator.index(value)  # ints, NumPy integers, SymInts
            except TypeError:
                shown = (
                    f"{value!r} ({type(value).__name__})" if isinstance(value, numbers.Real) else type(value).__name__
                )
                raise TypeError(f"{name} must be {self.wanted}, got {shown}") from None
        elif isinstance(value, numbers.Real):
            value = float(value)
        else:
            raise TypeError(f"{name} must be {self.wanted}, got {type(value).__name__}")
        if not (self.integer or math.isfinite(value)) or not self.admits(value):
            raise ValueError(f"{name} must be {self.wanted}, got {value!r}")
        return value

    def admits(self, value: float) -> bool:
        """Whether ``value`` (a number of the right kind) lies within the bounds."""
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or (value < self.high if self.open_high else value <= self.high)


POSITIVE_INT = Rule(integer=True, low=1)
NONNEGATIVE_INT = Rule(integer=True, low=0)
POSITIVE = Rule(integer=False, low=0, open_low=True)
NONNEGATIVE = Rule(integer=False, low=0)
PROBABILITY = Rule(integer=False, low=0, high=1)
# Factors that multiply float32 (or bf16) values: loss weights, rates, guidance scales, the
# routed weights' scale. Bounded well inside float32's range (about 3e38), so that a result is
# never infinite because of the factor alone; useful values are many orders of magnitude smaller.
COEFFICIENT = Rule(integer=False, low=0, high=1e6)
SCALE = Rule(integer=False, low=0, high=1e6, open_low=True)
# A shift of logits (DiffMoE's capacity offset): any sign, bounded as the factors are.
OFFSET = Rule(integer=False, low=-1e6, high=1e6)


def check_positive_int(name: str, value: object) -> int:
    """Check that ``value`` is an integer >= 1 (a Python int or anything with ``__index__``)."""
    return POSITIVE_INT.check(name, value)


def check_k(k: object, num_experts: int, name: str = "k", experts: str = "the number of experts") -> int:
    """Check ``1 <= k <= num_experts``; ``experts`` says where ``num_experts`` comes from."""
    k = POSITIVE_INT.check(name, k)
    if k > num_experts:
        raise ValueError(f"{name} must be <= {experts} ({num_experts}), got {k}")
    return k


class Setting:
    """A setting of a module checked whenever it is set, in the constructor or afterwards: by
    ``rule`` (``None`` allowed with ``optional``), then by ``check(module, value)`` for what
    depends on the module's other settings. A class attribute: ``capacity_offset = Setting(OFFSET)``."""

    def __init__(self, rule: Rule, check: Callable[[object, float], None] | None = None, optional: bool = False):
        self.rule, self.check, self.optional = rule, check, optional

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, module: object, owner: type | None = None) -> object:
        if module is None:
            return self
        return module.__dict__[self.name]

    def __set__(self, module: object, value: object) -> None:
        if not (self.optional and value is None):
            value = self.rule.check(self.name, value)
            if self.check is not None:
                self.check(module, value)
        module.__dict__[self.name] = value
