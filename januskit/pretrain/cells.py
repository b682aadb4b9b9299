"""Per-cell ground truth of a shapes-world scene, in the layout of a 4x4 grid of latents or patches: what the
semantic loss of the VQ and the linear probe of the understanding encoder read."""

from __future__ import annotations

import torch

from ..data.world import COLORS, GRID, SHAPES, SIZES, Scene, cell_of

_COLORS, _SIZES = list(COLORS), list(SIZES)
HEADS = (1 + len(SHAPES), 1 + len(_COLORS), 1 + len(_SIZES))  # classes per attribute; 0 = empty cell
ATTRIBUTES = ("shape", "color", "size")


def cell_labels(scene: Scene) -> torch.Tensor:
    """(3, GRID, GRID) long: shape, colour and size index of every cell, 0 where the cell is empty."""
    y = torch.zeros(3, GRID, GRID, dtype=torch.long)
    for o in scene.objects:
        r, c = cell_of(o.x, o.y)
        y[:, r, c] = torch.tensor([1 + SHAPES.index(o.shape), 1 + _COLORS.index(o.color), 1 + _SIZES.index(o.size)])
    return y


def content_index(labels: torch.Tensor) -> torch.Tensor:
    """(..., 3, h, w) label triples -> (..., h, w) one index per cell content (0 = empty), below prod(HEADS)."""
    return (labels[..., 0, :, :] * HEADS[1] + labels[..., 1, :, :]) * HEADS[2] + labels[..., 2, :, :]
