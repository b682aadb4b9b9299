"""Training a VQ tokenizer of the VQ-16 family (LlamaGen): reconstruction + commitment + codebook losses,
l2-normalised codebook, restarts of dead codes from recent encoder outputs, codebook usage reported."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import VQConfig
from ..vq import VQModel

log = logging.getLogger(__name__)


def load_images(paths: list[Path], size: int) -> torch.Tensor:
    """Images as (N, 3, size, size) in [-1, 1]."""
    arr = np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)) for p in paths])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vq(images: torch.Tensor, cfg: VQConfig, steps: int = 1500, batch: int = 32, lr: float = 2e-3,
             seed: int = 0, log_every: int = 100, restart_every: int = 100, crop: int | None = None) -> tuple[VQModel, dict]:
    """Train on random `crop`-pixel crops (the model is convolutional; crops make steps several times cheaper)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vq = VQModel(cfg)
    opt = torch.optim.AdamW(vq.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    hits = torch.zeros(cfg.codebook_size)
    t0, stats = time.time(), {}
    for step in range(1, steps + 1):
        x = images[torch.randint(len(images), (batch,), generator=g)]
        if crop and crop < x.shape[-1]:
            i, j = (int(v) for v in torch.randint(0, (x.shape[-1] - crop) // vq.cfg.downsample + 1, (2,), generator=g))
            d = vq.cfg.downsample
            x = x[:, :, i * d: i * d + crop, j * d: j * d + crop]
        out = vq(x)
        # Shapes cover a small part of each image: weight non-background pixels up so colours are learnt early.
        w = 1 + 4 * (x < 0.98).any(dim=1, keepdim=True).float()
        err = out.reconstruction - x
        rec = (w * (err.abs() + err.pow(2))).mean() / w.mean()
        loss = rec + out.commit_loss + out.codebook_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vq.parameters(), 1.0)
        for pg in opt.param_groups:  # cosine decay to 10%
            pg["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps)))
        opt.step()
        hits += torch.bincount(out.codes.flatten(), minlength=cfg.codebook_size).float()
        if step % restart_every == 0 and step < 0.8 * steps:
            _restart_dead(vq, x, hits, g)
            hits.zero_()
        if step % log_every == 0 or step == steps:
            stats = {"step": step, "recon": float(rec.detach()), "commit": float(out.commit_loss.detach()), "usage": out.usage,
                     "s": time.time() - t0}
            log.info("vq %s", stats)
    with torch.no_grad():
        codes = torch.cat([vq.encode(c) for c in images[:512].split(64)])
    stats["codebook_usage"] = codes.unique().numel() / cfg.codebook_size
    return vq.eval(), stats


@torch.no_grad()
def _restart_dead(vq: VQModel, x: torch.Tensor, hits: torch.Tensor, g: torch.Generator) -> None:
    dead = (hits == 0).nonzero().flatten()
    if len(dead) == 0:
        return
    z = vq._latents(x).reshape(-1, vq.cfg.codebook_embed_dim)
    pick = z[torch.randint(len(z), (len(dead),), generator=g)]
    vq.quantize.embedding.weight[dead] = pick + 0.01 * torch.randn(pick.shape, generator=g)


def image_paths(data_dir: Path) -> list[Path]:
    return sorted((Path(data_dir) / "img").glob("*.png"))
