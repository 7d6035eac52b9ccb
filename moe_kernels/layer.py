"""``MoE``: a drop-in sparse replacement for a transformer MLP: a router, the routed experts and
shared experts, DiT-MoE's layer by default."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .activations import activation_fn, parse_activation, projection_width
from .backend import BACKENDS, resolve_backend
from .dispatch import Dispatch
from .experts import run_experts
from .fp8 import FP8, check_inference, quantize_fp8
from .routers import Router, make_router, router_attributes
from .rules import NONNEGATIVE_INT, check_positive_int
from .validation import FLOAT_DTYPES, check_elements

PRECISIONS = (None, "fp8")
# The routers' options and settings: set on the layer, they would be kept and never read.
_ROUTER_ATTRIBUTES = router_attributes()
# The buffers of FP8-stored experts (``to_fp8``), which a dtype cast must not touch.
_FP8_STORED = ("w_in", "w_out", "w_in_scale", "w_out_scale")

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


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
    """Sparse mixture of experts: router -> routed experts -> shared experts.

    ``forward(x [..., dim], **route_inputs) -> y [..., dim]``; ``route_inputs`` are what the
    router reads besides the tokens (``Router.route_inputs``: ProMoE's ``unconditional``), each
    one value per token (shape ``x.shape[:-1]``). The router (``moe.router``, a ``Router``: a
    bias-free ``Linear(dim, E)`` by default and a routing rule) decides which experts compute
    which tokens; the routed experts are stored stacked, ``w_in [E, dim, 2 * hidden_dim]`` for
    ``"swiglu"`` (else ``[E, dim, hidden_dim]``) and ``w_out [E, hidden_dim, dim]``, and run on the
    router's dispatch by the experts op, whatever the routing; the shared experts are one MLP of
    hidden width ``shared_hidden_dim`` (default ``num_shared_experts * dim``, as the DiT-MoE code
    does), added unweighted.

    ``router`` is a ``Router`` or the name of one (``moe_kernels.routers.ROUTERS``):
    ``"token-choice"`` (default; ``TokenChoice``: top-k gating and DiT-MoE's balance loss, and the
    options of Mixtral, OLMoE, Qwen and DeepSeek-V3), ``"expert-choice"`` (``ExpertChoice``,
    EC-DiT), ``"diffmoe"`` (``DiffMoE``), ``"expert-race"`` (``ExpertRace``, Race-DiT) or ``"promoe"`` (``ProMoE``). A name builds the router with ``dim``, ``num_experts``,
    ``top_k`` and the remaining keyword arguments, its options (``normalize_weights``,
    ``balance_loss_alpha``, ``group_size``, ``capacity_factor``, ...; see each router).

    After a forward in training mode ``aux_loss`` holds the router's auxiliary loss (a scalar with
    grad; the balance loss for token choice); in eval mode it is ``None``. ``expert_counts`` holds
    the last forward's rows per expert (int32 ``[E]``), ``router_logits`` its ``[T, E]`` router
    logits, with their graph, for losses computed outside the layer. ``on_route``, when set, is
    called with what the router records, for routing analysis: ``(experts [T, k], weights [T, k])``
    under token choice, ``(chosen [T, E], probs [T, E])`` (which experts took each token, bool, and
    the scores) under expert choice; ``None`` by default, and then it costs nothing.
    ``expert_mesh`` is the ``DeviceMesh`` the experts are sharded over after
    ``moe_kernels.parallel.expert_parallel`` (``w_in``/``w_out`` then are DTensors), else ``None``.

    Under autocast the experts run in the autocast dtype; otherwise in the dtype of ``x``.
    ``shared_gate`` multiplies the shared expert's output by ``sigmoid(Linear(dim, 1)(x))`` (Qwen2-MoE);
    ``expert_biases`` gives every routed expert the biases of an ``nn.Linear`` pair, ``b_in [E, 2 *
    hidden_dim or hidden_dim]`` and ``b_out [E, dim]`` (DiT's and GPT-2's MLPs have them; an
    upcycled layer copies them), added inside the expert GEMMs; without them both are ``None``.
    ``precision="fp8"`` runs the routed experts' GEMMs in FP8 (see the ``precision`` property):
    for training on Hopper-class GPUs; ``to_fp8()`` stores the experts' weights in FP8 for inference.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int | None = None,
        num_shared_experts: int = 2,
        shared_hidden_dim: int | None = None,
        activation: str = "swiglu",
        *,
        router: str | Router = "token-choice",
        backend: str | None = "auto",
        expert_biases: bool = False,
        shared_gate: bool = False,
        precision: str | None = None,
        **router_options,
    ):
        super().__init__()
        dim = check_positive_int("dim", dim)
        hidden_dim = check_positive_int("hidden_dim", hidden_dim)
        num_experts = check_positive_int("num_experts", num_experts)
        num_shared_experts = NONNEGATIVE_INT.check("num_shared_experts", num_shared_experts)
        if shared_hidden_dim is not None:
            shared_hidden_dim = check_positive_int("shared_hidden_dim", shared_hidden_dim)
        parse_activation(activation)
        if shared_gate and num_shared_experts == 0:
            raise ValueError("shared_gate needs a shared expert (num_shared_experts >= 1)")
        width_in = projection_width(activation, hidden_dim)
        shared_width = shared_hidden_dim or num_shared_experts * dim
        shared_by = "shared_hidden_dim" if shared_hidden_dim else "num_shared_experts"
        check_elements("w_in", (num_experts, dim, width_in), "num_experts, dim and hidden_dim")
        check_elements("the shared expert's proj_in", (dim, 2 * shared_width), f"dim and {shared_by}")
        self.router = self._router(router, dim, num_experts, top_k, router_options)
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, num_experts
        self.activation, self.backend = activation, backend
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, width_in))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b_in = nn.Parameter(torch.empty(num_experts, width_in)) if expert_biases else None
        self.b_out = nn.Parameter(torch.empty(num_experts, dim)) if expert_biases else None
        self.shared = None
        if num_shared_experts > 0:
            self.shared = SharedExpert(dim, shared_width, activation)
        self.shared_gate = nn.Linear(dim, 1, bias=False) if shared_gate else None
        self.precision = precision
        self.router_logits: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None
        self.expert_counts: torch.Tensor | None = None
        self.on_route: Callable[[torch.Tensor, torch.Tensor], None] | None = None
        self.expert_mesh: DeviceMesh | None = None
        self.reset_parameters()

    @staticmethod
    def _router(router: str | Router, dim: int, num_experts: int, top_k: int | None, options: dict) -> Router:
        """``router`` itself (checked against the layer's sizes) or the router it names."""
        if isinstance(router, str):
            if top_k is None:
                raise TypeError("top_k is required where the router is given by name")
            return make_router(router, dim, num_experts, top_k, **options)
        if not isinstance(router, Router):
            raise TypeError(f"router must be a moe_kernels.Router or a router's name, got {type(router).__name__}")
        if options:
            raise TypeError(
                f"{', '.join(sorted(options))}: options of a router given by name; pass them to its constructor"
            )
        if (router.dim, router.num_experts) != (dim, num_experts):
            raise ValueError(
                f"the router scores {router.dim}-wide tokens against {router.num_experts} experts; "
                f"this layer has dim {dim} and {num_experts} experts"
            )
        if top_k is not None and top_k != router.top_k:
            raise ValueError(f"top_k ({top_k}) differs from the router's ({router.top_k}): leave it out")
        return router

    def __setattr__(self, name: str, value: object) -> None:
        if name in _ROUTER_ATTRIBUTES:
            raise AttributeError(f"{name} is a setting of the layer's router: set moe.router.{name}")
        super().__setattr__(name, value)

    @property
    def backend(self) -> str | None:
        """Which implementation the layer runs: ``"auto"``/``None``, ``"triton"`` or ``"torch"``;
        settable, checked when set."""
        return self._backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        if value is not None and value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {value!r}")
        self._backend = value

    @property
    def top_k(self) -> int:
        """The experts a token gets (exactly, or on average: see ``Router``)."""
        return self.router.top_k

    def reset_parameters(self) -> None:
        """Each expert matrix and bias as ``nn.Linear`` initialises them: ``U(+-1/sqrt(fan_in))``."""
        for weight, bias, fan_in in ((self.w_in, self.b_in, self.dim), (self.w_out, self.b_out, self.hidden_dim)):
            for tensor in (weight, bias):
                if tensor is not None:
                    nn.init.uniform_(tensor, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def forward(self, x: torch.Tensor, **route_inputs: torch.Tensor | None) -> torch.Tensor:
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
        routed = self.router.route(tokens, logits, backend, **self._route_inputs(x, route_inputs))
        if self.on_route is not None and routed.record is not None:
            self.on_route(*routed.record())
        y = self._experts(tokens.to(dtype), routed.dispatch, dtype, backend)
        if self.shared is not None:
            shared = self.shared(tokens)
            y = y + (shared if self.shared_gate is None else torch.sigmoid(self.shared_gate(tokens)) * shared)
        self.router_logits = logits
        self.expert_counts = routed.dispatch.counts if routed.counts is None else routed.counts
        self.aux_loss = self.router.aux_loss(routed, logits) if self.training else None
        return y.reshape(x.shape)

    def _route_inputs(self, x: torch.Tensor, inputs: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """The router's inputs (``Router.route_inputs``) given to ``forward``, each one value per
        token of ``x`` (shape ``x.shape[:-1]``), flattened; ``None`` ones left out."""
        wanted = self.router.route_inputs
        unknown = sorted(set(inputs) - set(wanted))
        if unknown:
            raise TypeError(
                f"the {type(self.router).__name__} router takes no input {', '.join(unknown)} "
                f"(its inputs: {', '.join(wanted) or 'none'})"
            )
        flat = {}
        for name, value in inputs.items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.shape != x.shape[:-1] or value.device != x.device:
                shown = (
                    f"{tuple(value.shape)} on {value.device}"
                    if isinstance(value, torch.Tensor)
                    else type(value).__name__
                )
                raise ValueError(
                    f"{name} must hold one value per token of x: shape {tuple(x.shape[:-1])} on {x.device}, got {shown}"
                )
            flat[name] = value.reshape(-1)
        return flat

    def _experts(self, tokens: torch.Tensor, dispatch: Dispatch, dtype: torch.dtype, backend: str) -> torch.Tensor:
        """The routed experts on ``dispatch``: here, sharded over ``expert_mesh``, or stored in FP8."""
        weights = self._expert_weights(dtype)
        if self.expert_mesh is not None:
            from .parallel import sharded_experts  # torch.distributed loads only for sharded layers

            return sharded_experts(
                tokens, dispatch, *weights, activation=self.activation, backend=backend, mesh=self.expert_mesh
            )
        scales = None
        if self.fp8_weights:
            check_inference(tokens, dispatch.weights, *weights[2:])
            scales = (self.w_in_scale, self.w_out_scale)
        return run_experts(
            tokens, dispatch, *weights, activation=self.activation, backend=backend,
            quantize=self.precision == "fp8" and scales is None, scales=scales,
        )  # fmt: skip

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
        if value is None and getattr(self, "fp8_weights", False):
            raise ValueError("this layer's experts are stored in FP8 (to_fp8): its precision stays 'fp8'")
        self._precision = value

    @property
    def fp8_weights(self) -> bool:
        """Whether the routed experts' weights are stored in FP8 (``to_fp8``): inference only."""
        return self.w_in.dtype == FP8

    def to_fp8(self) -> MoE:
        """Store the routed experts' weights in FP8 for inference, in place; returns the layer.

        ``w_in`` and ``w_out`` become ``float8_e4m3fn`` buffers with fp32 scales per 128x128
        block (``w_in_scale``, ``w_out_scale``; ``quantize_fp8``): half the bytes of bf16. The
        forward then runs the experts' FP8 GEMMs (activations quantized per token as they are
        loaded), whatever the router; it has no backward. A later ``.to(dtype)``, ``.float()``,
        ``.half()`` or ``.type()`` casts the biases, router and shared experts and leaves the FP8
        weights and their scales as they are; a move to another device moves them too.
        """
        if self.expert_mesh is not None:
            raise ValueError("to_fp8 quantizes whole experts: an expert-parallel layer cannot be converted")
        if self.fp8_weights:
            return self
        for name in ("w_in", "w_out"):
            weight_fp8, scale = quantize_fp8(getattr(self, name).detach())
            delattr(self, name)
            self.register_buffer(name, weight_fp8)
            self.register_buffer(f"{name}_scale", scale)
        self.precision = "fp8"
        return self

    def _apply(self, fn, recurse: bool = True) -> MoE:
        # What .to(), .float(), .half(), .type() and the like apply, recursively. FP8-stored experts
        # keep their e4m3 weights and fp32 scales through a cast (a cast would drop the scales'
        # meaning and round them): of such a call they take only the move to another device.
        if not self.fp8_weights:
            return super()._apply(fn, recurse)
        order = list(self._buffers)
        stored = {name: self._buffers.pop(name) for name in _FP8_STORED}
        try:
            super()._apply(fn, recurse)
            device = fn(torch.empty(0, device=stored["w_in"].device)).device
            stored = {name: tensor.to(device) for name, tensor in stored.items()}
        finally:
            buffers = {**self._buffers, **stored}
            self._buffers.clear()
            self._buffers.update((name, buffers[name]) for name in order)
        return self

    def __getstate__(self) -> dict:
        # aux_loss belongs to the last forward's autograd graph, which deepcopy and pickle cannot
        # copy (an EMA copy taken mid-training); a copy starts without one, as after eval.
        return {**self.__dict__, "aux_loss": None, "router_logits": None}

    def extra_repr(self) -> str:
        shared = 0 if self.shared is None else self.shared.proj_out.in_features
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
            f"shared_hidden_dim={shared}, activation={self.activation!r}, expert_biases={self.b_in is not None}, "
            f"backend={self.backend!r}" + ("" if self.precision is None else f", precision={self.precision!r}")
        )
