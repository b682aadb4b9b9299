"""Decode loops: text (understanding) and image tokens (text-to-image with classifier-free guidance).

Both loops run over a preallocated `KVCache`, prefill the prompt once, then feed one token per step. They know
nothing about tokenization: ids and embeddings in, ids out.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .janus import JanusModel
from .llama import KVCache, padded_mask, positions_from_mask
from .sampling import cfg_merge, sample


def left_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D id tensors into (B, T) padded on the left; returns ids and attention mask (1 = real)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    return ids, mask


class _Masks:
    """Attention masks and positions of a left-padded batch while it grows by one token per step.

    Holds `mask is None` when no row is padded, so that SDPA runs its plain causal path.
    """

    def __init__(self, attention_mask: torch.Tensor, max_new: int):
        B, T = attention_mask.shape
        self.padded = bool((attention_mask == 0).any())
        self.full = torch.cat([attention_mask, attention_mask.new_ones(B, max_new)], dim=1)
        self.next_pos = attention_mask.sum(-1, keepdim=True)  # (B, 1) position of the next token
        self.prompt_positions = positions_from_mask(attention_mask)
        self.prompt_len = T

    def prompt_mask(self):
        return padded_mask(self.full[:, : self.prompt_len], self.prompt_len) if self.padded else None

    def step(self, length: int):
        """Mask and positions for one new token when the cache already holds `length` positions."""
        pos = self.next_pos
        self.next_pos = self.next_pos + 1
        mask = self.full[:, None, None, : length + 1].bool() if self.padded else None
        return mask, pos


@torch.inference_mode()
def generate_image_tokens(
    model: JanusModel,
    cond_ids: list[torch.Tensor],
    uncond_ids: list[torch.Tensor],
    pad_id: int,
    n: int = 1,
    cfg_weight: float = 5.0,
    cfg_cutoff: float = 0.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    num_tokens: int | None = None,
    on_step=None,
) -> torch.Tensor:
    """Sample `n` images per prompt with CFG. Returns VQ codes (len(cond_ids) * n, num_tokens), prompt-major.

    The P conditional and P unconditional prompts are prefilled once; the cache is then repeated to n rows
    per prompt, giving the doubled batch of 2 * P * n rows that `cfg_merge` expects (conditional rows first).
    """
    P = len(cond_ids)
    num_tokens = num_tokens or model.config.image_tokens_per_image
    table = model.decoder.embed_tokens.weight  # never quantized: its device and dtype are the model's
    device, dtype = table.device, table.dtype
    ids, attn = left_pad(list(cond_ids) + list(uncond_ids), pad_id)  # (2P, T)
    ids, attn = ids.to(device), attn.to(device)
    masks = _Masks(attn, num_tokens)
    cache = KVCache(model.config.llm, 2 * P, ids.shape[1] + num_tokens, device=device, dtype=dtype)
    hidden = model.decoder(model.embed(ids), positions=masks.prompt_positions, cache=cache, mask=masks.prompt_mask(),
                           last_only=True)
    if n > 1:
        # Row r of the doubled batch: half h (cond/uncond), prompt p, sample s -> prefill row h * P + p.
        rows = torch.arange(2 * P, device=device).repeat_interleave(n)
        cache.reorder(rows)
        hidden = hidden[rows]
        masks.full, masks.next_pos = masks.full[rows], masks.next_pos[rows]
    out = torch.empty((P * n, num_tokens), dtype=torch.long, device=device)
    for i in range(num_tokens):
        logits = model.gen_head(hidden[:, -1])  # (2R, V)
        tok = sample(cfg_merge(logits, cfg_weight, cfg_cutoff), temperature, top_k, top_p, generator)  # (R,)
        out[:, i] = tok
        if on_step is not None:
            on_step(i + 1, num_tokens)
        if i + 1 == num_tokens:
            break
        embeds = model.embed_image_codes(torch.cat([tok, tok]))[:, None]  # (2R, 1, D)
        mask, pos = masks.step(cache.length)
        hidden = model.decoder(embeds, positions=pos, cache=cache, mask=mask)
    return out


@torch.inference_mode()
def generate_text(
    model: JanusModel,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    eos_id: int,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), finished (B,) bool) per step for a left-padded batch of prompt embeddings (B, T, D).

    A row is finished after it produced `eos_id` (which is yielded); finished rows keep producing `eos_id`.
    Stops when every row is finished or after `max_new_tokens`.
    """
    B, T, _ = embeds.shape
    device = embeds.device
    attention_mask = attention_mask.to(device)
    masks = _Masks(attention_mask, max_new_tokens)
    cache = KVCache(model.config.llm, B, T + max_new_tokens, device=device, dtype=embeds.dtype)
    hidden = model.decoder(embeds, positions=masks.prompt_positions, cache=cache, mask=masks.prompt_mask(),
                           last_only=True)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        logits = model.language_model.lm_head(hidden[:, -1])  # (B, V)
        tok = sample(logits, temperature, top_k, top_p, generator)
        tok = torch.where(finished, torch.full_like(tok, eos_id), tok)
        finished = finished | (tok == eos_id)
        yield tok, finished
        if bool(finished.all()) or i + 1 == max_new_tokens:
            return
        mask, pos = masks.step(cache.length)
        hidden = model.decoder(model.decoder.embed_tokens(tok)[:, None], positions=pos, cache=cache, mask=mask)
