"""Packing: first-fit-decreasing rows, per-sample doc ids and positions, padding, image order, loss counts."""

import pytest
import torch

from januskit.data.packing import loss_token_count, pack
from januskit.data.sample import GROUPS, IGNORE, Sample

PAD = 99


def make(n: int, tag: int, group: str = "text", images: int = 0, kind: str = "text") -> Sample:
    """A sample of length n whose ids are tag*100 + position; `images` 1-token image slots at its start."""
    ids = torch.arange(n) + 100 * tag
    text_targets = torch.cat([ids[1:], torch.tensor([IGNORE])])
    image_targets = torch.full((n,), IGNORE)
    gen_codes = torch.full((n,), -1)
    if group == "generation":
        text_targets[:] = IGNORE
        gen_codes[1:] = torch.arange(n - 1) + 7
        image_targets[:-1] = gen_codes[1:]
        image_targets[-1] = IGNORE
    und = torch.zeros(n, dtype=torch.bool)
    und[1:1 + images] = True
    pixels = torch.full((images, 3, 2, 2), float(tag))
    return Sample(ids, text_targets, image_targets, und, gen_codes, pixels, group=group, kind=kind)


def unpack(batch):
    """Samples back out of a batch, keyed by their first id (which encodes the tag)."""
    out = {}
    for r in range(batch.input_ids.shape[0]):
        for d in batch.doc_ids[r].unique().tolist():
            if d < 0:
                continue
            m = batch.doc_ids[r] == d
            out[int(batch.input_ids[r][m][0]) // 100] = {
                "ids": batch.input_ids[r][m], "text": batch.text_targets[r][m], "image": batch.image_targets[r][m],
                "und": batch.und_mask[r][m], "codes": batch.gen_codes[r][m], "pos": batch.positions[r][m],
                "group": batch.group_ids[r][m],
            }
    return out


def test_first_fit_decreasing_layout():
    samples = [make(5, 1), make(3, 2), make(4, 3), make(2, 4)]
    b = pack(samples, max_len=8, pad_id=PAD)
    # longest first: 5 -> row 0, 4 -> row 1, 3 -> row 0 (fills it), 2 -> row 1
    assert b.input_ids.shape == (2, 8)
    assert b.input_ids[0].tolist() == [100, 101, 102, 103, 104, 200, 201, 202]
    assert b.input_ids[1].tolist() == [300, 301, 302, 303, 400, 401, PAD, PAD]
    assert b.doc_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, -1, -1]]
    assert b.positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 0]]
    assert b.text_targets[0].tolist() == [101, 102, 103, 104, IGNORE, 201, 202, IGNORE]
    assert b.text_targets[1, 6:].tolist() == [IGNORE, IGNORE] and b.image_targets[1, 6:].tolist() == [IGNORE] * 2
    assert b.group_ids[1].tolist() == [GROUPS.index("text")] * 6 + [-1, -1]
    assert b.gen_codes[1, 6:].tolist() == [-1, -1] and not b.und_mask[1, 6:].any()
    assert b.kinds == ["text"] * 4


def test_packed_rows_hold_the_samples_unchanged():
    samples = [make(5, 1, "understanding", images=2), make(3, 2), make(6, 3, "generation"), make(2, 4, images=1),
               make(7, 5, "understanding", images=3)]
    b = pack(samples, max_len=9, pad_id=PAD)
    got = unpack(b)
    assert sorted(got) == [1, 2, 3, 4, 5]
    for tag, s in zip([1, 2, 3, 4, 5], samples):
        g = got[tag]
        assert torch.equal(g["ids"], s.input_ids) and torch.equal(g["text"], s.text_targets)
        assert torch.equal(g["image"], s.image_targets) and torch.equal(g["und"], s.und_mask)
        assert torch.equal(g["codes"], s.gen_codes) and torch.equal(g["pos"], torch.arange(len(s)))
        assert (g["group"] == GROUPS.index(s.group)).all()
    assert (b.doc_ids >= 0).sum() == sum(len(s) for s in samples)
    assert b.input_ids.shape[1] <= 9


def test_pixel_values_follow_row_major_image_blocks():
    samples = [make(4, 1, images=1), make(6, 2, images=2), make(5, 3, images=1), make(3, 4)]
    b = pack(samples, max_len=10, pad_id=PAD)
    # the owner (tag) of every und position, in row-major order, must match the pixel tensors' tags in order
    owners = (b.input_ids[b.und_mask] // 100).tolist()
    assert b.pixel_values.shape == (4, 3, 2, 2)
    assert b.pixel_values[:, 0, 0, 0].tolist() == [float(t) for t in owners]


def test_unpacked_is_one_sample_per_row_right_padded():
    samples = [make(5, 1), make(3, 2), make(4, 3)]
    b = pack(samples, max_len=8, pad_id=PAD, packing=False)
    assert b.input_ids.shape == (3, 5)
    # longest first, so that consecutive rows (a micro-batch) hold similar lengths
    assert b.input_ids[1].tolist() == [300, 301, 302, 303, PAD]
    assert b.input_ids[2].tolist() == [200, 201, 202, PAD, PAD]
    assert b.doc_ids[2].tolist() == [0, 0, 0, -1, -1]
    assert b.positions[1].tolist() == [0, 1, 2, 3, 0]
    assert pack(samples, max_len=8, pad_id=PAD, packing=False, pad_to_max=True).input_ids.shape == (3, 8)


def test_no_images_keeps_an_empty_pixel_tensor():
    b = pack([make(3, 1)], max_len=4, pad_id=PAD)
    assert b.pixel_values.shape == (0, 3, 2, 2)


def test_too_long_sample_is_an_error():
    with pytest.raises(ValueError, match="max_len=4"):
        pack([make(5, 1)], max_len=4, pad_id=PAD)


def test_loss_token_count():
    samples = [make(5, 1, "understanding"), make(6, 2, "generation"), make(3, 3)]
    b = pack(samples, max_len=8, pad_id=PAD)
    assert loss_token_count(b) == sum(s.num_loss_tokens for s in samples) == 4 + 5 + 2
    assert loss_token_count(b, "generation") == 5
    assert loss_token_count(b, "understanding") == 4
    assert loss_token_count(pack(samples, 8, PAD, packing=False)) == loss_token_count(b)
