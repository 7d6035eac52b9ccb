"""Tensor checks shared by the public ops: bad input fails here with a message naming the
argument, never later inside a kernel. The rules for numbers are ``rules.py``."""

from __future__ import annotations

import math

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


def check_elements(tensor: str, shape: tuple[int, ...], arguments: str) -> None:
    """A clear error for weights too large for any tensor (their size in bytes must fit int64)."""
    if math.prod(shape) * torch.get_default_dtype().itemsize >= 2**63:
        raise ValueError(f"{arguments} make {tensor} of shape {shape}, more bytes than a tensor can hold (2**63)")


def check_dim(name: str, tensor: torch.Tensor, dim: int, expected: int, meaning: str) -> None:
    """Check ``tensor.shape[dim] == expected`` and say what the size stands for if not."""
    if tensor.shape[dim] != expected:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}: dimension {dim} must be {expected} ({meaning})")


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


def check_counts(name: str, counts: torch.Tensor) -> None:
    """Check that every count is finite and non-negative (one host sync; none where values
    cannot be read)."""
    if values_checkable(counts) and not bool(((counts >= 0) & torch.isfinite(counts.float())).all()):
        raise ValueError(f"{name} must be finite and non-negative: routed slots per expert")


def check_offsets(offsets: torch.Tensor, num_rows: int) -> None:
    """Check that ``offsets`` is non-decreasing, non-negative and ends at ``num_rows``."""
    if not values_checkable(offsets):
        return
    ends = offsets.long()
    if bool((ends[0] < 0) | (ends[1:] < ends[:-1]).any()):
        raise ValueError(f"offsets must be non-negative and non-decreasing, got {offsets.tolist()}")
    if int(ends[-1]) != num_rows:
        raise ValueError(f"offsets[-1] must equal the number of rows of x ({num_rows}), got {int(ends[-1])}")
