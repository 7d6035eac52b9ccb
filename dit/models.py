"""DiT and DiT-MoE.

DiT-MoE is DiT with every block's MLP replaced by a sparse MoE (``moe_kernels.MoE``): SwiGLU
experts of width 4D, top-k of a softmax router without renormalisation, one shared SwiGLU
expert of width 2D, and the expert-level balance loss. Sections: embedders, blocks, the model,
configs (Table 1 names such as ``DiT-XL/2`` and ``DiT-MoE-S/2-8E2A``).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import get_type_hints

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe_kernels import ACTIVATIONS, ROUTERS, MoE
from moe_kernels.rules import COEFFICIENT, NONNEGATIVE_INT, POSITIVE, POSITIVE_INT, Rule, check_k


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                       Embedders for patches, timesteps, labels                #
#################################################################################


class PatchEmbed(nn.Module):
    """``[N, C, H, W] -> [N, (H/p)*(W/p), D]``: non-overlapping p x p patches, linearly embedded."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> ``[N, D]``: sinusoidal features (cos, then sin) through a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]
        embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        return F.pad(embedding, (0, dim % 2))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoidal(t, self.frequency_size))


class LabelEmbedder(nn.Module):
    """Class labels -> ``[N, D]``. With dropout, label ``num_classes`` is the null class that
    classifier-free guidance conditions on, and training replaces labels by it at random."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def dropped(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """The labels with, in training, the ``drop`` ones (bool ``[N]``; by default each with
        probability ``dropout_prob``) made the null class (``num_classes``)."""
        if self.training and self.dropout_prob > 0:
            if drop is None:
                drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return labels

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """The embeddings of ``labels`` as they are (``dropped`` first to drop some)."""
        return self.embedding_table(labels)


def sincos_pos_embed(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding ``[grid_size**2, dim]``: half the channels encode
    the row, half the column (each half: sin, then cos)."""

    def one_axis(positions: np.ndarray, width: int) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2))
        angles = np.outer(positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    table = np.concatenate([one_axis(cols, dim // 2), one_axis(rows, dim // 2)], axis=1)
    return torch.from_numpy(table).float()


#################################################################################
#                                   Blocks                                      #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``; optional q/k
    LayerNorm over each head (as in the flash-attention variant of DiT-MoE)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """The dense DiT MLP: ``fc2(gelu_tanh(fc1(x)))``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block; its feed-forward is a dense MLP or a sparse MoE."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, ffn: nn.Module, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.ffn = ffn
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, route_inputs: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``route_inputs``: what the MoE's router reads besides the tokens (``Router.route_inputs``)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.ffn(
            modulate(self.norm2(x), shift_mlp, scale_mlp), **(route_inputs or {})
        )


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


#################################################################################
#                                   The model                                   #
#################################################################################


OBJECTIVES = ("diffusion", "rectified-flow")
# A label dropout of 1 would leave no conditional training at all.
DROPOUT = Rule(integer=False, low=0, high=1, open_high=True)


@dataclass
class DiTConfig:
    """Everything that shapes a DiT; ``num_experts = 0`` means the dense DiT."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    num_experts: int = 0
    top_k: int = 2
    num_shared_experts: int = 2
    balance_loss_alpha: float = 0.05
    # The routed (and shared) experts' MLP: SwiGLU without biases as DiT-MoE's, or DiT's own
    # MLP ("gelu_tanh" with biases), which an upcycled model keeps; and whether the top-k
    # weights are renormalised to sum to 1 (DiT-MoE does not; upcycling does, see dit.upcycle).
    expert_activation: str = "swiglu"
    expert_biases: bool = False
    normalize_weights: bool = False
    # The MoE layers' router, by the layer's names (moe_kernels.ROUTERS): "token-choice"
    # (DiT-MoE's top-k), "expert-choice" (EC-DiT: each expert takes the best top_k * tokens /
    # num_experts tokens of each image, so no image depends on its batch), "diffmoe" (DiffMoE:
    # expert choice over the whole batch in training, and a capacity predictor that routes each
    # token on its own at inference; experimental) or "expert-race" (Race-DiT: the best
    # tokens x top_k (token, expert) pairs of the batch win in training, a learned threshold
    # on the router logit routes each token on its own at inference; experimental).
    router: str = "token-choice"
    # expert-race: the weight of its router similarity loss (moe_kernels.ExpertRace). promoe
    # (ProMoE: the null-label tokens to their own unconditional_experts, the others to the rest,
    # each by cosine similarity to learnable prototypes; experimental): the weight of its routing
    # contrastive loss (its balance loss is balance_loss_alpha).
    similarity_coef: float = 0.01
    unconditional_experts: int = 0  # 0: top_k, the fewest that give those tokens top_k experts
    contrastive_coef: float = 0.01
    # Race-DiT's per-layer regularization, for any model (0: off): in training, every block but
    # the last predicts the objective's target through a head of its own (the final layer's
    # shape) and this weight times the mean of their squared errors joins the loss; it gives the
    # shallow blocks, whose adaLN-gated outputs the residual stream drowns, a direct signal. The
    # heads never run at inference.
    layer_regularization_coef: float = 0.0
    qk_norm: bool = False
    name: str = ""
    # How the model's inputs and outputs are read: the training objective ("diffusion" or
    # "rectified-flow") and whether it works on VAE latents rather than pixels.
    objective: str = "diffusion"
    latent: bool = False

    def check(self) -> None:
        """Raise ``ValueError`` (``TypeError`` for a value of the wrong kind) naming the first
        setting that cannot build a model; the numbers the MoE layer also takes follow its rules."""
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            POSITIVE_INT.check(name, getattr(self, name))
        for name in ("num_experts", "num_shared_experts"):
            NONNEGATIVE_INT.check(name, getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size ({self.input_size}) must be a multiple of patch_size ({self.patch_size})")
        if int(self.hidden_size * POSITIVE.check("mlp_ratio", self.mlp_ratio)) < 1:
            raise ValueError(f"mlp_ratio must make a hidden width >= 1, got {self.mlp_ratio}")
        if self.num_experts:
            check_k(self.top_k, self.num_experts, "top_k", "num_experts")
        DROPOUT.check("class_dropout_prob", self.class_dropout_prob)
        COEFFICIENT.check("balance_loss_alpha", self.balance_loss_alpha)
        COEFFICIENT.check("similarity_coef", self.similarity_coef)
        COEFFICIENT.check("contrastive_coef", self.contrastive_coef)
        COEFFICIENT.check("layer_regularization_coef", self.layer_regularization_coef)
        NONNEGATIVE_INT.check("unconditional_experts", self.unconditional_experts)
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {tuple(ROUTERS)}, got {self.router!r}")
        if self.router == "promoe" and self.num_experts:
            unconditional = self.unconditional_experts or self.top_k
            if not self.top_k <= unconditional <= self.num_experts - self.top_k:
                raise ValueError(
                    f"unconditional_experts must leave top_k ({self.top_k}) experts on each side of promoe's "
                    f"guidance split: from {self.top_k} to {self.num_experts - self.top_k}, got {unconditional}"
                )
            if not self.class_dropout_prob:
                raise ValueError(
                    "promoe trains its unconditional experts on the dropped labels' tokens: class_dropout_prob "
                    "must be > 0"
                )
        if self.expert_activation not in ACTIVATIONS:
            raise ValueError(f"expert_activation must be one of {ACTIVATIONS}, got {self.expert_activation!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")


def router_options(config: DiTConfig) -> dict:
    """The options of ``config.router`` that the config sets: token choice's balance loss and
    weights; expert choice's groups, one image each (so no image depends on its batch); expert
    race's similarity loss; ProMoE's split and losses. Any other router of ``moe_kernels.ROUTERS``
    takes its defaults."""
    if config.router == "token-choice":
        return dict(normalize_weights=config.normalize_weights, balance_loss_alpha=config.balance_loss_alpha)
    if config.router == "expert-choice":
        return dict(group_size=(config.input_size // config.patch_size) ** 2)
    if config.router == "expert-race":
        return dict(similarity_coef=config.similarity_coef)
    if config.router == "promoe":
        return dict(
            unconditional_experts=config.unconditional_experts or config.top_k,
            contrastive_coef=config.contrastive_coef,
            balance_loss_alpha=config.balance_loss_alpha,
        )
    return {}


class DiT(nn.Module):
    """Diffusion transformer: ``forward(x [N, C, H, W], t [N], y [N]) -> [N, C or 2C, H, W]``.

    After a training-mode forward of DiT-MoE, ``aux_loss`` holds the sum over MoE layers of the
    balance loss, and ``moe_layers()`` yields the layers (each with its own ``aux_loss`` and
    ``expert_counts``); with ``layer_regularization_coef``, ``layer_regularization(target)`` is
    that forward's per-layer loss.
    """

    def __init__(self, config: DiTConfig, moe_backend: str | None = "auto"):
        super().__init__()
        self.config = config
        D = config.hidden_size
        config.check()
        self.in_channels = config.in_channels
        self.out_channels = 2 * config.in_channels if config.learn_sigma else config.in_channels
        self.patch_size = config.patch_size
        self.grid_size = config.input_size // config.patch_size
        self.grad_checkpointing = False

        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        self.register_buffer("pos_embed", sincos_pos_embed(D, self.grid_size)[None], persistent=False)
        self.blocks = nn.ModuleList(
            DiTBlock(D, config.num_heads, config.mlp_ratio, self._ffn(config, moe_backend), config.qk_norm)
            for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(D, config.patch_size, self.out_channels)
        self.layer_heads = (
            nn.ModuleList(FinalLayer(D, config.patch_size, config.in_channels) for _ in range(config.depth - 1))
            if config.layer_regularization_coef
            else None
        )
        self.layer_predictions: list[torch.Tensor] = []
        self.initialize_weights()

    @staticmethod
    def _ffn(config: DiTConfig, moe_backend: str | None) -> nn.Module:
        D = config.hidden_size
        hidden = int(D * config.mlp_ratio)
        if config.num_experts == 0:
            return Mlp(D, hidden)
        return MoE(
            D, hidden, config.num_experts, config.top_k, num_shared_experts=config.num_shared_experts,
            activation=config.expert_activation, router=config.router, backend=moe_backend,
            expert_biases=config.expert_biases, **router_options(config),
        )  # fmt: skip

    def initialize_weights(self) -> None:
        """DiT's scheme: Xavier-uniform linear layers (each expert matrix as its own linear
        layer), zeroed adaLN and output layers; the router as ``nn.Linear`` by default."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for moe in self.moe_layers():
            moe.router.reset_parameters()
            _xavier_by_blocks(moe.w_in, moe.hidden_dim)
            _xavier_by_blocks(moe.w_out, moe.dim)
            for bias in (moe.b_in, moe.b_out):
                if bias is not None:
                    nn.init.zeros_(bias)
            if moe.shared is not None:
                _xavier_by_blocks(moe.shared.proj_in.weight.T, moe.shared.proj_out.in_features)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [
            *(block.adaLN_modulation[-1] for block in self.blocks),
            *(
                head
                for final in [self.final_layer, *(self.layer_heads or [])]
                for head in (final.adaLN_modulation[-1], final.linear)
            ),
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def moe_layers(self) -> list[MoE]:
        return [block.ffn for block in self.blocks if isinstance(block.ffn, MoE)]

    def set_expert_compute(self, capacity_factor: float | None = None, capacity_offset: float | None = None) -> None:
        """The compute dial at inference, without retraining: an expert-choice model's
        ``capacity_factor`` (average experts per token; training's is ``top_k``), a diffmoe or
        expert-race model's ``capacity_offset`` (added to every threshold: positive spends less
        compute, negative more). ``ValueError`` for a dial the model's router does not use (a
        diffmoe router holds a ``capacity_factor`` for its training, which sampling ignores), or
        a value the dial's rule refuses."""
        router = self.config.router
        for name, value, owners in (
            ("capacity_factor", capacity_factor, ("expert-choice",)),
            ("capacity_offset", capacity_offset, ("diffmoe", "expert-race")),
        ):
            if value is None:
                continue
            if router not in owners:
                raise ValueError(
                    f"{name} sets the compute of {' and '.join(owners)} models; this one routes by {router}"
                )
            for moe in self.moe_layers():  # the router's setting checks the value (the same for every layer)
                setattr(moe.router, name, value)

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """The sum over MoE layers of the last training-mode forward's balance loss, or ``None``."""
        losses = [moe.aux_loss for moe in self.moe_layers() if moe.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def layer_regularization(self, target: torch.Tensor) -> torch.Tensor | None:
        """The last training-mode forward's per-layer regularization against ``target`` ``[N, C, H, W]``
        (what the model's first ``C`` output channels regress): ``layer_regularization_coef`` times
        the mean over the heads of their mean squared error; ``None`` when the model has no heads."""
        if not self.layer_predictions:
            return None
        errors = torch.stack([((p.float() - target) ** 2).mean() for p in self.layer_predictions])
        return self.config.layer_regularization_coef * errors.mean()

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, T, p*p*C] -> [N, C, H, W]``."""
        p, g = self.patch_size, self.grid_size
        c = x.shape[-1] // (p * p)
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed
        labels = self.y_embedder.dropped(y, drop_labels)
        c = self.t_embedder(t) + self.y_embedder(labels)
        route_inputs = self.route_inputs(labels, x.shape[1])
        heads = self.layer_heads if self.training and self.layer_heads is not None else []
        predictions = []
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, c, route_inputs, use_reentrant=False)
            else:
                x = block(x, c, route_inputs)
            if i < len(heads):
                predictions.append(self.unpatchify(heads[i](x, c)))
        self.layer_predictions = predictions
        return self.unpatchify(self.final_layer(x, c))

    def route_inputs(self, labels: torch.Tensor, tokens: int) -> dict[str, torch.Tensor]:
        """What the MoE layers' router reads besides the tokens, per token of the ``[N, tokens]``
        batch: ``unconditional``, the tokens of null-label images (the unguided pass of
        classifier-free guidance, and the dropped labels in training), for ProMoE."""
        if self.config.num_experts == 0 or "unconditional" not in ROUTERS[self.config.router].route_inputs:
            return {}
        return {"unconditional": (labels == self.config.num_classes)[:, None].expand(-1, tokens)}


def _xavier_by_blocks(weight: torch.Tensor, block_width: int) -> None:
    """Xavier-uniform init of ``weight [..., fan_in, width]`` seen as ``width / block_width``
    separate linear layers of ``block_width`` outputs each."""
    bound = math.sqrt(6.0 / (weight.shape[-2] + block_width))
    with torch.no_grad():
        weight.uniform_(-bound, bound)


#################################################################################
#                                   Configs                                     #
#################################################################################

# depth, hidden size, heads; Ti is a small size of our own, for CPU runs.
SIZES = {
    "Ti": (4, 96, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "G": (40, 1408, 16),
}
_NAME = re.compile(
    r"^DiT-(?:(?P<moe>MoE)-)?(?P<size>Ti|S|B|L|XL|G)/(?P<patch>2|4|8)(?:-(?P<experts>\d+)E(?P<k>\d+)A)?$"
)
# The settings create_model may override: every field of DiTConfig but those its name fixes.
OVERRIDES = tuple(f.name for f in fields(DiTConfig) if f.name not in ("name", "patch_size"))


def coerce_override(key: str, value: object) -> object:
    """``value`` as the type of the config field ``key``; a string (from ``--set key=value``) is
    parsed. Raises ``TypeError`` for an unknown key or a value of the wrong type."""
    if key not in OVERRIDES:
        raise TypeError(f"unknown model setting {key!r}; settings: {', '.join(OVERRIDES)}")
    kind = get_type_hints(DiTConfig)[key]
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        try:
            if kind is bool:
                value = {"true": True, "1": True, "false": False, "0": False}[text]
            else:
                value = kind(text)
        except (KeyError, ValueError):
            raise TypeError(
                f"{key} takes {'true or false' if kind is bool else 'a number' if kind is float else 'an integer'}, got {value!r}"
            ) from None
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{key} takes a {kind.__name__}, got {value!r}")
    return value


def model_names() -> list[str]:
    """The names of the paper's configs (any ``DiT-MoE-{size}/{patch}-{E}E{k}A`` also works)."""
    dense = [f"DiT-{s}/{p}" for s in SIZES for p in (2, 4, 8)]
    moe = [f"DiT-MoE-{s}/2-{e}E2A" for s in SIZES for e in (8, 16)]
    return dense + moe


def parse_model_name(name: str) -> DiTConfig:
    """``DiT-{Ti,S,B,L,XL,G}/{2,4,8}`` or ``DiT-MoE-{size}/{patch}-{E}E{k}A`` -> its config."""
    match = _NAME.match(name)
    if match is None or bool(match["moe"]) != bool(match["experts"]):
        raise ValueError(
            f"unknown model {name!r}: expected DiT-{{Ti,S,B,L,XL,G}}/{{2,4,8}} or DiT-MoE-{{size}}/{{patch}}-{{E}}E{{k}}A, "
            "e.g. DiT-XL/2 or DiT-MoE-S/2-8E2A"
        )
    depth, hidden, heads = SIZES[match["size"]]
    experts = int(match["experts"] or 0)
    top_k = int(match["k"] or 2)
    if experts and not 1 <= top_k <= experts:
        raise ValueError(f"model {name!r}: top-k ({top_k}) must be between 1 and the number of experts ({experts})")
    return DiTConfig(
        patch_size=int(match["patch"]),
        depth=depth,
        hidden_size=hidden,
        num_heads=heads,
        num_experts=experts,
        top_k=top_k,
        name=name,
    )


def create_model(name: str, moe_backend: str | None = "auto", **overrides) -> DiT:
    """Build a named DiT / DiT-MoE, e.g. ``create_model("DiT-MoE-S/2-8E2A", input_size=32)``.

    ``overrides`` may set any of ``OVERRIDES`` (every ``DiTConfig`` field but ``name`` and
    ``patch_size``). An unknown setting or a value of the wrong type raises ``TypeError``, a
    value out of range ``ValueError``, each naming the setting.
    """
    return DiT(model_config(name, **overrides), moe_backend=moe_backend)


def model_config(name: str, **overrides) -> DiTConfig:
    """The config ``create_model`` builds, checked, without building it."""
    config = parse_model_name(name)
    for key, value in overrides.items():
        setattr(config, key, coerce_override(key, value))
    config.check()
    return config


def config_to_dict(config: DiTConfig) -> dict:
    return asdict(config)


def config_from_dict(values: dict) -> DiTConfig:
    """The config ``values`` (as ``config_to_dict`` wrote it) describe, each value checked for
    its field's type (``TypeError`` naming the field) and the whole as ``DiTConfig.check`` does;
    keys of no field are ignored."""
    if not isinstance(values, dict):
        raise TypeError(f"a model config is a mapping of settings, got {type(values).__name__}")
    if "routing" in values and "router" not in values:  # the field's name before routers were objects
        values = {**values, "router": values["routing"]}
    known = {key: value for key, value in values.items() if key in DiTConfig.__dataclass_fields__}
    for key, kind in get_type_hints(DiTConfig).items():
        value = known.get(key)
        if kind is float and type(value) is int:  # JSON writes 4.0 back as 4.0, but a hand-made 4 means it
            known[key] = value = float(value)
        if key in known and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            wanted = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]
            raise TypeError(f"{key} must be {wanted}, got {value!r}")
    config = DiTConfig(**known)
    config.check()
    return config
