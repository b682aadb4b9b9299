"""The training sample and the packed batch: the contract between the data side and the trainer.

Targets are stored already shifted: `text_targets[t]` is the token that position t must predict with the text
head, `image_targets[t]` the VQ code it must predict with the image head (-100: no loss). Shifting at build time
means packing is plain concatenation and no target ever crosses a sample boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE = -100
GROUPS = ("understanding", "text", "generation")


@dataclass
class Sample:
    """One tokenized sample of any kind, length T."""

    input_ids: torch.Tensor  # (T,) long; at VQ-code input positions any id (the embedding comes from gen_codes)
    text_targets: torch.Tensor  # (T,) long, IGNORE where the text head takes no loss
    image_targets: torch.Tensor  # (T,) long, IGNORE where the image head takes no loss
    und_mask: torch.Tensor  # (T,) bool, positions that receive understanding-encoder features
    gen_codes: torch.Tensor  # (T,) long, the VQ code fed as input at t, -1 where none
    pixel_values: torch.Tensor  # (N, 3, S, S) understanding images in order of appearance (N may be 0)
    group: str = "understanding"  # one of GROUPS, for the mixture and per-group loss
    kind: str = ""  # the record kind it came from, for reports

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return int((self.text_targets != IGNORE).sum() + (self.image_targets != IGNORE).sum())


@dataclass
class Batch:
    """Samples packed into rows of a fixed length; attention and positions restart at every sample."""

    input_ids: torch.Tensor  # (B, T)
    text_targets: torch.Tensor  # (B, T)
    image_targets: torch.Tensor  # (B, T)
    und_mask: torch.Tensor  # (B, T) bool
    gen_codes: torch.Tensor  # (B, T) long, -1 where none
    pixel_values: torch.Tensor  # (N, 3, S, S), row-major order of und_mask blocks
    doc_ids: torch.Tensor  # (B, T) long, sample index within the row, -1 for padding
    positions: torch.Tensor  # (B, T) long, RoPE position within its sample
    group_ids: torch.Tensor  # (B, T) long, index into GROUPS of the sample a token belongs to (-1 padding)
    kinds: list[str] = field(default_factory=list)

    def to(self, device, dtype=None) -> "Batch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        if dtype is not None:
            moved["pixel_values"] = moved["pixel_values"].to(dtype)
        return Batch(**moved)

    @property
    def num_loss_tokens(self) -> int:
        return int((self.text_targets != IGNORE).sum() + (self.image_targets != IGNORE).sum())
