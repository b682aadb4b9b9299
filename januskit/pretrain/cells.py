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


def code_contents(codes: torch.Tensor, labels: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """What each VQ code holds: codes (N, GRID * GRID) of N labelled scenes' images, labels (N, 3, GRID, GRID) ->
    (codebook_size,) long, the content index most of a code's cells hold, -1 for a code no cell chose."""
    content = content_index(labels).flatten()  # (N * GRID * GRID,), raster order like the codes
    codes = codes.flatten()
    if len(codes) != len(content):
        raise ValueError(f"code_contents: {len(codes)} codes for {len(content)} labelled cells")
    out = torch.full((codebook_size,), -1, dtype=torch.long)
    for code in codes.unique().tolist():
        out[code] = int(content[codes == code].mode().values)
    return out


def factored_head(contents: torch.Tensor, width: int, seed: int = 0, unused_bias: float = -30.0):
    """The last layer of the image head with a logit that is a sum over a code's attributes: weight row c =
    u_shape(c) + u_colour(c) + u_size(c) for random unit vectors u, one per attribute value (with "empty" as a
    value of each), bias 0, and `unused_bias` for codes that hold nothing (-1 in `contents`).

    Frozen through training, it makes the image distribution of a cell a product of one distribution per attribute
    over the codes that exist: the logit of a code no training sample asks for (the held-out pair) is still the
    sum of what the hidden state says about its shape, its colour and its size, each learnt from other codes. With
    14 attribute values in `width` >= 14 dimensions nothing is lost: the trainable layer before it can still put
    any score on each value. Returns (weight (codebook_size, width), bias (codebook_size,))."""
    if width < sum(HEADS):
        raise ValueError(f"factored_head: width {width} below the {sum(HEADS)} attribute values")
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(width, sum(HEADS), generator=g)).Q.t()  # (values, width), orthonormal rows
    offsets = torch.tensor([0, HEADS[0], HEADS[0] + HEADS[1]])
    weight = torch.zeros(len(contents), width)
    bias = torch.full((len(contents),), unused_bias)
    for code, c in enumerate(contents.tolist()):
        if c < 0:
            continue
        values = torch.tensor([c // (HEADS[1] * HEADS[2]), c // HEADS[2] % HEADS[1], c % HEADS[2]])  # shape, colour, size
        weight[code] = basis[values + offsets].sum(0)
        bias[code] = 0.0
    return weight, bias
