"""``MoE``: a drop-in sparse replacement for a transformer MLP, with shared experts and the
expert-level balance loss of DiT-MoE."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .activations import activation_fn, parse_activation, projection_width
from .backend import BACKENDS, resolve_backend
from .balance import CONVENTIONS, loss_from_stats, router_z_loss
from .capacity import CapacityPredictor
from .expert_choice import (
    check_groups,
    chosen_rows_ffn,
    expert_choice_gating_apply,
    expert_rows,
    slot_weights,
)
from .ffn import experts_forward, moe_ffn_unchecked
from .fp8 import FP8, check_inference, quantize_fp8
from .gating import check_routing_options, gating_with_stats
from .routing import chosen_routing, route
from .validation import COEFFICIENT, FLOAT_DTYPES, NONNEGATIVE_INT, SCALE, check_k, check_positive_int

ROUTINGS = ("token-choice", "expert-choice")
PRECISIONS = (None, "fp8")

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def _check_elements(tensor: str, shape: tuple[int, ...], arguments: str) -> None:
    """A clear error for weights too large for any tensor (their size in bytes must fit int64)."""
    if math.prod(shape) * torch.get_default_dtype().itemsize >= 2**63:
        raise ValueError(f"{arguments} make {tensor} of shape {shape}, more bytes than a tensor can hold (2**63)")


class SharedExpert(nn.Module):
    """A dense MLP that every token visits: ``proj_out(act(proj_in(x)))``, no biases.

    For ``"swiglu"``, ``proj_in`` maps to ``2 * hidden_dim`` features, gate half first.
    """

    def __init__(self, dim: int, hidden_dim: int, activation: str = "swiglu"):
        super().__init__()
        self.proj_in = nn.Linear(dim, projection_width(activation, hidden_dim), bias=False)
        self.proj_out = nn.Linear(hidden_dim, dim, bias=False)
        self.act = activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.act(self.proj_in(x)))


class MoE(nn.Module):
    """Sparse mixture of experts: router, top-k routed experts, shared experts, balance loss.

    ``forward(x [..., dim]) -> y [..., dim]``. The router is a bias-free ``Linear(dim, E)``;
    the routed experts are stored stacked, ``w_in [E, dim, 2 * hidden_dim]`` for ``"swiglu"``
    (else ``[E, dim, hidden_dim]``) and ``w_out [E, hidden_dim, dim]``; the shared experts are
    one MLP of hidden width ``shared_hidden_dim`` (default ``num_shared_experts * dim``, as the
    DiT-MoE code does), added unweighted. After a forward in training mode ``aux_loss`` holds
    the balance loss (a scalar with grad); in eval mode it is ``None``. ``expert_counts`` holds the
    last forward's routed-slot count per expert (int32 ``[E]``), a by-product of the gating kernel.
    ``on_route``, when set, is called after gating with ``(experts [T, k], weights [T, k])`` for
    the flattened tokens (under expert choice with ``(chosen [T, E], probs [T, E])``: which
    experts took each token, bool, and the scores), for routing analysis; it is ``None`` by
    default and then costs nothing.
    ``expert_mesh`` is the ``DeviceMesh`` the experts are sharded over after
    ``moe_kernels.parallel.expert_parallel`` (``w_in``/``w_out`` then are DTensors), else ``None``.

    Under autocast the experts run in the autocast dtype; otherwise in the dtype of ``x``.

    The defaults build DiT-MoE's layer. Other MoE families (the table in docs/kernels.md) take:
    ``score`` (``"softmax"`` or ``"sigmoid"``), ``router_bias`` (a bias in the router's Linear),
    ``selection_bias`` (a buffer ``expert_bias [E]`` that shifts selection but not the weights,
    moved by ``moe_kernels.update_selection_bias``), ``num_groups``/``topk_groups``
    (group-limited routing), ``routed_scale`` (a factor on the routed weights), ``shared_gate``
    (the shared expert's output times ``sigmoid(Linear(dim, 1)(x))``), ``z_loss_coef`` (ST-MoE's
    router z-loss, added to ``aux_loss``) and ``balance_loss_convention`` (``"dit-moe"`` or
    ``"switch"``, see ``balance_loss``). ``router_logits`` holds the last forward's ``[T, E]``
    router logits, with their graph, for losses computed outside the layer. ``expert_biases``
    gives every routed expert the biases of an ``nn.Linear`` pair, ``b_in [E, 2 * hidden_dim or
    hidden_dim]`` and ``b_out [E, dim]`` (DiT's and GPT-2's MLPs have them; an upcycled layer
    copies them), added inside the expert GEMMs; without them both are ``None``.

    ``routing="expert-choice"`` (EC-DiT) lets each expert take the ``C`` highest-scoring tokens
    of each group of ``group_size`` consecutive tokens (``None``: all the tokens of a forward),
    scores being the softmax over experts; a token gets 0 to ``E`` experts, weighted by their
    scores. ``capacity_factor`` (default ``top_k``) is the average number of experts per token:
    ``C = round(group_size * capacity_factor / num_experts)`` (halves up), so at ``top_k`` the
    FLOPs are token choice's; change it at evaluation to spend more or less compute. It needs no
    balance loss: ``aux_loss`` is zero (plus the z-loss if asked), and ``expert_counts`` is ``G *
    C`` for every expert. It takes the softmax score only (no selection bias, no groups of
    experts). Under expert parallelism its exchange sizes follow from the shapes (no host sync),
    which asks every rank to pass the same number of tokens.

    ``capacity_predictor=True`` adds DiffMoE's capacity predictor (``moe_kernels.capacity``):
    training routes by expert choice as above (DiffMoE pools the batch: ``group_size=None``) and
    trains the predictor on the selection (its loss is ``aux_loss``); in eval mode each expert
    takes the tokens whose predicted logit passes its threshold plus ``capacity_offset``
    (default 0; positive spends less compute, negative more), so every token is routed on its own
    and the compute per token varies. That mode reads its row count on the host (``nonzero``).

    ``precision="fp8"`` runs the routed experts' GEMMs in FP8 (see the ``precision`` property):
    for training on Hopper-class GPUs; ``to_fp8()`` stores them in FP8 for inference.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int,
        num_shared_experts: int = 2,
        shared_hidden_dim: int | None = None,
        activation: str = "swiglu",
        normalize_weights: bool = False,
        balance_loss_alpha: float = 0.05,
        backend: str | None = "auto",
        *,
        score: str = "softmax",
        router_bias: bool = False,
        selection_bias: bool = False,
        num_groups: int = 1,
        topk_groups: int | None = None,
        routed_scale: float = 1.0,
        shared_gate: bool = False,
        z_loss_coef: float = 0.0,
        balance_loss_convention: str = "dit-moe",
        expert_biases: bool = False,
        routing: str = "token-choice",
        group_size: int | None = None,
        capacity_factor: float | None = None,
        capacity_predictor: bool = False,
        precision: str | None = None,
    ):
        super().__init__()
        dim = check_positive_int("dim", dim)
        hidden_dim = check_positive_int("hidden_dim", hidden_dim)
        num_experts = check_positive_int("num_experts", num_experts)
        top_k = check_k(top_k, num_experts, name="top_k", experts="num_experts")
        num_shared_experts = NONNEGATIVE_INT.check("num_shared_experts", num_shared_experts)
        if shared_hidden_dim is not None:
            shared_hidden_dim = check_positive_int("shared_hidden_dim", shared_hidden_dim)
        parse_activation(activation)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        self.num_groups, self.topk_groups, self.routed_scale = check_routing_options(
            num_experts,
            top_k,
            score,
            num_groups,
            topk_groups,
            routed_scale,
            names=("num_experts", "top_k", "routed_scale"),
        )
        if balance_loss_convention not in CONVENTIONS:
            raise ValueError(f"balance_loss_convention must be one of {CONVENTIONS}, got {balance_loss_convention!r}")
        if shared_gate and num_shared_experts == 0:
            raise ValueError("shared_gate needs a shared expert (num_shared_experts >= 1)")
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        if routing == "expert-choice" and (score != "softmax" or selection_bias or num_groups > 1):
            raise ValueError("expert-choice routing takes the softmax score alone: no selection_bias, num_groups 1")
        if capacity_predictor and routing != "expert-choice":
            raise ValueError("capacity_predictor needs routing='expert-choice' (it learns an expert-choice selection)")
        self.routing = routing
        self.group_size = None if group_size is None else check_positive_int("group_size", group_size)
        self.capacity_factor = float(top_k) if capacity_factor is None else capacity_factor
        self.score, self.balance_loss_convention = score, balance_loss_convention
        self.z_loss_coef = COEFFICIENT.check("z_loss_coef", z_loss_coef)
        self.dim, self.hidden_dim, self.num_experts, self.top_k = dim, hidden_dim, num_experts, top_k
        self.activation = activation
        self.normalize_weights = bool(normalize_weights)
        self.balance_loss_alpha = COEFFICIENT.check("balance_loss_alpha", balance_loss_alpha)
        self.backend = backend
        width_in = projection_width(activation, hidden_dim)
        shared_width = shared_hidden_dim or num_shared_experts * dim
        shared_by = "shared_hidden_dim" if shared_hidden_dim else "num_shared_experts"
        _check_elements("w_in", (num_experts, dim, width_in), "num_experts, dim and hidden_dim")
        _check_elements("the shared expert's proj_in", (dim, 2 * shared_width), f"dim and {shared_by}")
        self.router = nn.Linear(dim, num_experts, bias=router_bias)
        if selection_bias:
            # Not a parameter: update_selection_bias moves it between steps (DeepSeek-V3).
            self.register_buffer("expert_bias", torch.zeros(num_experts))
        else:
            self.expert_bias = None
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, width_in))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b_in = nn.Parameter(torch.empty(num_experts, width_in)) if expert_biases else None
        self.b_out = nn.Parameter(torch.empty(num_experts, dim)) if expert_biases else None
        self.shared = None
        if num_shared_experts > 0:
            self.shared = SharedExpert(dim, shared_width, activation)
        self.shared_gate = nn.Linear(dim, 1, bias=False) if shared_gate else None
        self.capacity_predictor = CapacityPredictor(dim, num_experts) if capacity_predictor else None
        self.capacity_offset = 0.0
        self.precision = precision
        self.router_logits: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None
        self.expert_counts: torch.Tensor | None = None
        self.on_route: Callable[[torch.Tensor, torch.Tensor], None] | None = None
        self.expert_mesh: DeviceMesh | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert matrix and bias as ``nn.Linear`` initialises them: ``U(+-1/sqrt(fan_in))``."""
        for weight, bias, fan_in in ((self.w_in, self.b_in, self.dim), (self.w_out, self.b_out, self.hidden_dim)):
            for tensor in (weight, bias):
                if tensor is not None:
                    nn.init.uniform_(tensor, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def capacity(self, group_size: int, capacity_factor: float | None = None) -> int:
        """``C``, the tokens each expert takes from a group of ``group_size`` under expert choice,
        at ``capacity_factor`` (default: the layer's); ``ValueError`` where none can work."""
        factor = SCALE.check("capacity_factor", self.capacity_factor if capacity_factor is None else capacity_factor)
        if factor > self.num_experts:
            raise ValueError(f"capacity_factor ({factor}) cannot exceed num_experts ({self.num_experts})")
        capacity = math.floor(group_size * factor / self.num_experts + 0.5)
        if capacity < 1:
            raise ValueError(
                f"group_size ({group_size}) x capacity_factor ({factor}) / num_experts ({self.num_experts}) rounds "
                "to 0 tokens per expert: use larger groups or a larger capacity_factor"
            )
        return capacity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [..., {self.dim}], got {tuple(x.shape)}")
        if x.device != self.w_in.device:
            raise ValueError(f"x is on {x.device} but the MoE's parameters are on {self.w_in.device}")
        if self.precision == "fp8" and self.expert_mesh is not None:
            raise ValueError("FP8 experts do not run under expert parallelism yet: set precision=None")
        backend = resolve_backend(self.backend, x.device)
        autocast = torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        tokens = x.reshape(-1, self.dim)
        logits = self.router(tokens)
        route = self._expert_choice if self.routing == "expert-choice" else self._token_choice
        y, counts, routing_loss = route(tokens.to(dtype), logits, self._expert_weights(dtype), backend)
        if self.shared is not None:
            shared = self.shared(tokens)
            y = y + (shared if self.shared_gate is None else torch.sigmoid(self.shared_gate(tokens)) * shared)
        self.expert_counts, self.router_logits = counts, logits
        self.aux_loss = None
        if self.training:
            self.aux_loss = routing_loss()
            if self.z_loss_coef:
                self.aux_loss = self.aux_loss + self.z_loss_coef * router_z_loss(logits)
        return y.reshape(x.shape)

    def _expert_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor | None, ...]:
        """``w_in, w_out, b_in, b_out`` in ``dtype`` (this rank's shards when expert-parallel);
        FP8 matrices as they are stored."""
        local = self.expert_mesh is not None
        tensors = (self.w_in, self.w_out, self.b_in, self.b_out)
        return tuple(
            None if w is None else w if w.dtype == FP8 else (w.to_local() if local else w).to(dtype) for w in tensors
        )

    @property
    def precision(self) -> str | None:
        """``None``: the routed experts' GEMMs in the compute dtype; ``"fp8"``: in FP8 (e4m3,
        DeepSeek-V3's fine-grained scales), their weights kept in high precision and quantized on
        each forward, so the layer trains (the input gradients in FP8 too, the weights' gradients
        in the compute dtype). Settable; ``to_fp8`` sets it."""
        return self._precision

    @precision.setter
    def precision(self, value: str | None) -> None:
        if value not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {value!r}")
        if value is None and getattr(self, "fp8", False):
            raise ValueError("this layer's experts are stored in FP8 (to_fp8): its precision stays 'fp8'")
        self._precision = value

    @property
    def fp8(self) -> bool:
        """Whether the routed experts' matrices are stored in FP8 (``to_fp8``)."""
        return self.w_in.dtype == FP8

    def to_fp8(self) -> MoE:
        """Store the routed experts' matrices in FP8 for inference, in place; returns the layer.

        ``w_in`` and ``w_out`` become ``float8_e4m3fn`` buffers with fp32 scales per 128x128
        block (``w_in_scale``, ``w_out_scale``; ``quantize_fp8``): half the bytes of bf16. The
        forward then runs ``grouped_mm_fp8`` (activations quantized per token as they are loaded)
        for both routings; it has no backward. Call it last, after the layer's ``.to(device,
        dtype)``: a later ``.to(dtype)`` would round the scales. The biases, router and shared
        experts keep their dtype.
        """
        if self.expert_mesh is not None:
            raise ValueError("to_fp8 quantizes whole experts: an expert-parallel layer cannot be converted")
        if self.fp8:
            return self
        for name in ("w_in", "w_out"):
            weight_fp8, scale = quantize_fp8(getattr(self, name).detach())
            delattr(self, name)
            self.register_buffer(name, weight_fp8)
            self.register_buffer(f"{name}_scale", scale)
        self.precision = "fp8"
        return self

    def _fp8_experts(self, tokens, slot_weights, routing, slots, expert_weights, backend):
        """The FP8-stored experts (``to_fp8``): inference only."""
        check_inference(tokens, slot_weights, *expert_weights[2:])
        scales = (self.w_in_scale, self.w_out_scale)
        return experts_forward(
            tokens, slot_weights, routing, slots, *expert_weights, self.activation, backend, False, scales
        )[0]

    def _chosen_rows(self, tokens, row_weights, row_tokens, offsets, expert_weights, backend):
        """The experts on the tokens they chose (expert-major rows), FP8 or not."""
        if not self.fp8:
            return chosen_rows_ffn(
                tokens, row_weights, row_tokens, offsets, *expert_weights,
                activation=self.activation, backend=backend, fp8=self.precision == "fp8",
            )  # fmt: skip
        routing, starts = chosen_routing(row_tokens, offsets, tokens.shape[0])
        weights = slot_weights(row_weights, routing.slot_of_row)
        return self._fp8_experts(tokens, weights, routing, starts, expert_weights, backend)

    def _token_choice(self, tokens, logits, expert_weights, backend):
        """Top-k gating and the routed experts: ``(y, expert counts, balance loss thunk)``."""
        gating = gating_with_stats(
            logits,
            k=self.top_k,
            normalize=self.normalize_weights,
            backend=backend,
            score=self.score,
            bias=self.expert_bias,
            num_groups=self.num_groups,
            topk_groups=self.topk_groups,
            scale=self.routed_scale,
        )
        if self.on_route is not None:
            self.on_route(gating.experts, gating.weights)
        if self.fp8:
            routing = route(gating.experts, self.num_experts, backend)
            y = self._fp8_experts(tokens, gating.weights, routing, self.top_k, expert_weights, backend)
        elif self.expert_mesh is None:
            y = moe_ffn_unchecked(
                tokens, gating.weights, gating.experts, *expert_weights,
                activation=self.activation, backend=backend, fp8=self.precision == "fp8",
            )  # fmt: skip
        else:
            from .parallel import expert_parallel_ffn  # torch.distributed loads only for sharded layers

            y = expert_parallel_ffn(
                tokens, gating.weights, gating.experts, *expert_weights,
                activation=self.activation, backend=backend, mesh=self.expert_mesh,
            )  # fmt: skip

        def balance_loss() -> torch.Tensor:
            return loss_from_stats(
                gating.counts,
                gating.prob_sums,
                tokens.shape[0],
                self.top_k,
                self.balance_loss_alpha,
                self.balance_loss_convention,
            )

        return y, gating.counts, balance_loss

    def _expert_choice(self, tokens, logits, expert_weights, backend):
        """Expert choice and the routed experts: ``(y, expert counts, aux loss thunk)``; balanced
        by construction, it has no balance loss (the capacity predictor's loss, if it has one)."""
        if self.capacity_predictor is not None and not self.training:
            return self._predicted_choice(tokens, logits, expert_weights, backend)
        capacity = self.capacity(self.group_size or max(tokens.shape[0], 1))
        size = check_groups(tokens.shape[0], capacity, self.group_size, backend)
        weights, chosen, probs = expert_choice_gating_apply(logits, capacity, size, backend)
        mask = None
        if self.on_route is not None or self.capacity_predictor is not None:
            mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(
                0, chosen.transpose(1, 2).reshape(-1, self.num_experts), True
            )
        if self.on_route is not None:
            self.on_route(mask, probs)
        if self.expert_mesh is None:
            y = self._chosen_rows(tokens, *expert_rows(weights, chosen), expert_weights, backend)
        else:
            from .parallel import expert_choice_parallel_ffn

            y = expert_choice_parallel_ffn(
                tokens, weights, chosen, *expert_weights,
                activation=self.activation, backend=backend, mesh=self.expert_mesh,
            )  # fmt: skip
        per_expert = chosen.shape[0] * capacity
        counts = torch.full((self.num_experts,), per_expert, dtype=torch.int32, device=tokens.device)
        if self.capacity_predictor is None:
            return y, counts, lambda: logits.new_zeros((), dtype=torch.float32)
        return y, counts, lambda: self.capacity_predictor.train_step(tokens, mask, per_expert)

    def _predicted_choice(self, tokens, logits, expert_weights, backend):
        """DiffMoE's inference: each expert takes the tokens whose predicted logit passes its
        threshold (plus ``capacity_offset``), weighted by their scores; no groups, so each token
        is routed on its own. The number of rows is data: one host read (``nonzero``)."""
        if self.expert_mesh is not None:
            raise ValueError("the capacity predictor's inference routing does not run under expert parallelism")
        mask = self.capacity_predictor.select(tokens, self.capacity_offset)  # [T, E]
        probs = torch.softmax(logits.float(), dim=-1)
        if self.on_route is not None:
            self.on_route(mask, probs)
        experts, rows = mask.t().nonzero().unbind(1)  # expert-major, tokens in order within an expert
        counts = mask.sum(0, dtype=torch.int32)
        offsets = counts.cumsum(0, dtype=torch.int32)
        y = self._chosen_rows(tokens, probs[rows, experts], rows, offsets, expert_weights, backend)
        return y, counts, lambda: logits.new_zeros((), dtype=torch.float32)

    def __getstate__(self) -> dict:
        # aux_loss belongs to the last forward's autograd graph, which deepcopy and pickle cannot
        # copy (an EMA copy taken mid-training); a copy starts without one, as after eval.
        return {**self.__dict__, "aux_loss": None, "router_logits": None}

    def extra_repr(self) -> str:
        shared = 0 if self.shared is None else self.shared.proj_out.in_features
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"shared_hidden_dim={shared}, activation={self.activation!r}, expert_biases={self.b_in is not None}, "
            f"routing={self.routing!r}, backend={self.backend!r}"
            + ("" if self.precision is None else f", precision={self.precision!r}")
        )
