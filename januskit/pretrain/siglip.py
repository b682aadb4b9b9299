"""SigLIP-style pretraining of the understanding encoder (Zhai et al. 2023): a sigmoid loss over all
image-caption pairs of a batch, against a small text tower. Only the image side (`VisionTower`) is kept."""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SigLIPConfig
from ..siglip import VisionTower

log = logging.getLogger(__name__)


class TextTower(nn.Module):
    def __init__(self, vocab_size: int, width: int, out_dim: int, layers: int = 2, heads: int = 4, max_len: int = 96):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.zeros(1, max_len, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, T) -> (B, out_dim), mean-pooled over real tokens."""
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=~mask))
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.proj(pooled)


def sigmoid_loss(img: torch.Tensor, txt: torch.Tensor, t: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t() * t.exp() + b
    labels = 2 * torch.eye(len(img)) - 1
    return -F.logsigmoid(labels * logits).sum() / len(img)


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """A (grid*grid, width) table of 2-D sine-cosine position codes in raster order (half the channels for the row,
    half for the column), each channel of unit RMS."""
    if width % 4:
        raise ValueError(f"sincos_2d: width {width} is not a multiple of 4")
    q = width // 4
    freq = 1.0 / (grid ** (torch.arange(q, dtype=torch.float32) / q))  # periods from 2*pi up to 2*pi*grid cells
    pos = torch.arange(grid, dtype=torch.float32)[:, None] * freq[None] * torch.pi / 2
    one = torch.cat([pos.sin(), pos.cos()], dim=1) * 2 ** 0.5  # (grid, width/2)
    rows = one[:, None].expand(grid, grid, -1)
    cols = one[None, :].expand(grid, grid, -1)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, width)


def train_siglip(pixels: torch.Tensor, token_ids: list[list[int]], cfg: SigLIPConfig, vocab_size: int,
                 pad_id: int, steps: int = 600, batch: int = 64, lr: float = 1e-3, seed: int = 0,
                 log_every: int = 100) -> tuple[VisionTower, dict]:
    """pixels (N, 3, S, S) normalised as the understanding transform does; token_ids[i] its caption."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vision = VisionTower(cfg)
    # Position codes as the starting table (still learned). From zeros the contrastive loss never grew them: a
    # caption is told apart from the batch's others by what is drawn, seldom by where, and after 300 steps a linear
    # probe read a patch's grid cell from its feature at chance (0.10), so the LLM had no way to answer "is the red
    # circle above the square?". SigLIP's own table is learned on billions of pairs; here it is seeded.
    grid = cfg.image_size // cfg.patch_size
    with torch.no_grad():
        vision.vision_tower.pos_embed.copy_(sincos_2d(grid, cfg.width)[None])
    text = TextTower(vocab_size, 128, cfg.width)
    t, b = nn.Parameter(torch.tensor(2.3)), nn.Parameter(torch.tensor(-10.0))  # SigLIP's init: t=log 10, b=-10
    params = list(vision.parameters()) + list(text.parameters()) + [t, b]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    T = min(96, max(len(x) for x in token_ids))
    ids = torch.full((len(token_ids), T), pad_id)
    mask = torch.zeros((len(token_ids), T), dtype=torch.bool)
    for i, x in enumerate(token_ids):
        x = x[:T]
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = True
    t0, stats = time.time(), {}
    for step in range(1, steps + 1):
        idx = torch.randperm(len(pixels), generator=g)[:batch]
        loss = sigmoid_loss(vision.pooled(pixels[idx]), text(ids[idx], mask[idx]), t, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for pg in opt.param_groups:
            pg["lr"] = lr * min(1.0, step / 50)
        opt.step()
        if step % log_every == 0 or step == steps:
            with torch.no_grad():
                im = F.normalize(vision.pooled(pixels[idx]), dim=-1)
                tx = F.normalize(text(ids[idx], mask[idx]), dim=-1)
                acc = float(((im @ tx.t()).argmax(1) == torch.arange(len(idx))).float().mean())
            stats = {"step": step, "loss": float(loss.detach()), "retrieval_acc": acc, "s": time.time() - t0}
            log.info("siglip %s", stats)
    return vision.eval(), stats


@torch.no_grad()
def probe_accuracy(vision: VisionTower, train: tuple[torch.Tensor, torch.Tensor],
                   test: tuple[torch.Tensor, torch.Tensor], steps: int = 300) -> dict:
    """How much of each cell's content a linear read-out of the patch features recovers: one linear probe per
    attribute, trained on `train` and scored on the occupied cells of `test`; each set is (pixels (N, 3, S, S),
    cell labels (N, 3, G, G) as `cells.cell_labels` makes them), one patch per cell. The understanding encoder's
    gate: the LLM cannot answer what the features do not carry."""
    from .cells import ATTRIBUTES, HEADS

    def feats(px):
        return torch.cat([vision(c) for c in px.split(64)])  # (N, patches, width)

    (xtr, ytr), (xte, yte) = train, test
    ftr, fte = feats(xtr), feats(xte)
    if ftr.shape[1] != ytr[0, 0].numel():
        raise ValueError(f"probe_accuracy: {ftr.shape[1]} patches for a grid of {ytr[0, 0].numel()} cells")
    mu, sd = ftr.mean((0, 1)), ftr.std((0, 1)) + 1e-6
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    def fit(labels, classes):  # labels (N, patches): a linear probe trained on ftr, returns its test predictions
        lin = nn.Linear(ftr.shape[-1], classes)
        opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
        with torch.enable_grad():
            for _ in range(steps):
                loss = F.cross_entropy(lin(ftr).flatten(0, 1), labels.flatten())
                opt.zero_grad()
                loss.backward()
                opt.step()
        return lin(fte).argmax(-1)

    out = {}
    for i, (name, k) in enumerate(zip(ATTRIBUTES, HEADS)):
        ytr_i, yte_i = ytr[:, i].flatten(1), yte[:, i].flatten(1)  # (N, cells), raster order as the patches
        occupied = yte_i > 0
        out[name] = float((fit(ytr_i, k) == yte_i)[occupied].float().mean())
    # Where: which grid cell a patch feature comes from (all cells, empty or not); position questions need it.
    cells = torch.arange(ftr.shape[1])
    out["position"] = float((fit(cells.expand(len(ftr), -1), len(cells)) == cells).float().mean())
    return out
