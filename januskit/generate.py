"""Decode loops: text (understanding) and image tokens (text-to-image with classifier-free guidance).

Both loops run over a preallocated `KVCache`, prefill the prompt once, then feed one token per step. They know
nothing about tokenization: ids and embeddings in, ids out.

`compiled=True` runs each decode step at fixed shapes through torch.compile (`_static_step`): the cache is made
static after the prefill, so every step of every prompt whose padded length rounds to the same cache size reuses
one graph (other sizes: `_compiled_step`), and on CUDA that graph is replayed as a CUDA graph (mode
"reduce-overhead"). A decode step of a 1B model launches a few hundred small kernels; on a GPU their launch
overhead, not the weights' bytes, sets its time.
"""

from __future__ import annotations

import os
import shutil
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


_STATIC_ROUND = 64  # static caches round their length up to this, so that prompts of similar length share a graph
_compiled_steps: dict = {}


def _static_step(model: JanusModel, embeds: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                 cache: KVCache, head: str) -> torch.Tensor:
    """One decode step over a static cache: embeds (B, 1, D), positions (B, 1), valid (B, max_len) bool (real
    prompt tokens and every generated position) -> logits (B, V) of the `head` ("image" or "text")."""
    written = torch.arange(cache.max_len, device=valid.device) <= cache.slot  # (max_len,): up to this step's slot
    mask = (valid & written)[:, None, None, :]  # (B, 1, 1, max_len)
    return _head(model, model.decoder(embeds, positions=positions, cache=cache, mask=mask)[:, -1], head)


def _head(model: JanusModel, hidden: torch.Tensor, head: str) -> torch.Tensor:
    """Next-token logits (B, V) from hidden states (B, D): the image head ("image") or the text head ("text")."""
    return model.gen_head(hidden) if head == "image" else model.language_model.lm_head(hidden)


def _compiled_step(device: torch.device):
    """`_static_step` under torch.compile, one per device type. Shapes start static; a second batch size or cache
    length recompiles the step with that size symbolic (torch.compile's automatic dynamic shapes), so a long-running
    process (the server) compiles a few times, far from torch.compile's recompilation limit, while CUDA graphs are
    still recorded per concrete shape."""
    if device.type not in _compiled_steps:
        if device.type == "cuda":  # CUDA graphs, where a step's launches cost more than its work
            compiled = torch.compile(_static_step, fullgraph=True, mode="reduce-overhead")

            def step(*args):
                torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed: reuse its memory
                return compiled(*args)

            _compiled_steps[device.type] = step
        else:
            _compiled_steps[device.type] = torch.compile(_static_step, fullgraph=True)
    return _compiled_steps[device.type]


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot run on `device` here (what its backend needs: a C++ compiler on the CPU, Triton on
    a GPU), or None when it can."""
    if device.type == "cpu":
        compilers = [c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c]
        if not any(shutil.which(c) for c in compilers):
            return f"no C++ compiler ({', '.join(compilers)}) on PATH"
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is not installed"
    else:
        return f"compiled steps are for cpu and cuda, not {device.type}"
    return None


def _make_static(cache: KVCache, masks: "_Masks", device: torch.device) -> tuple:
    """Switch a prefilled cache to compiled decoding: returns the compiled step and the (B, max_len) mask it reads."""
    cache.make_static()
    return _compiled_step(device), masks.static_valid(cache.max_len)


def _next_logits(model: JanusModel, embeds: torch.Tensor, masks: "_Masks", cache: KVCache, head: str,
                 static: tuple | None) -> torch.Tensor:
    """Logits (B, V) of `head` after one new token a row (embeds (B, 1, D)): the compiled step over the static cache
    when `static` (from `_make_static`) is given, else the eager decoder over the growing cache."""
    if static is not None:
        step, valid = static
        logits = step(model, embeds, masks.next_pos, valid, cache, head)
        masks.next_pos = masks.next_pos + 1
        return logits
    mask, pos = masks.step(cache.length)
    return _head(model, model.decoder(embeds, positions=pos, cache=cache, mask=mask)[:, -1], head)


def _cache_len(length: int, compiled: bool) -> int:
    return -(-length // _STATIC_ROUND) * _STATIC_ROUND if compiled else length


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

    def static_valid(self, max_len: int) -> torch.Tensor:
        """(B, max_len) bool over a static cache: the real prompt tokens and every position generated."""
        valid = self.full.new_zeros(self.full.shape[0], max_len, dtype=torch.bool)
        valid[:, : self.full.shape[1]] = self.full.bool()
        return valid


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
    compiled: bool = False,
) -> torch.Tensor:
    """Sample `n` images per prompt with CFG. Returns VQ codes (len(cond_ids) * n, num_tokens), prompt-major.

    The P conditional and P unconditional prompts are prefilled once; the cache is then repeated to n rows
    per prompt, giving the doubled batch of 2 * P * n rows that `cfg_merge` expects (conditional rows first).
    `compiled`: the decode steps run compiled at fixed shapes (module docstring).
    """
    P = len(cond_ids)
    num_tokens = num_tokens or model.config.image_tokens_per_image
    table = model.decoder.embed_tokens.weight  # never quantized: its device and dtype are the model's
    device, dtype = table.device, table.dtype
    ids, attn = left_pad(list(cond_ids) + list(uncond_ids), pad_id)  # (2P, T)
    ids, attn = ids.to(device), attn.to(device)
    masks = _Masks(attn, num_tokens)
    cache = KVCache(model.config.llm, 2 * P, _cache_len(ids.shape[1] + num_tokens, compiled), device=device,
                    dtype=dtype)
    hidden = model.decoder(model.embed(ids), positions=masks.prompt_positions, cache=cache, mask=masks.prompt_mask(),
                           last_only=True)
    if n > 1:
        # Row r of the doubled batch: half h (cond/uncond), prompt p, sample s -> prefill row h * P + p.
        rows = torch.arange(2 * P, device=device).repeat_interleave(n)
        cache.reorder(rows)
        hidden = hidden[rows]
        masks.full, masks.next_pos = masks.full[rows], masks.next_pos[rows]
    static = _make_static(cache, masks, device) if compiled else None
    out = torch.empty((P * n, num_tokens), dtype=torch.long, device=device)
    logits = _head(model, hidden[:, -1], "image")  # (2R, V)
    for i in range(num_tokens):
        tok = sample(cfg_merge(logits, cfg_weight, cfg_cutoff), temperature, top_k, top_p, generator)  # (R,)
        out[:, i] = tok
        if on_step is not None:
            on_step(i + 1, num_tokens)
        if i + 1 == num_tokens:
            break
        embeds = model.embed_image_codes(torch.cat([tok, tok]))[:, None]  # (2R, 1, D)
        logits = _next_logits(model, embeds, masks, cache, "image", static)
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
    compiled: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), finished (B,) bool) per step for a left-padded batch of prompt embeddings (B, T, D).

    A row is finished after it produced `eos_id` (which is yielded); finished rows keep producing `eos_id`.
    Stops when every row is finished or after `max_new_tokens`. `compiled`: as for images (module docstring).
    """
    B, T, _ = embeds.shape
    device = embeds.device
    attention_mask = attention_mask.to(device)
    masks = _Masks(attention_mask, max_new_tokens)
    cache = KVCache(model.config.llm, B, _cache_len(T + max_new_tokens, compiled), device=device, dtype=embeds.dtype)
    hidden = model.decoder(embeds, positions=masks.prompt_positions, cache=cache, mask=masks.prompt_mask(),
                           last_only=True)
    static = _make_static(cache, masks, device) if compiled else None
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    logits = _head(model, hidden[:, -1], "text")  # (B, V)
    for i in range(max_new_tokens):
        tok = sample(logits, temperature, top_k, top_p, generator)
        tok = torch.where(finished, torch.full_like(tok, eos_id), tok)
        finished = finished | (tok == eos_id)
        yield tok, finished
        if bool(finished.all()) or i + 1 == max_new_tokens:
            return
        logits = _next_logits(model, model.decoder.embed_tokens(tok)[:, None], masks, cache, "text", static)
