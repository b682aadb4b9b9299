"""A deterministic scorer for the shapes world: reads shapes, colours, sizes and positions back from pixels.

Pixels are classified to the nearest palette colour (or background) within a distance threshold; each grid cell's
pixels of one colour become an object, and each object's shape follows from its top/bottom mass balance (triangles
point up) and how much of its bounding box it fills (square ~1, circle ~pi/4). `check_prompt` applies GenEval's
rules to a prompt spec.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..data.world import COLORS, GRID, REF, RELATIONS, SIZES

_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _NAMES], dtype=np.float32)  # (6, 3)


@dataclass
class Detection:
    shape: str
    color: str
    size: str
    center: tuple[float, float]  # in REF (64-px) coordinates
    bbox: tuple[int, int, int, int]
    area: int


def _shape(rows: np.ndarray, height: int, fill: float) -> str:
    """Triangles (apex up) carry most of their pixels in the lower half of their box; squares fill their box,
    circles ~pi/4 of it. The half-mass test survives blur at 8 px, where the fill ratios of a triangle and a
    circle meet."""
    mid = (height - 1) / 2
    top, bottom = (rows < mid).sum(), (rows > mid).sum()
    if top < 0.6 * bottom:
        return "triangle"
    return "square" if fill > 0.86 else "circle"


def detect(image, min_area: float = 10.0) -> list[Detection]:
    """Objects in an image (PIL or HxWx3 uint8 array, any multiple of the grid), sorted top-to-bottom,
    left-to-right.

    The world puts at most one shape in each grid cell, so each cell is read on its own: pixels nearer a palette
    colour than white (and within 90 of it) are object pixels; every colour with at least `min_area` pixels (in
    64-px units) in the cell is an object (a cell with two colours gives two objects, so a smeared generation
    fails a count instead of passing). Shape follows from how much of its bounding box the object fills
    and how its pixels split between the top and bottom halves (see `_shape`); size from its extent.
    """
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    H, W, _ = arr.shape
    if H != W or H % GRID:
        raise ValueError(f"detect: expected a square image whose side is a multiple of {GRID}, got {W}x{H}")
    d = np.linalg.norm(arr[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, 6)
    nearest = d.argmin(-1)
    bg = np.linalg.norm(arr - 255.0, axis=-1)
    is_obj = d.min(-1) < np.minimum(bg, 90.0)
    scale = REF / W
    cs = H // GRID
    need = min_area / scale ** 2
    out = []
    for r in range(GRID):
        for c in range(GRID):
            sl = (slice(r * cs, (r + 1) * cs), slice(c * cs, (c + 1) * cs))
            cell_obj, cell_near = is_obj[sl], nearest[sl]
            for ci in np.unique(cell_near[cell_obj]):
                ys, xs = np.nonzero(cell_obj & (cell_near == ci))
                area = len(xs)
                if area < need:
                    continue
                x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
                bw, bh = x1 - x0 + 1, y1 - y0 + 1
                shape = _shape(ys - y0, bh, area / (bw * bh))
                extent = max(bw, bh) * scale
                size = "large" if extent > (SIZES["small"] + SIZES["large"]) / 2 else "small"
                x0, x1, y0, y1 = x0 + c * cs, x1 + c * cs, y0 + r * cs, y1 + r * cs
                center = ((x0 + x1 + 1) / 2 * scale, (y0 + y1 + 1) / 2 * scale)
                out.append(Detection(shape, _NAMES[ci], size, center, (int(x0), int(y0), int(x1), int(y1)), area))
    return sorted(out, key=lambda o: (round(o.center[1] / 8), o.center[0]))


def _matches(det: Detection, want: dict) -> bool:
    return det.shape == want["shape"] and (want.get("color") is None or det.color == want["color"])


def _holds(a: Detection, rel: str, b: Detection, margin: float = 3) -> bool:
    (ax, ay), (bx, by) = a.center, b.center
    return {"above": ay < by - margin, "below": ay > by + margin,
            "to the left of": ax < bx - margin, "to the right of": ax > bx + margin}[rel]


def check_prompt(spec: dict, dets: list[Detection]) -> bool:
    """GenEval rules: every required object is present (exactly `count` of them when count > 1, at least one
    otherwise); colours as required; a relation must hold between some pair of matching objects."""
    groups = []
    for want in spec["objects"]:
        found = [d for d in dets if _matches(d, want)]
        if want["count"] > 1:
            same_shape = [d for d in dets if d.shape == want["shape"]]
            if len(found) != want["count"] or len(same_shape) != want["count"]:
                return False
        elif not found:
            return False
        groups.append(found)
    rel = spec.get("relation")
    if rel:
        return any(_holds(a, rel["rel"], b) for a in groups[rel["a"]] for b in groups[rel["b"]] if a is not b)
    return True


def answer(question: str, dets: list[Detection]) -> str:
    """Answer a world VQA question from detections (validates ground truth and bounds a model's accuracy)."""
    q = question.rstrip("?").lower()
    words = q.split()
    if q.startswith("how many shapes"):
        return str(len(dets))
    if q.startswith("how many"):
        shape = words[2].rstrip("s")
        return str(sum(d.shape == shape for d in dets))
    if q.startswith("what color is the"):
        shape = words[-1]
        found = [d for d in dets if d.shape == shape]
        return found[0].color if found else "none"
    if q.startswith("what shape is the"):
        color = words[4]
        found = [d for d in dets if d.color == color]
        return found[0].shape if found else "none"
    if q.startswith("is there"):
        color, shape = words[3], words[4]
        return "yes" if any(d.color == color and d.shape == shape for d in dets) else "no"
    if q.startswith("is the"):
        rest = q[len("is the "):]
        for rel in RELATIONS:
            if f" {rel} the " in rest:
                a, b = rest.split(f" {rel} the ")
                ca, sa = a.split()
                cb, sb = b.split()
                A = [d for d in dets if d.color == ca and d.shape == sa]
                B = [d for d in dets if d.color == cb and d.shape == sb]
                return "yes" if A and B and _holds(A[0], rel, B[0]) else "no"
    raise ValueError(f"unknown question form: {question!r}")
