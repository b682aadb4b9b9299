"""The understanding encoder: a SigLIP ViT as the official Janus code builds it with timm.

No class token, learned position embeddings, pre-norm blocks with exact GELU, LayerNorm eps 1e-6, final norm
applied, and the attention-pooling ("MAP") head present in the checkpoint but not used by Janus (it gives the
pooled image embedding that SigLIP's contrastive training needs). Names follow timm's VisionTransformer under
`vision_tower.`, as in the official checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import SigLIPConfig


class PatchEmbed(nn.Module):
    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class ViTAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
        y = kernels.prompt_attention(qkv[0], qkv[1], qkv[2])  # (B, N, H, hd) on CPUs with the kernels, or None
        if y is None:
            y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2)
        return self.proj(y.reshape(B, N, D))


class ViTMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = ViTAttention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = ViTMLP(cfg.width, int(cfg.width * cfg.mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AttentionPool(nn.Module):
    """SigLIP's multi-head attention pooling: one learned query attends over the patch features."""

    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        d = cfg.width
        self.heads = cfg.heads
        self.latent = nn.Parameter(torch.zeros(1, 1, d))
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = ViTMLP(d, int(d * cfg.mlp_ratio))

    def forward(self, x):
        """x (B, N, D) -> pooled (B, D)."""
        B, N, D = x.shape
        hd = D // self.heads
        q = self.q(self.latent).view(1, 1, self.heads, hd).transpose(1, 2).expand(B, -1, -1, -1)  # (B, H, 1, hd)
        kv = self.kv(x).view(B, N, 2, self.heads, hd).permute(2, 0, 3, 1, 4)  # (2, B, H, N, hd)
        y = F.scaled_dot_product_attention(q, kv[0], kv[1]).transpose(1, 2).reshape(B, 1, D)
        y = self.proj(y)
        y = y + self.mlp(self.norm(y))
        return y[:, 0]


class SigLIPViT(nn.Module):
    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.width))
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn_pool = AttentionPool(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S), normalised -> patch features (B, N, D) after the final norm."""
        x = self.patch_embed(pixels) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class VisionTower(nn.Module):
    """The official `CLIPVisionTower` wrapper: holds the ViT as `vision_tower` and selects features."""

    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = SigLIPViT(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S) -> features (B, num_features, width)."""
        x = self.vision_tower(pixels)
        return x[:, 1:] if self.cfg.select_feature == "patch" else x

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels -> one embedding per image (B, width), via the attention-pool head (contrastive training)."""
        return self.vision_tower.attn_pool(self.vision_tower(pixels))
