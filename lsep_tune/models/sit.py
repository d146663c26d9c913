"""SiT: a flow-matching diffusion transformer with DiT's adaLN-Zero blocks (arXiv 2401.08740).

Built from timm's PatchEmbed, Attention (SDPA kernels) and Mlp. The forward pass can hand back the
tokens after any block depths and stop early, which is all the regularizers need: LSEP's probe
pass and SRA's student / teacher features all run through this one `forward`. The sizes by name
(`SiT-XL/2`) are in `names.py`, which the config reads without torch.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention

from lsep_tune.models.names import parse_model_name


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Scalar t in [0, 1] -> sinusoidal frequencies -> MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class label -> vector. Index `num_classes` is the null (dropped) label for CFG.

    Dropping labels is the objective's job (see objectives.flow.drop_labels), so the randomness lives
    in one place and this module is deterministic.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class SiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated by the conditioning c (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (N, T, D), c: (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SiT(nn.Module):
    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        qk_norm: bool = False,
    ):
        super().__init__()
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.grid_size = input_size // patch_size

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        # Fixed 2-D sin-cos position embedding, not trained.
        self.register_buffer("pos_embed", torch.zeros(1, self.grid_size**2, hidden_size), persistent=False)
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        return self.num_classes

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        if self.pos_embed.device.type != "meta":
            pe = sincos_pos_embed_2d(self.hidden_size, self.grid_size)
            self.pos_embed.copy_(torch.from_numpy(pe).float().unsqueeze(0))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output starts at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        # (N, T, p*p*C) -> (N, C, H, W)
        n, p, c, g = x.shape[0], self.patch_size, self.in_channels, self.grid_size
        x = x.reshape(n, g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(n, c, g * p, g * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        return_depths: tuple[int, ...] = (),
        stop_at: int | None = None,
    ) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """x: (N, C, H, W) noisy input, t: (N,) in [0, 1], y: (N,) labels (num_classes = null).

        Returns (velocity (N, C, H, W) or None when stopped early, {depth k: tokens (N, T, D) after
        block k}). `stop_at=k` runs blocks 1..k only: the cheap path for probe and teacher features.
        """
        h = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = (H / p) * (W / p)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        features: dict[int, torch.Tensor] = {}
        for depth, block in enumerate(self.blocks, start=1):
            h = block(h, c)
            if depth in return_depths:
                features[depth] = h
            if stop_at is not None and depth >= stop_at:
                return None, features
        out = self.unpatchify(self.final_layer(h, c))
        return out, features

    def velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.forward(x, t, y)[0]


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, dim) fixed sine-cosine embedding of the 2-D token grid (as in MAE / DiT)."""
    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)  # each (G, G); w varies fastest

    def embed_1d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)  # (M, d/2)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([embed_1d(dim // 2, grid_w), embed_1d(dim // 2, grid_h)], axis=1)


def create_model(name: str, **overrides) -> SiT:
    """Build a SiT by preset name; keyword overrides (input_size, in_channels, num_classes, depth...) win."""
    kwargs = parse_model_name(name)
    kwargs.update(overrides)
    return SiT(**kwargs)


def sit_from_config(model_cfg) -> SiT:
    """The SiT a config's ``model`` section describes: the one way training and sampling build it."""
    m = model_cfg
    return create_model(m.name, input_size=m.input_size, in_channels=m.in_channels,
                        num_classes=m.num_classes, qk_norm=m.qk_norm)
