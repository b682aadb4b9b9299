"""Training a VQ tokenizer of the VQ-16 family (LlamaGen): reconstruction + commitment + codebook losses,
l2-normalised codebook, restarts of dead codes from recent encoder outputs, codebook usage reported."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from PIL import Image

from ..config import VQConfig
from ..vq import VQModel, VQOutput, to_uint8

log = logging.getLogger(__name__)


def load_images(paths: list[Path], size: int) -> torch.Tensor:
    """Images as (N, 3, size, size) in [-1, 1]."""
    return pil_to_tensor([Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC) for p in paths])


def pil_to_tensor(images: list) -> torch.Tensor:
    """PIL images of one size -> (N, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vq(images: torch.Tensor, cfg: VQConfig, steps: int = 1500, batch: int = 32, lr: float = 2e-3,
             seed: int = 0, log_every: int = 100, restart_every: int = 100,
             ae_warmup: float = 0.0, ae_noise: float = 0.1, labels: torch.Tensor | None = None,
             semantic_weight: float = 1.0, compact_weight: float = 1.0) -> tuple[VQModel, dict]:
    """Train on whole images (N, 3, S, S) in [-1, 1].

    The first `ae_warmup` fraction of the steps trains a plain autoencoder on the l2-normalised latents (no
    quantisation: exact gradients, so colours and shapes are learnt quickly); the codebook is then initialised by
    k-means on the latents and training goes on with quantisation, commitment and codebook losses, the encoder at a
    tenth of the learning rate (the decoder learns the quantised latents while the codes stay put).

    `labels` (N, heads, h, w), aligned with `images`, adds a semantic loss: linear heads on the l2-normalised latents
    must read each latent's content (in the shapes world, the shape, colour and size in its grid cell), times
    `semantic_weight`. It pulls distinct contents apart in the code space from the first steps, which the pixel loss
    does only slowly for details a few pixels wide (a small circle against a small square). With it,
    `compact_weight` pulls every latent towards a learned prototype of its cell's content (a centre loss): the
    latent of an empty cell then no longer depends on what its neighbours hold, so one content is one code or a
    few, not hundreds (the generator would otherwise spend its loss on telling apart codes that all decode to the
    same white cell)."""

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vq = VQModel(cfg)
    enc = list(vq.encoder.parameters()) + list(vq.quant_conv.parameters())
    ids = {id(p) for p in enc}
    rest = [p for p in vq.parameters() if id(p) not in ids]
    head, latents = None, {}
    if labels is not None:
        from .cells import HEADS, content_index

        if len(labels) != len(images):
            raise ValueError(f"train_vq: {len(labels)} labels for {len(images)} images")
        head = nn.Conv2d(cfg.codebook_embed_dim, sum(HEADS), 1)
        n_states = HEADS[0] * HEADS[1] * HEADS[2]
        protos = nn.Embedding(n_states, cfg.codebook_embed_dim)
        rest += list(head.parameters()) + list(protos.parameters())
        hook = vq.quant_conv.register_forward_hook(lambda m, i, o: latents.__setitem__("z", o))
    opt = torch.optim.AdamW([{"params": enc, "scale": 1.0}, {"params": rest, "scale": 1.0}], lr=lr,
                            betas=(0.9, 0.95), weight_decay=0.0)
    hits = torch.zeros(cfg.codebook_size)
    warmup = int(ae_warmup * steps)
    t0, stats = time.time(), {}
    for step in range(1, steps + 1):
        pick = torch.randint(len(images), (batch,), generator=g)
        x = images[pick]
        warm = step <= warmup
        if step == warmup + 1 and warmup:
            _kmeans_init(vq, images, g)
            opt.param_groups[0]["scale"] = 0.1  # the warmed-up encoder now moves slowly: codes stay put
        out = _autoencode(vq, x, ae_noise) if warm else vq(x)
        rec = _recon_loss(out.reconstruction, x)
        loss = rec + out.commit_loss + out.codebook_loss
        sem = compact = rec.new_zeros(())
        if head is not None:
            z = F.normalize(latents["z"], dim=1)  # (batch, dim, h, w)
            logits = head(z).split(HEADS, dim=1)
            y = labels[pick]  # (batch, heads, h, w)
            sem = sum(F.cross_entropy(lg, y[:, i]) for i, lg in enumerate(logits))
            proto = F.normalize(protos(content_index(y)), dim=-1).permute(0, 3, 1, 2)  # (batch, dim, h, w)
            compact = (1 - (z * proto).sum(1)).mean()
            loss = loss + semantic_weight * sem + compact_weight * compact
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vq.parameters(), 1.0)
        for pg in opt.param_groups:  # cosine decay to 10%
            pg["lr"] = pg["scale"] * lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps)))
        opt.step()
        if not warm:
            hits += torch.bincount(out.codes.flatten(), minlength=cfg.codebook_size).float()
        if not warm and step % restart_every == 0 and step < 0.8 * steps:
            _restart_dead(vq, x, hits, g)
            hits.zero_()
        if step % log_every == 0 or step == steps:
            stats = {"step": step, "recon": float(rec.detach()), "semantic": float(sem.detach()),
                     "compact": float(compact.detach()), "commit": float(out.commit_loss.detach()), "usage": out.usage, "s": round(time.time() - t0, 1)}
            log.info("vq %s", stats)
    if head is not None:
        hook.remove()
    with torch.no_grad():
        codes = torch.cat([vq.encode(c) for c in images[:512].split(64)])
    stats["codebook_usage"] = codes.unique().numel() / cfg.codebook_size
    return vq.eval(), stats


def _recon_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 + L2, with non-background pixels weighted 5x: shapes cover a small part of each image, and the weight
    makes their colours learnt early."""
    w = 1 + 4 * (x < 0.98).any(dim=1, keepdim=True).float()
    err = recon - x
    return (w * (err.abs() + err.pow(2))).mean() / w.mean()


def merge_codes(vq: VQModel, images: torch.Tensor, labels: torch.Tensor, steps: int = 300, batch: int = 8,
                lr: float = 3e-4, seed: int = 0, sample: int = 2048) -> dict:
    """One code per content: codes whose cells hold the same thing (by majority over `sample` labelled images) are
    merged into one, their vectors set to the group's centroid (ties resolve to the group's lowest id; unused codes
    join the nearest group), then the decoder is fine-tuned on the merged codes for `steps` (encoder and codebook
    frozen). What is left of a code beyond its content (which neighbour it had, say) is noise to the generator and
    nothing to the picture."""
    from .cells import code_contents

    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(images), generator=g)[:sample]
    with torch.no_grad():
        z = F.normalize(torch.cat([vq._latents(c) for c in images[pick].split(64)]), dim=-1).flatten(0, 2)  # (P, C)
        codes = vq.quantize.nearest(z)  # (P,)
        used = codes.unique().tolist()
        w = vq.quantize.embedding.weight
        try:
            contents = code_contents(codes, labels[pick], len(w))  # (K,) majority content per code
        except ValueError as e:
            raise ValueError(f"merge_codes: {e}") from None
        groups: dict[int, list[int]] = {}
        for code in used:
            groups.setdefault(int(contents[code]), []).append(code)
        centroids = torch.stack([F.normalize(z[torch.isin(codes, torch.tensor(m))].mean(0), dim=-1)
                                 for m in groups.values()])  # (contents, C)
        for members, c in zip(groups.values(), centroids):
            w[members] = c
        # A code no sampled cell chose joins the group nearest to it, lest it win latents once the others moved.
        dead = torch.tensor(sorted(set(range(len(w))) - set(used)), dtype=torch.long)
        if len(dead):
            w[dead] = centroids[(F.normalize(w[dead], dim=-1) @ centroids.t()).argmax(1)]
    dec = list(vq.decoder.parameters()) + list(vq.post_quant_conv.parameters())
    opt = torch.optim.AdamW(dec, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=g)]
        with torch.no_grad():
            zq = vq.quantize.lookup(vq.quantize.nearest(vq._latents(x)))  # (batch, h, w, C)
        loss = _recon_loss(vq.decode_latents(zq), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec, 1.0)
        opt.step()
    vq.eval()
    return {"codes_before": len(used), "contents": len(groups), "finetune_loss": float(loss.detach())}


def _autoencode(vq: VQModel, x: torch.Tensor, noise: float = 0.0) -> VQOutput:
    """The VQ's encoder and decoder without the quantiser: l2-normalised latents straight to the decoder, with
    Gaussian noise of std `noise` added (and renormalised) in training, so that the encoder spreads distinct
    contents far apart and the decoder tolerates the error that quantisation will bring."""
    z = F.normalize(vq._latents(x), dim=-1)
    if noise and vq.training:
        z = F.normalize(z + noise * torch.randn_like(z), dim=-1)
    recon = vq.decode_latents(z)
    zero = recon.new_zeros(())
    return VQOutput(recon, torch.zeros(z.shape[:-1], dtype=torch.long).flatten(1), zero, zero, 0.0)


@torch.no_grad()
def _kmeans_init(vq: VQModel, images: torch.Tensor, g: torch.Generator, n: int = 2048, iters: int = 15) -> None:
    """Codebook <- k-means centroids (cosine) of the latents of n random images, seeded by k-means++ (so that a rare
    content far from the others gets a centroid of its own rather than sharing one)."""
    x = images[torch.randperm(len(images), generator=g)[:n]]
    z = torch.cat([vq._latents(c) for c in x.split(64)]).reshape(-1, vq.cfg.codebook_embed_dim)
    z = F.normalize(z, dim=-1)
    k = vq.cfg.codebook_size
    cent = z[torch.randint(len(z), (1,), generator=g)]
    dist = (1 - z @ cent.t()).squeeze(1).clamp(min=0)
    for _ in range(1, k):
        pick = torch.multinomial(dist + 1e-12, 1, generator=g) if dist.sum() > 0 else torch.randint(len(z), (1,), generator=g)
        cent = torch.cat([cent, z[pick]])
        dist = torch.minimum(dist, (1 - z @ z[pick].t()).squeeze(1).clamp(min=0))
    cent = cent.clone()
    for _ in range(iters):
        assign = (z @ cent.t()).argmax(1)
        sums = torch.zeros_like(cent).index_add_(0, assign, z)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        cent = torch.where(empty[:, None], z[torch.randint(len(z), (k,), generator=g)],
                           sums / counts.clamp(min=1)[:, None])
        cent = F.normalize(cent, dim=-1)
    vq.quantize.embedding.weight.copy_(cent + 0.001 * torch.randn(cent.shape, generator=g))


@torch.no_grad()
def _restart_dead(vq: VQModel, x: torch.Tensor, hits: torch.Tensor, g: torch.Generator) -> None:
    dead = (hits == 0).nonzero().flatten()
    if len(dead) == 0:
        return
    z = vq._latents(x).reshape(-1, vq.cfg.codebook_embed_dim)
    pick = z[torch.randint(len(z), (len(dead),), generator=g)]
    vq.quantize.embedding.weight[dead] = pick + 0.01 * torch.randn(pick.shape, generator=g)


@torch.no_grad()
def reconstruction_accuracy(vq: VQModel, scenes: list, autoencode: bool = False) -> dict:
    """Render scenes, reconstruct them (through the quantiser, or without it when `autoencode`), and read them back
    with the scorer: the fraction of objects found with the right shape, colour and size in the right cell, and of
    scenes read back exactly."""
    from ..data.world import cell_of
    from ..eval.shapescore import detect

    was = vq.training
    vq.eval()
    size = vq.cfg.image_size
    x = pil_to_tensor([s.render(size) for s in scenes])
    # vq.encode/decode_codes rather than the training forward, which also records code usage in a buffer.
    rec = torch.cat([_autoencode(vq, c).reconstruction if autoencode else vq.decode_codes(vq.encode(c))
                     for c in x.split(64)])
    arr = to_uint8(rec)
    found = total = exact = 0
    for scene, a in zip(scenes, arr):
        want = {(cell_of(o.x, o.y), o.shape, o.color, o.size) for o in scene.objects}
        got = {(cell_of(*d.center), d.shape, d.color, d.size) for d in detect(a)}
        found += len(want & got)
        total += len(want)
        exact += want == got
    vq.train(was)
    return {"objects": found / total, "scenes": exact / len(scenes)}


@torch.no_grad()
def code_entropy(vq: VQModel, scenes: list) -> dict:
    """How much a cell's code says beyond its content: the mean conditional entropy (bits) of the code given what
    the cell holds, over all cells of `scenes`, and the number of distinct codes of empty cells. 0 bits means one
    code per content; every bit is noise the generator must model without it meaning anything."""
    from collections import Counter, defaultdict

    from .cells import cell_labels, content_index

    x = pil_to_tensor([s.render(vq.cfg.image_size) for s in scenes])
    codes = torch.cat([vq.encode(c) for c in x.split(64)]).reshape(len(scenes), -1)  # (N, cells) raster order
    contents = content_index(torch.stack([cell_labels(s) for s in scenes])).flatten(1)  # (N, cells)
    if contents.shape != codes.shape:
        raise ValueError(f"code_entropy: {codes.shape[1]} codes an image for a grid of {contents.shape[1]} cells")
    by_content: dict[int, Counter] = defaultdict(Counter)
    for content, code in zip(contents.flatten().tolist(), codes.flatten().tolist()):
        by_content[content][code] += 1
    bits = 0.0
    for counts in by_content.values():
        n = sum(counts.values())
        bits -= sum(c * np.log2(c / n) for c in counts.values())
    empty = by_content.get(0, Counter())
    return {"bits_per_cell": round(float(bits) / codes.numel(), 3), "empty_codes": len(empty)}


def image_paths(data_dir: Path) -> list[Path]:
    return sorted((Path(data_dir) / "img").glob("*.png"))
