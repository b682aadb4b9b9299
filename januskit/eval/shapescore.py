"""A deterministic scorer for the shapes world: reads shapes, colours, sizes and positions back from pixels.

Pixels are classified to the nearest palette colour (or background) within a distance threshold, connected
components of one colour become objects, and each object's shape follows from how much of its bounding box it
fills (square ~1, circle ~pi/4, triangle ~1/2). `check_prompt` applies GenEval's rules to a prompt spec.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..data.world import COLORS, REF, RELATIONS, SIZES

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


def _labels(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean mask (union-find over runs; fine for small images)."""
    H, W = mask.shape
    lab = np.zeros((H, W), dtype=np.int32)
    parent = [0]

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for y in range(H):
        row = mask[y]
        for x in range(W):
            if not row[x]:
                continue
            up = lab[y - 1, x] if y else 0
            left = lab[y, x - 1] if x else 0
            if up and left:
                ra, rb = find(up), find(left)
                lab[y, x] = min(ra, rb)
                parent[max(ra, rb)] = min(ra, rb)
            elif up or left:
                lab[y, x] = up or left
            else:
                parent.append(len(parent))
                lab[y, x] = len(parent) - 1
    roots = np.array([find(i) for i in range(len(parent))], dtype=np.int32)
    return roots[lab], len(parent) - 1


def detect(image, min_area_frac: float = 0.006) -> list[Detection]:
    """Objects in an image (PIL or HxWx3 uint8 array), sorted top-to-bottom, left-to-right."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    H, W, _ = arr.shape
    d = np.linalg.norm(arr[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, 6)
    nearest = d.argmin(-1)
    bg = np.linalg.norm(arr - 255.0, axis=-1)
    is_obj = d.min(-1) < np.minimum(bg, 90.0)
    scale = REF / W
    out = []
    for ci, name in enumerate(_NAMES):
        mask = is_obj & (nearest == ci)
        if not mask.any():
            continue
        lab, _ = _labels(mask)
        for k in np.unique(lab[mask]):
            ys, xs = np.nonzero(lab == k)
            area = len(xs)
            if area < min_area_frac * H * W:
                continue
            x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
            bw, bh = x1 - x0 + 1, y1 - y0 + 1
            fill = area / (bw * bh)
            shape = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"
            extent = max(bw, bh) * scale
            size = "large" if extent > (SIZES["small"] + SIZES["large"]) / 2 else "small"
            center = ((x0 + x1 + 1) / 2 * scale, (y0 + y1 + 1) / 2 * scale)
            out.append(Detection(shape, name, size, center, (int(x0), int(y0), int(x1), int(y1)), area))
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
