"""Pure sampling functions: logits in, token ids out. Randomness only through an explicit torch.Generator."""

from __future__ import annotations

import math

import torch


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k and outside the smallest set with probability >= top_p."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first token always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 means greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return draw(logits.softmax(dim=-1), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs (B, V) by inverting the cumulative distribution with one uniform per row.

    Exact categorical sampling like torch.multinomial, ~15x cheaper on the CPU for an image step's 16384 codes
    (multinomial draws V exponentials a row: ~2 ms for 4 rows, a few percent of a decode step). A token of zero
    probability is never drawn: searchsorted(right=True) returns the first index whose cumulative sum exceeds u."""
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max_(probs.shape[-1] - 1).squeeze(-1)


def cfg_merge(logits: torch.Tensor, weight: float, cutoff: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance over a doubled batch.

    Row layout (the only place that knows it): logits (2R, V) hold the R conditional rows first and then the
    R unconditional rows in the same order; returns uncond + weight * (cond - uncond), shape (R, V).

    `cutoff` > 0 excludes (-inf) every token whose conditional probability is below `cutoff` times that of the
    conditional row's most likely token, before guidance picks among the rest. Guidance scales a token's
    probability by (p_cond / p_uncond) ** (weight - 1): where the unconditional row is confident, a token the
    prompt leaves merely unlikely (1e-3 against 1e-6) is boosted by orders of magnitude and can win the step.
    0 (the official Janus decoding) keeps every token.
    """
    cond, uncond = logits.float().chunk(2, dim=0)
    merged = uncond + weight * (cond - uncond)
    if cutoff > 0:
        implausible = cond - cond.amax(dim=-1, keepdim=True) < math.log(cutoff)
        merged = merged.masked_fill(implausible, float("-inf"))
    return merged
