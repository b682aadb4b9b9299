"""VQ codes of the images a model learns to generate: encoded on the fly, or read from a precomputed cache.

The VQ tokenizer is frozen in every Janus stage, so a generation image always maps to the same codes; a cache
made once by `januskit prepare-codes` saves the encoder forward in every epoch. A cache directory holds
`codes-00000.npy`, ... (uint16 rows of codes, int32 when a code exceeds 65535) and `index.json`: the image keys
(paths relative to the cache root; `<shard>/<member>` for images inside tar shards) with their shard and row,
the images that could not be read, and a fingerprint of the VQ weights and resolution, so that codes of another
VQ are an error instead of silent garbage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np
import torch
from torch import nn

from .builders import generation_image_names, open_image
from .sources import BrokenRecord, DataError, ImageRef, JsonlSource, WebDatasetSource, image_ref

INDEX = "index.json"
VERSION = 1


class CodeSource(Protocol):
    def codes_for(self, image: ImageRef) -> torch.Tensor:
        """The VQ codes (n,) long of one generation image; `BrokenRecord` when there are none."""
        ...


def vq_fingerprint(vq_model: nn.Module, image_size: int) -> str:
    """Hash of the VQ weights (exact bytes, in their dtype) and the resolution images are encoded at."""
    h = hashlib.sha256(f"januskit-vq:{image_size}".encode())
    for name, t in sorted(vq_model.state_dict().items()):
        if name.endswith("codebook_used"):  # usage statistics, not weights
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _as_ref(image: ImageRef | str | os.PathLike) -> ImageRef:
    return image if isinstance(image, ImageRef) else ImageRef(Path(image))


class OnTheFlyCodes:
    """Encodes each generation image with the frozen VQ encoder when it is needed (no grad)."""

    def __init__(self, vq_model: nn.Module, processor, image_size: int, device=None):
        self.vq, self.processor, self.image_size = vq_model.eval(), processor, int(image_size)
        param = next(vq_model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self.dtype = param.dtype

    @torch.no_grad()
    def encode(self, pils: list) -> torch.Tensor:
        """PIL images -> codes (B, n) long."""
        pixels = torch.stack([self.processor.generation_transform(p, self.image_size) for p in pils])  # (B, 3, G, G)
        return self.vq.encode(pixels.to(self.device, self.dtype)).long().cpu()

    def codes_for(self, image: ImageRef) -> torch.Tensor:
        return self.encode([open_image(_as_ref(image))])[0]


def cache_key(path: Path, root: Path) -> str:
    """`path` relative to `root`, both with symlinks resolved (a dataset reached through a link has the same keys)."""
    return Path(os.path.relpath(os.path.realpath(path), os.path.realpath(root))).as_posix()


class CodeCache:
    """Codes precomputed by `prepare_codes`. With `fingerprint` (of the VQ the model uses, `vq_fingerprint`) a
    cache made by another VQ or resolution is an error. `root` overrides the recorded dataset root, for a
    dataset that moved since the cache was made. Without it an image is looked up under the dataset root as seen
    from the cache directory (so a run directory copied with its data and cache finds its own images), then under
    the recorded absolute root."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str | None = None,
                 root: str | os.PathLike | None = None):
        self.directory = Path(directory)
        try:
            index = json.loads((self.directory / INDEX).read_text())
        except FileNotFoundError:
            raise DataError(f"{self.directory}: not a code cache ({INDEX} missing; make one with "
                            "`januskit prepare-codes`)") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{self.directory / INDEX}: unreadable ({e})") from None
        if index.get("version") != VERSION:
            raise DataError(f"{self.directory}: code cache version {index.get('version')}, expected {VERSION}")
        if fingerprint is not None and index["fingerprint"] != fingerprint:
            raise DataError(
                f"{self.directory}: stale code cache: it was made with VQ {index['fingerprint']} at "
                f"{index['image_size']}px, the model's VQ is {fingerprint}; run `januskit prepare-codes` again"
            )
        self.fingerprint, self.image_size = index["fingerprint"], index["image_size"]
        if root is not None:
            self.roots = [Path(root)]
        else:
            self.roots = [Path(index["root"])]
            beside = index.get("root_from_cache")
            beside = self.directory / beside if beside is not None else None
            # Moved with its data (the two roots differ): try the copy's own data first.
            if beside is not None and beside.is_dir() and os.path.realpath(beside) != os.path.realpath(self.roots[0]):
                self.roots.insert(0, beside)
        self._entries: dict[str, list[int]] = index["entries"]
        self._broken: dict[str, str] = index["broken"]
        self._shards = [np.load(self.directory / name, mmap_mode="r") for name in index["shards"]]

    def __len__(self) -> int:
        return len(self._entries)

    def codes_for(self, image: ImageRef) -> torch.Tensor:
        path = _as_ref(image).path
        for root in self.roots:
            key = cache_key(path, root)
            if key in self._entries or key in self._broken:
                break
        hit = self._entries.get(key)
        if hit is None:
            if key in self._broken:
                raise BrokenRecord("bad image", f"{key}: {self._broken[key]} (when the cache was made)")
            roots = " or ".join(str(r) for r in self.roots)
            raise BrokenRecord("no codes", f"{path} is not in the code cache {self.directory} (looked up relative to "
                               f"{roots}; for images added since, or data copied elsewhere without its cache, run "
                               "`januskit prepare-codes` again)")
        shard, row = hit
        return torch.from_numpy(self._shards[shard][row].astype(np.int64))


def _records(manifests: Iterable, shards: Iterable) -> Iterable[tuple[dict, object]]:
    """Every record of the manifests and shard sets once (epoch 0 order)."""
    sources = [JsonlSource(m) for m in manifests] + [WebDatasetSource(s) for s in shards]
    for src in sources:
        for k in range(len(src)):
            try:
                yield src.record(k)
            except BrokenRecord:
                continue


def prepare_codes(manifests: Iterable[str | os.PathLike], vq_model: nn.Module, processor,
                  out_dir: str | os.PathLike, batch_size: int = 32, image_size: int | None = None,
                  shards: Iterable = (), root: str | os.PathLike | None = None, rows_per_file: int = 1 << 16,
                  device=None) -> dict:
    """Encode every generation image named by the JSONL `manifests` (and webdataset `shards` sets) into a cache
    in `out_dir`. Keys are image paths relative to `root` (default: the common directory of the inputs).
    Images that cannot be read are recorded as broken, not fatal. Returns a summary."""
    manifests, shards = [Path(m) for m in manifests], list(shards)
    if image_size is None:
        image_size = vq_model.cfg.image_size
    if root is None:
        dirs = [os.path.abspath(m.parent) for m in manifests]
        dirs += [os.path.abspath(os.path.dirname(str(s if isinstance(s, str) else s[0]))) for s in shards]
        if not dirs:
            raise DataError("prepare_codes: no manifests or shards given")
        root = os.path.commonpath(dirs)
    root = Path(root)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = OnTheFlyCodes(vq_model, processor, image_size, device=device)

    entries: dict[str, list[int]] = {}
    broken: dict[str, str] = {}
    files: list[str] = []
    rows: list[np.ndarray] = []
    pending: list[tuple[str, object]] = []

    def flush_file():
        if rows:
            codes = np.stack(rows)
            codes = codes.astype(np.uint16 if codes.max() < 1 << 16 else np.int32)
            name = f"codes-{len(files):05d}.npy"
            np.save(out_dir / name, codes)
            files.append(name)
            rows.clear()

    def flush_batch():
        if pending:
            codes = encoder.encode([pil for _, pil in pending]).numpy()
            for (key, _), c in zip(pending, codes):
                entries[key] = [len(files), len(rows)]
                rows.append(c)
                if len(rows) == rows_per_file:
                    flush_file()
            pending.clear()

    for record, base in _records(manifests, shards):
        for name in generation_image_names(record):
            try:
                ref = image_ref(base, name)
            except BrokenRecord:
                continue
            key = cache_key(ref.path, root)
            if key in entries or key in broken or any(k == key for k, _ in pending):
                continue
            try:
                pending.append((key, open_image(ref)))
            except BrokenRecord as e:
                broken[key] = f"{e.reason}: {e.detail}"
            if len(pending) == batch_size:
                flush_batch()
    flush_batch()
    flush_file()
    try:
        beside = cache_key(root, out_dir)
    except ValueError:  # no relative path between them (Windows drives): the absolute root only
        beside = None
    index = {"version": VERSION, "fingerprint": vq_fingerprint(vq_model, image_size), "image_size": image_size,
             "root": str(root.resolve()), "root_from_cache": beside, "shards": files,
             "entries": entries, "broken": broken}
    tmp = out_dir / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index))
    tmp.replace(out_dir / INDEX)
    return {"images": len(entries), "broken": len(broken), "files": len(files), "out": str(out_dir)}


# ---------------------------------------------------------------------------------------------- command
def add_cli(subparsers) -> None:
    p = subparsers.add_parser("prepare-codes", help="precompute the VQ codes of the generation images of manifests")
    p.add_argument("manifests", nargs="*", help="JSONL manifests")
    p.add_argument("--shards", action="append", default=[], help="webdataset tar shards (glob or {000..009} range; "
                                                                  "repeatable)")
    p.add_argument("--model", required=True, help="checkpoint directory whose VQ encoder and processor to use")
    p.add_argument("--out", required=True, help="output cache directory")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--root", default=None, help="directory the image keys are relative to (default: common "
                                                "directory of the inputs)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run_prepare_codes)


def run_prepare_codes(args: argparse.Namespace) -> int:
    from ..config import JanusConfig
    from ..processor import JanusProcessor
    from ..vq import VQModel
    from ..weights import load_into, read_state_dict

    if not args.manifests and not args.shards:
        raise DataError("prepare-codes: give JSONL manifests and/or --shards")
    directory = Path(args.model)
    config = JanusConfig.from_file(directory / "config.json")
    prefix = "gen_vision_model."
    sd = {k[len(prefix):]: v for k, v in read_state_dict(directory).items() if k.startswith(prefix)}
    with torch.device("meta"):
        vq = VQModel(config.vq)
    sd.setdefault("quantize.codebook_used", torch.zeros(vq.quantize.codebook_used.shape))  # optional in checkpoints
    load_into(vq, sd, device=args.device, source=str(directory))
    processor = JanusProcessor.from_pretrained(directory, num_image_tokens=config.num_image_tokens)
    summary = prepare_codes(args.manifests, vq, processor, args.out, batch_size=args.batch_size,
                            image_size=config.vq.image_size, shards=args.shards, root=args.root, device=args.device)
    print(json.dumps(summary))
    return 0
