"""The generation tokenizer: LlamaGen's VQ-16 (Sun et al. 2024), as used by Janus.

A convolutional encoder downsamples by 2^(levels-1) to a grid of latents, `quant_conv` projects them to the code
dimension, and the quantizer picks the nearest codebook row after l2-normalising both (the official code's
squared-distance search). Decoding looks the (normalised) rows up and runs `post_quant_conv` and the decoder.
Module names match the official `gen_vision_model.*` state dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import VQConfig


def _norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def _swish(x):
    return x * torch.sigmoid(x)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int = 32):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the spatial positions, with 1x1 convolutions."""

    def __init__(self, c: int, groups: int = 32):
        super().__init__()
        self.norm = _norm(c, groups)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        k = self.k(h).reshape(B, C, H * W)  # (B, C, HW)
        v = self.v(h).reshape(B, C, H * W)
        w = torch.softmax(torch.bmm(q, k) * C**-0.5, dim=2)  # (B, HW_q, HW_k)
        y = torch.bmm(v, w.transpose(1, 2)).reshape(B, C, H, W)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype))


class Level(nn.Module):
    """One resolution of the encoder or decoder: residual blocks, optional attention, optional resampling."""

    def __init__(self, cin: int, cout: int, n_res: int, attn: bool, resample: type | None, groups: int = 32):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(cin if i == 0 else cout, cout, groups) for i in range(n_res))
        self.attn = nn.ModuleList(AttnBlock(cout, groups) for _ in range(n_res)) if attn else nn.ModuleList()
        if resample is Downsample:
            self.downsample = Downsample(cout)
        elif resample is Upsample:
            self.upsample = Upsample(cout)

    def forward(self, x):
        for i, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


def _mid(c: int, groups: int) -> nn.Sequential:
    return nn.Sequential(ResBlock(c, c, groups), AttnBlock(c, groups), ResBlock(c, c, groups))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult = (1,) + tuple(cfg.ch_mult)
        n = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList(
            Level(cfg.ch * mult[i], cfg.ch * mult[i + 1], cfg.num_res_blocks, attn=i == n - 1,
                  resample=Downsample if i != n - 1 else None, groups=cfg.norm_groups)
            for i in range(n)
        )
        c = cfg.ch * cfg.ch_mult[-1]
        self.mid = _mid(c, cfg.norm_groups)
        self.norm_out = _norm(c, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.conv_blocks:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(_swish(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _mid(c, cfg.norm_groups)
        levels = []
        cin = c
        for i in range(n):  # from the lowest resolution up
            cout = cfg.ch * cfg.ch_mult[n - 1 - i]
            levels.append(Level(cin, cout, cfg.num_res_blocks + 1, attn=i == 0,
                                resample=Upsample if i != n - 1 else None, groups=cfg.norm_groups))
            cin = cout
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = _norm(cin, cfg.norm_groups)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        x = self.mid(self.conv_in(z))
        for level in self.conv_blocks:
            x = level(x)
        return self.conv_out(_swish(self.norm_out(x)))


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.l2_norm = cfg.codebook_l2_norm
        self.beta = cfg.commit_beta
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        # Codes chosen over the last 65536 positions (LlamaGen's usage statistic); kept for checkpoint parity.
        self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., C) -> code ids (...)."""
        flat = z.reshape(-1, z.shape[-1])
        if self.l2_norm:
            flat = F.normalize(flat, p=2, dim=-1)
        e = self.codebook()
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()  # (N, K)
        return d.argmin(dim=1).reshape(z.shape[:-1])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return F.embedding(codes, self.codebook())


@dataclass
class VQOutput:
    reconstruction: torch.Tensor  # (B, 3, H, W)
    codes: torch.Tensor  # (B, h*w)
    commit_loss: torch.Tensor
    codebook_loss: torch.Tensor
    usage: float  # fraction of the codebook used in this batch


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    def _latents(self, pixels):
        return self.quant_conv(self.encoder(pixels)).permute(0, 2, 3, 1)  # (B, h, w, C)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) in [-1, 1] -> codes (B, h*w), row-major."""
        return self.quantize.nearest(self._latents(pixels)).flatten(1)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, n) -> code vectors (B, n, C), normalised when the codebook is."""
        return self.quantize.lookup(codes)

    def decode_codes(self, codes: torch.Tensor, grid: int | tuple[int, int] | None = None) -> torch.Tensor:
        """codes (B, n) -> pixels (B, 3, H, W), about [-1, 1]."""
        B, n = codes.shape
        if grid is None:
            grid = math.isqrt(n)
        h, w = (grid, grid) if isinstance(grid, int) else grid
        if h * w != n:
            raise ValueError(f"{n} codes do not fill a {h}x{w} grid")
        return self.decode_latents(self.embed_codes(codes).reshape(B, h, w, -1))

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, h, w, C) -> pixels (B, 3, H, W), about [-1, 1]."""
        z = z.permute(0, 3, 1, 2).to(self.post_quant_conv.weight.dtype)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, pixels: torch.Tensor) -> VQOutput:
        """Training forward: reconstruction through the straight-through estimator, and the VQ losses."""
        z = self._latents(pixels)  # (B, h, w, C)
        if self.quantize.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        codes = self.quantize.nearest(z)
        zq = self.quantize.lookup(codes)
        commit = self.quantize.beta * F.mse_loss(zq.detach(), z)
        codebook = F.mse_loss(zq, z.detach())
        recon = self.decode_latents(z + (zq - z).detach())
        flat = codes.flatten()
        with torch.no_grad():
            used = self.quantize.codebook_used
            k = min(flat.numel(), used.numel())
            self.quantize.codebook_used.copy_(torch.cat([used[k:], flat[-k:].to(used.dtype)]))
        usage = flat.unique().numel() / self.cfg.codebook_size
        return VQOutput(recon, codes.flatten(1), commit, codebook, usage)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoder output (B, 3, H, W) in about [-1, 1] -> (B, H, W, 3) uint8, as the official script converts it
    (clip, then truncate)."""
    arr = images.detach().float().cpu().numpy().transpose(0, 2, 3, 1)
    return np.clip((arr + 1) / 2 * 255, 0, 255).astype(np.uint8)


def to_pil(images: torch.Tensor) -> list:
    """Decoder output (B, 3, H, W) in about [-1, 1] -> PIL images (see `to_uint8`)."""
    from PIL import Image

    return [Image.fromarray(a) for a in to_uint8(images)]
