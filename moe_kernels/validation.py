"""Argument checks shared by the public ops: bad input fails here with a message naming the
argument, never later inside a kernel."""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(
    name: str,
    value: object,
    ndim: int | None,
    dtypes: tuple[torch.dtype, ...],
) -> torch.Tensor:
    """Check that ``value`` is a tensor of ``ndim`` dimensions (any, for ``None``) and one of ``dtypes``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """Check that all tensors share one device and return it."""
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{name} is on {device} but {first_name} is on {first}; all inputs must share a device")
    return first


def check_dim(name: str, tensor: torch.Tensor, dim: int, expected: int, meaning: str) -> None:
    """Check ``tensor.shape[dim] == expected`` and say what the size stands for if not."""
    if tensor.shape[dim] != expected:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}: dimension {dim} must be {expected} ({meaning})")


@dataclass(frozen=True)
class Rule:
    """What a public number must be: an integer or a finite real, within bounds. Each rule is
    defined once here and used wherever such a number enters, the layer, the ops and the
    command lines alike (``dit.cli`` builds its argument types from these), so a value is
    accepted everywhere or nowhere."""

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


def values_checkable(tensor: torch.Tensor) -> bool:
    """Whether reading values back to the host is allowed: in eager mode only, not while
    ``torch.compile`` or ``torch.export`` traces (the values are unknown there) nor while a
    CUDA graph is captured, and not from meta tensors (which hold none)."""
    if torch.compiler.is_compiling() or tensor.is_meta:
        return False
    return not (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


def check_expert_ids(name: str, experts: torch.Tensor, num_experts: int) -> None:
    """Check that every id lies in ``[0, num_experts)``; costs one host sync on CUDA."""
    if experts.numel() == 0 or not values_checkable(experts):
        return
    low, high = torch.aminmax(experts)
    low, high = int(low), int(high)
    if low < 0 or high >= num_experts:
        raise ValueError(f"{name} holds expert ids in [{low}, {high}], expected ids in [0, {num_experts})")


def check_offsets(offsets: torch.Tensor, num_rows: int) -> None:
    """Check that ``offsets`` is non-decreasing, non-negative and ends at ``num_rows``."""
    if not values_checkable(offsets):
        return
    ends = offsets.long()
    if bool((ends[0] < 0) | (ends[1:] < ends[:-1]).any()):
        raise ValueError(f"offsets must be non-negative and non-decreasing, got {offsets.tolist()}")
    if int(ends[-1]) != num_rows:
        raise ValueError(f"offsets[-1] must equal the number of rows of x ({num_rows}), got {int(ends[-1])}")
