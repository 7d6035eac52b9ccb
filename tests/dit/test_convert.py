"""The converter against a stand-in for the official DiT-MoE model, written here from its
published key names, shapes and the paper's equations (not from its code)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dit.checkpoint import build_from_checkpoint, load_into
from dit.convert import convert_official, infer_config, main
from dit.models import DiT

D, DEPTH, HEADS, E, PATCH, C, SIZE, CLASSES = 32, 2, 2, 4, 2, 1, 8, 10


def sincos_2d(dim, grid):
    """MAE's fixed embedding: first half encodes the column (w) coordinate, second the row; sin then cos."""

    def axis(pos, width):
        omega = 1.0 / 10000 ** (np.arange(width // 2) / (width / 2))
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(grid), np.arange(grid))
    return torch.tensor(np.concatenate([axis(w.reshape(-1), dim // 2), axis(h.reshape(-1), dim // 2)], axis=1)).float()


def linear(i, o, bias=True):
    layer = nn.Linear(i, o, bias=bias)
    nn.init.normal_(layer.weight, std=0.3)
    if bias:
        nn.init.normal_(layer.bias, std=0.1)
    return layer


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (
            linear(dim, hidden, False),
            linear(dim, hidden, False),
            linear(hidden, dim, False),
        )

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class OfficialBlock(nn.Module):
    """A DiT-MoE block, or with ``dense`` the original DiT release's (timm's ``mlp.fc1/fc2``)."""

    def __init__(self, flash, dense=False):
        super().__init__()
        self.flash, self.dense = flash, dense
        self.attn = nn.Module()
        if flash:
            self.attn.Wqkv, self.attn.out_proj = linear(D, 3 * D), linear(D, D)
            self.attn.q_norm, self.attn.k_norm = nn.LayerNorm(D // HEADS, eps=1e-6), nn.LayerNorm(D // HEADS, eps=1e-6)
            for norm in (self.attn.q_norm, self.attn.k_norm):
                nn.init.normal_(norm.weight, 1.0, 0.2)
                nn.init.normal_(norm.bias, 0.0, 0.2)
        else:
            self.attn.qkv, self.attn.proj = linear(D, 3 * D), linear(D, D)
        if dense:
            self.mlp = nn.Module()
            self.mlp.fc1, self.mlp.fc2 = linear(D, 4 * D), linear(4 * D, D)
        else:
            self.moe = nn.Module()
            self.moe.gate = nn.Module()
            self.moe.gate.weight = nn.Parameter(torch.randn(E, D))
            self.moe.experts = nn.ModuleList(SwiGLU(D, 4 * D) for _ in range(E))
            self.moe.shared_experts = SwiGLU(D, 2 * D)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), linear(D, 6 * D))

    def attention(self, x):
        B, N, _ = x.shape
        qkv = (self.attn.Wqkv if self.flash else self.attn.qkv)(x).reshape(B, N, 3, HEADS, D // HEADS)
        q, k, v = qkv.unbind(2)
        if self.flash:
            q, k = self.attn.q_norm(q), self.attn.k_norm(k)
        weights = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(D // HEADS), dim=-1)
        out = torch.einsum("bhnm,bmhd->bnhd", weights, v).reshape(B, N, D)
        return (self.attn.out_proj if self.flash else self.attn.proj)(out)

    def moe_forward(self, x):
        if self.dense:
            return self.mlp.fc2(F.gelu(self.mlp.fc1(x), approximate="tanh"))
        flat = x.reshape(-1, D)
        probs = torch.softmax(flat @ self.moe.gate.weight.T, dim=-1)
        top_w, top_i = probs.topk(2, dim=-1)
        out = torch.zeros_like(flat)
        for t in range(flat.shape[0]):
            for j in range(2):
                out[t] += top_w[t, j] * self.moe.experts[int(top_i[t, j])](flat[t])
        return (out + self.moe.shared_experts(flat)).reshape(x.shape)

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        norm = lambda h: F.layer_norm(h, (D,), eps=1e-6)  # noqa: E731
        x = x + g1[:, None] * self.attention(norm(x) * (1 + sc1[:, None]) + s1[:, None])
        return x + g2[:, None] * self.moe_forward(norm(x) * (1 + sc2[:, None]) + s2[:, None])


class OfficialDiTMoE(nn.Module):
    def __init__(self, flash=False, dense=False):
        super().__init__()
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(C, D, PATCH, PATCH)
        self.pos_embed = nn.Parameter(sincos_2d(D, SIZE // PATCH)[None], requires_grad=False)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(linear(256, D), nn.SiLU(), linear(D, D))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(CLASSES + 1, D)
        self.blocks = nn.ModuleList(OfficialBlock(flash, dense) for _ in range(DEPTH))
        self.final_layer = nn.Module()
        self.final_layer.linear = linear(D, PATCH * PATCH * 2 * C)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), linear(D, 2 * D))

    def forward(self, x, t, y):
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
        angles = t.float()[:, None] * freqs
        c = self.t_embedder.mlp(
            torch.cat([torch.cos(angles), torch.sin(angles)], -1)
        ) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        x = self.final_layer.linear(F.layer_norm(x, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None])
        g = SIZE // PATCH
        x = x.reshape(-1, g, g, PATCH, PATCH, 2 * C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(-1, 2 * C, SIZE, SIZE)


@pytest.mark.parametrize(
    "flash, dense",
    [(False, False), (True, False), (False, True)],
    ids=["timm-attention", "flash-attention", "dense-dit"],
)
@pytest.mark.parametrize("wrapper", [None, "ema", "model"])
def test_converted_model_matches_the_official_one(flash, dense, wrapper):
    torch.manual_seed(0)
    official = OfficialDiTMoE(flash, dense).eval()
    state = official.state_dict()
    ckpt = state if wrapper is None else {wrapper: state, "opt": {}}
    converted = convert_official(ckpt)
    config = infer_config(state, num_heads=None if flash else HEADS)  # timm layouts do not record heads
    assert (config.hidden_size, config.depth, config.num_heads, config.num_experts, config.qk_norm) == (
        D,
        DEPTH,
        HEADS,
        0 if dense else E,
        flash,
    )
    assert (config.input_size, config.in_channels, config.num_classes, config.learn_sigma) == (SIZE, C, CLASSES, True)
    ours = DiT(config, moe_backend="torch").eval()
    load_into(ours, converted, "test")
    x, t, y = torch.randn(3, C, SIZE, SIZE), torch.tensor([1, 400, 999]), torch.tensor([0, 3, CLASSES])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), official(x, t, y), atol=1e-4, rtol=1e-4)


def test_cli_writes_a_checkpoint_that_loads(tmp_path):
    torch.manual_seed(0)
    official = OfficialDiTMoE()
    torch.save({"ema": official.state_dict()}, tmp_path / "official.pt")
    main([str(tmp_path / "official.pt"), str(tmp_path / "ours.safetensors"), "--num-heads", str(HEADS)])
    model = build_from_checkpoint(tmp_path / "ours.safetensors", moe_backend="torch")
    assert model.config.num_experts == E


def test_unknown_keys_and_bad_pos_embed_are_reported():
    state = OfficialDiTMoE().state_dict()
    with pytest.raises(ValueError, match="unrecognised"):
        convert_official({**state, "blocks.0.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="pos_embed"):
        convert_official({**state, "pos_embed": torch.randn_like(state["pos_embed"])})
    with pytest.raises(ValueError, match="does not exist"):
        convert_official("/nonexistent/official.pt")
