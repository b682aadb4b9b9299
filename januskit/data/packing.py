"""Packing samples into the rows of a `Batch`.

Rows are filled first-fit-decreasing: samples are placed longest first, each into the first row with room.
Every sample keeps its own document id and RoPE positions (restarting at 0), so with `document_mask(doc_ids)`
a packed row computes exactly what the samples would compute one per row. Targets are already shifted in the
`Sample`, so packing is concatenation and no target crosses a sample boundary.
"""

from __future__ import annotations

import torch

from .sample import GROUPS, IGNORE, Batch, Sample


def _rows(samples: list[Sample], max_len: int, packing: bool) -> list[list[int]]:
    """Sample indices per row, in the order they sit in the row."""
    for i, s in enumerate(samples):
        if len(s) > max_len:
            raise ValueError(f"sample {i} ({s.kind}) has {len(s)} tokens, more than max_len={max_len}")
    if not packing:
        # Longest first (stable), so consecutive rows, and so each micro-batch, hold samples of similar length.
        return [[i] for i in sorted(range(len(samples)), key=lambda i: -len(samples[i]))]
    rows: list[list[int]] = []
    room: list[int] = []
    # Stable sort: equal lengths keep their input order, so the layout is a function of the inputs only.
    for i in sorted(range(len(samples)), key=lambda i: -len(samples[i])):
        n = len(samples[i])
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_len - n)
    return rows


def pack(samples: list[Sample], max_len: int, pad_id: int, packing: bool = True, pad_to_max: bool = False) -> Batch:
    """Samples -> a `Batch` of rows of at most `max_len` tokens.

    `packing=True` fills rows first-fit-decreasing; `packing=False` puts one sample per row, longest first. Rows are
    right-padded to the longest row, or to `max_len` with `pad_to_max` (fixed shapes for compiled steps).
    `pixel_values` are concatenated in row-major order of the understanding-image blocks, the order in which
    `JanusModel.embed` consumes them. A sample longer than `max_len` is an error: builders reject those.
    """
    if not samples:
        raise ValueError("pack() needs at least one sample")
    rows = _rows(samples, max_len, packing)
    T = max_len if pad_to_max else max(sum(len(samples[i]) for i in row) for row in rows)
    B = len(rows)

    def full(value, dtype=torch.long):
        return torch.full((B, T), value, dtype=dtype)

    input_ids, text_targets, image_targets = full(pad_id), full(IGNORE), full(IGNORE)
    und_mask, gen_codes = full(False, torch.bool), full(-1)
    doc_ids, positions, group_ids = full(-1), full(0), full(-1)
    pixels, kinds = [], []
    for r, row in enumerate(rows):
        t = 0
        for d, i in enumerate(row):
            s = samples[i]
            n = len(s)
            span = slice(t, t + n)
            input_ids[r, span] = s.input_ids
            text_targets[r, span] = s.text_targets
            image_targets[r, span] = s.image_targets
            und_mask[r, span] = s.und_mask
            gen_codes[r, span] = s.gen_codes
            doc_ids[r, span] = d
            positions[r, span] = torch.arange(n)
            group_ids[r, span] = GROUPS.index(s.group)
            if s.pixel_values.shape[0]:
                pixels.append(s.pixel_values)
            kinds.append(s.kind)
            t += n
    if pixels:
        pixel_values = torch.cat(pixels)
    else:  # keep the image shape of the batch's samples so that `.to(dtype)` and concatenation still work
        pixel_values = samples[0].pixel_values.new_zeros((0, *samples[0].pixel_values.shape[1:]))
    return Batch(input_ids, text_targets, image_targets, und_mask, gen_codes, pixel_values, doc_ids, positions,
                 group_ids, kinds)


def loss_token_count(batch: Batch, group: str | None = None) -> int:
    """Tokens that take a loss (text and image heads), optionally only those of one group.

    The trainer divides the summed loss by this count, summed over micro-batches and ranks, so that every
    loss token weighs the same however the samples were packed.
    """
    text = batch.text_targets != IGNORE
    image = batch.image_targets != IGNORE
    if group is not None:
        mine = batch.group_ids == GROUPS.index(group)
        text, image = text & mine, image & mine
    return int(text.sum() + image.sum())
