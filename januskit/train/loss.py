"""The training forward: a packed `Batch` in, summed next-token losses of both heads out.

Losses are returned as SUMS with their token counts, never as means: the loop divides by the number of loss
tokens of the whole optimizer step (all micro-batches, all ranks), so accumulation and data parallelism give
exactly the gradient of one big batch. Packed samples are kept apart by `document_mask` and per-sample RoPE
positions. The heads run only on the positions that take a loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.sample import GROUPS, IGNORE, Batch
from ..llama import document_mask

BATCH_FIELDS = ("input_ids", "und_mask", "pixel_values", "gen_codes", "doc_ids", "positions", "text_targets",
                "image_targets", "group_ids")


@dataclass
class LossSums:
    loss: torch.Tensor  # () sum of text and image cross-entropy over every loss token; carries the graph
    group_loss: torch.Tensor  # (len(GROUPS),) detached per-group sums
    group_tokens: torch.Tensor  # (len(GROUPS),) loss tokens per group


class TrainForward(nn.Module):
    """Wraps a JanusModel so that one `forward` call covers the whole training computation.

    DDP and FSDP attach to `forward`, so everything that touches parameters (embedding, vision encoder,
    adaptors, decoder, both heads) happens inside it. Every path runs on every micro-batch, on zero rows when
    the micro-batch has no image, no VQ code or no target for it: all ranks then produce gradients for the same
    parameters, which FSDP (one reduce-scatter per parameter group) and DDP (no unused-parameter search) need.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, und_mask, pixel_values, gen_codes, doc_ids, positions, text_targets,
                image_targets, group_ids):
        """All (B, T) except pixel_values (N, 3, S, S). Returns (loss (), group_loss (G,), group_tokens (G,))."""
        model = self.model
        features = model.image_features(pixel_values.to(model.decoder.embed_tokens.weight.dtype))  # (N, n_img, D)
        embeds = model.embed(input_ids, und_mask, image_features=features, gen_codes=gen_codes)  # (B, T, D)
        # Rows of one sample each (right-padded) need only the causal mask: SDPA's fast is_causal path.
        mask = document_mask(doc_ids) if bool((doc_ids > 0).any()) else None
        hidden = model.decoder(embeds, positions=positions, mask=mask)  # (B, T, D)

        text_sel = text_targets != IGNORE
        image_sel = image_targets != IGNORE
        text_logits = model.language_model.lm_head(hidden[text_sel])  # (n_text, vocab)
        image_logits = model.gen_head(hidden[image_sel])  # (n_image, codebook)
        text_ce = F.cross_entropy(text_logits.float(), text_targets[text_sel], reduction="none")
        image_ce = F.cross_entropy(image_logits.float(), image_targets[image_sel], reduction="none")
        loss = text_ce.sum() + image_ce.sum()
        # Paths that `embed` skipped (no image positions, no codes) join the graph as exact zeros.
        idle = []
        if not bool(und_mask.any()):
            idle.append(features)
        if not bool((gen_codes >= 0).any()):
            idle.append(model.embed_image_codes(gen_codes.new_zeros(0)))  # (0, D)
        if idle:
            loss = loss + sum(t.sum() for t in idle) * 0.0

        G = len(GROUPS)
        groups = torch.cat([group_ids[text_sel], group_ids[image_sel]])  # (n_text + n_image,)
        per_token = torch.cat([text_ce, image_ce]).detach()
        group_loss = torch.zeros(G, device=loss.device).index_add_(0, groups, per_token)
        group_tokens = torch.zeros(G, device=loss.device).index_add_(0, groups, torch.ones_like(per_token))
        return loss, group_loss, group_tokens


def batch_inputs(batch: Batch) -> tuple[torch.Tensor, ...]:
    """The tensors of a Batch in `TrainForward.forward` order."""
    return tuple(getattr(batch, f) for f in BATCH_FIELDS)


def loss_sums(forward: nn.Module, batch: Batch) -> LossSums:
    """Run `forward` (a TrainForward, possibly wrapped by DDP/FSDP) on a batch and name the results."""
    return LossSums(*forward(*batch_inputs(batch)))
