"""The routed experts as functions of a routing the caller made: ``moe_ffn`` (``k`` experts per
token, as from ``topk_gating``) and ``expert_choice_ffn`` (experts that chose their tokens, as
from ``expert_choice_gating``). Each checks its arguments, builds the dispatch and runs the one
experts op (``experts.py``)."""

from __future__ import annotations

import torch

from .backend import resolve_backend
from .dispatch import by_token
from .expert_choice_gating import choice_dispatch
from .experts import check_experts, run_experts
from .fp8 import BLOCK, FP8, check_finite, check_inference, check_quantized, fp8_operand
from .rules import check_k
from .validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dim,
    check_expert_ids,
    check_same_device,
    check_tensor,
    values_checkable,
)

Tensor = torch.Tensor


def moe_ffn(
    x: Tensor,
    weights: Tensor,
    experts: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    activation: str = "swiglu",
    backend: str | None = None,
    *,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
    precision: str | None = None,
    w_in_scale: Tensor | None = None,
    w_out_scale: Tensor | None = None,
) -> Tensor:
    """Routed expert MLPs with a weighted combine; no token is ever dropped.

    ``y[t] = sum_j weights[t, j] * (act(x[t] @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e])`` with
    ``e = experts[t, j]``; for ``"swiglu"``, ``act(a) = silu(a[:, :H]) * a[:, H:]`` (``"geglu"``
    and ``"geglu_tanh"`` gate with GELU and its tanh form; ``swiglu_activation(limit, alpha,
    up_offset)`` names SwiGLU with clamped inputs, GPT-OSS's); ``"relu2"`` is ``relu(a) ** 2``.

    Args:
        x: ``[T, D]`` (fp16, bf16 or fp32).
        weights: ``[T, k]`` routing weights (any float dtype).
        experts: ``[T, k]`` expert ids in ``[0, E)`` (int32 or int64).
        w_in: ``[E, D, 2H]`` for the gated ``"swiglu"``, ``"geglu"``, ``"geglu_tanh"``; ``[E, D, H]``
            for ``"gelu"``, ``"gelu_tanh"``, ``"silu"``, ``"relu"``, ``"relu2"``; dtype of ``x``.
        w_out: ``[E, H, D]``, dtype of ``x``.
        backend: ``None``/``"auto"``, ``"triton"`` or ``"torch"``.
        b_in: optional expert biases of the first projection, ``[E, 2H]`` for a gated activation
            (gate, then up) else ``[E, H]``; b_out: optional ``[E, D]``; both in the dtype of ``x``.
        precision: ``None`` (the dtype of x) or ``"fp8"``: the experts' GEMMs in FP8
            (``grouped_mm_fp8``'s recipe). ``w_in``/``w_out`` in the dtype of x are quantized on
            each call and train: the forward and input-gradient GEMMs run in FP8, the weights'
            gradients in the dtype of x from the saved inputs. ``float8_e4m3fn`` weights from
            ``quantize_fp8``, with their scales in ``w_in_scale``/``w_out_scale``, serve
            inference only.
    Returns:
        ``y [T, D]`` in ``x.dtype``, differentiable in ``x``, ``weights``, ``w_in``, ``w_out``
        and the biases (not with FP8-stored weights).
    """
    if precision not in (None, "fp8"):
        raise ValueError(f"precision must be None or 'fp8', got {precision!r}")
    stored = precision == "fp8" and isinstance(w_in, Tensor) and FP8 in (w_in.dtype, getattr(w_out, "dtype", None))
    if stored:  # pre-quantized: inference
        (w_in, w_in_scale), (w_out, w_out_scale) = (
            fp8_operand("w_in", w_in, w_in_scale),
            fp8_operand("w_out", w_out, w_out_scale),
        )
    elif w_in_scale is not None or w_out_scale is not None:
        raise ValueError("w_in_scale and w_out_scale go with precision='fp8' and FP8 w_in, w_out (quantize_fp8)")
    biases = check_experts(x, w_in, w_out, b_in, b_out, activation, FP8 if stored else None)
    check_tensor("weights", weights, 2, FLOAT_DTYPES)
    check_tensor("experts", experts, 2, INDEX_DTYPES)
    E = w_in.shape[0]
    check_dim("experts", experts, 0, x.shape[0], "T, the tokens of x")
    if weights.shape != experts.shape:
        raise ValueError(f"weights must have the shape of experts {tuple(experts.shape)}, got {tuple(weights.shape)}")
    check_k(experts.shape[1], E, name="experts.shape[1]")
    device = check_same_device(x=x, weights=weights, experts=experts, w_in=w_in, w_out=w_out, **biases)
    check_expert_ids("experts", experts, E)
    backend = resolve_backend(backend, device)
    scales = None
    if stored:
        check_quantized("w_in", w_in, w_in_scale, BLOCK)
        check_quantized("w_out", w_out, w_out_scale, BLOCK)
        check_same_device(x=x, w_in_scale=w_in_scale, w_out_scale=w_out_scale)
        check_inference(x, weights, *biases.values())
        scales = (w_in_scale, w_out_scale)
    elif precision == "fp8":
        check_finite("w_in", w_in)
        check_finite("w_out", w_out)
    return run_experts(
        x, by_token(experts, weights, E, backend), w_in, w_out, b_in, b_out, activation=activation, backend=backend,
        quantize=precision == "fp8" and not stored, scales=scales,
    )  # fmt: skip


def check_token_ids(tokens: Tensor, num_tokens: int) -> None:
    """``ValueError`` unless every expert's chosen tokens are distinct indices in ``[0, T)``
    (one host sync: for the public API only; the routers make them themselves). Skipped where
    there are no values to read (meta tensors, compiling)."""
    if tokens.numel() == 0 or not values_checkable(tokens):
        return
    low, high = tokens.min().item(), tokens.max().item()
    if low < 0 or high >= num_tokens:
        raise ValueError(f"tokens must be indices in [0, {num_tokens}), got values in [{low}, {high}]")
    per_expert = tokens.transpose(0, 1).reshape(tokens.shape[1], -1).sort(dim=1).values
    if (per_expert[:, 1:] == per_expert[:, :-1]).any():
        raise ValueError("an expert's tokens must be distinct: each (token, expert) pair is chosen at most once")


def expert_choice_ffn(
    x: Tensor,
    weights: Tensor,
    tokens: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    activation: str = "swiglu",
    backend: str | None = None,
    *,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
) -> Tensor:
    """The routed experts under expert choice, with a weighted combine.

    ``y[t] = sum over the (g, e, c) with tokens[g, e, c] = t of weights[g, e, c] * FFN_e(x[t])``:
    0 for a token no expert chose. Expert ``e``'s ``G * C`` tokens are consecutive rows of one
    grouped GEMM (its offsets follow from the shapes: no host sync, no padding), and the combine
    reads each token's 0 to ``E`` slots in expert order (deterministic, no atomics).

    Args:
        x: ``[T, D]`` (fp16, bf16 or fp32).
        weights: ``[G, E, C]`` the chosen tokens' weights (any float dtype), as from
            ``expert_choice_gating``.
        tokens: ``[G, E, C]`` int64 row indices of ``x``; one expert's tokens are distinct.
        w_in, w_out, activation, backend, b_in, b_out: as for ``moe_ffn``.
    Returns:
        ``y [T, D]`` in ``x.dtype``, differentiable in ``x``, ``weights``, the experts' weights
        and their biases.
    """
    biases = check_experts(x, w_in, w_out, b_in, b_out, activation)
    check_tensor("weights", weights, 3, FLOAT_DTYPES)
    check_tensor("tokens", tokens, 3, (torch.int64,))
    if tokens.shape != weights.shape:
        raise ValueError(f"tokens must have the shape of weights {tuple(weights.shape)}, got {tuple(tokens.shape)}")
    check_dim("tokens", tokens, 1, w_in.shape[0], "E, the experts of w_in")
    device = check_same_device(x=x, weights=weights, tokens=tokens, w_in=w_in, w_out=w_out, **biases)
    check_token_ids(tokens, x.shape[0])
    dispatch = choice_dispatch(weights, tokens, x.shape[0])
    return run_experts(
        x, dispatch, w_in, w_out, b_in, b_out, activation=activation, backend=resolve_backend(backend, device)
    )
