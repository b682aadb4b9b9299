"""Record sources: JSONL manifests and webdataset tar shards, as endless, seeded, resumable record streams.

A source is an indexed sequence of records with a per-epoch shuffle: `record(k)` is the k-th record of the
endless stream (epoch `k // len(source)`), the same on every rank. The mixture decides which rank reads which
`k`, so the data of a step does not depend on the number of ranks. Iterating a source directly yields this
(rank, DataLoader worker)'s share of the stream, with a resumable position.

Files are read by offset (`os.pread`), never loaded whole: a JSONL manifest is indexed by its line offsets, a
tar shard by its member headers (webdataset convention: members grouped by key, `KEY.json` holds the record,
the images it names are `KEY.png`, `KEY.jpg`, ...). Shards must be local, uncompressed tars.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import threading
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from torch.utils.data import get_worker_info


class DataError(ValueError):
    """A data configuration that cannot run (missing manifest, no shards, bad mixture); the message says which."""


class BrokenRecord(Exception):
    """A record to skip. `reason` is a short category for the counts, `detail` says what was wrong."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _pread(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        return f.read(size)


@dataclass(frozen=True)
class ImageRef:
    """One image a record names. `path` identifies it (messages, code-cache keys): a file, or `<shard>/<member>`
    for an image inside a tar shard, whose bytes then lie at `span` = (offset, size) in the file `shard`."""

    path: Path
    shard: Path | None = None
    span: tuple[int, int] | None = None

    def read(self) -> bytes:
        """The image file's bytes; `OSError` (`FileNotFoundError`) when it cannot be read."""
        if self.shard is None:
            return self.path.read_bytes()
        return _pread(self.shard, *self.span)


class TarMembers:
    """The files of one webdataset sample, by member name; what `image_ref` resolves image names against."""

    def __init__(self, shard: Path, key: str, members: dict[str, tuple[int, int]]):
        self.shard, self.key, self.members = shard, key, members  # key: folder/stem; members by file name

    def image(self, name: str) -> ImageRef:
        # Records name their images by member name ("0001.jpg") or by the part after the key ("jpg", "1.png").
        stem = os.path.basename(self.key)
        full = name if name in self.members else f"{stem}.{name.lstrip('.')}"
        if full not in self.members:
            raise BrokenRecord("missing image", f"{self.shard}: sample {self.key!r} has no member {name!r}")
        return ImageRef(self.shard / os.path.dirname(self.key) / full, self.shard, self.members[full])


def image_ref(base: Path | TarMembers, name: Any) -> ImageRef:
    """Resolve an image name of a record: relative to the manifest's directory, or a member of a tar sample."""
    if not isinstance(name, str) or not name:
        raise BrokenRecord("malformed", f"image must be a non-empty string, got {name!r}")
    if isinstance(base, TarMembers):
        return base.image(name)
    return ImageRef(Path(base) / name)


def _salt(name: str) -> int:
    return zlib.crc32(name.encode())


class _IndexedSource:
    """Shared by both sources: the endless shuffled order, sharded iteration, resume position, skip counts."""

    def __init__(self, name: str, seed: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise DataError(f"source {name!r}: rank {rank} is not in [0, {world_size})")
        self.name, self.seed, self.rank, self.world_size = name, int(seed), rank, world_size
        self.position = 0  # records of this iteration shard already consumed
        self._skipped: Counter = Counter()  # broken records met by `record()`
        self.unindexed: dict[str, int] = {}  # files left out of the index, by reason
        self._lock = threading.Lock()
        self._orders: dict[int, Any] = {}

    def __len__(self) -> int:
        raise NotImplementedError

    def _epoch_order(self, epoch: int):
        raise NotImplementedError

    def _read(self, order, i: int) -> tuple[dict, Path | TarMembers]:
        raise NotImplementedError

    def _order(self, epoch: int):
        with self._lock:
            order = self._orders.get(epoch)
            if order is None:
                order = self._epoch_order(epoch)
                # Keep two epochs: threads building one step may straddle an epoch boundary.
                self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
                self._orders[epoch] = order
            return order

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _salt(self.name), *keys])

    def record(self, k: int) -> tuple[dict, Path | TarMembers]:
        """The k-th record of the endless stream and what its image names resolve against.

        Raises `BrokenRecord` for a record that is not a JSON object (counted in `stats()`).
        """
        epoch, i = divmod(int(k), len(self))
        try:
            return self._read(self._order(epoch), i)
        except BrokenRecord as e:
            with self._lock:
                self._skipped[e.reason] += 1
            raise

    def _parse(self, raw: bytes, where: str) -> dict:
        try:
            rec = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BrokenRecord("malformed", f"{where}: invalid JSON ({e})") from None
        if not isinstance(rec, dict):
            raise BrokenRecord("malformed", f"{where}: a record must be a JSON object")
        return rec

    # ------------------------------------------------------------------ iteration by (rank, worker)
    def _shard(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def __iter__(self) -> Iterator[tuple[dict, Path | TarMembers]]:
        """This (rank, worker)'s share of the stream, endless: records k = shard, shard + shards, ...;
        broken ones are skipped and counted."""
        shard, shards = self._shard()
        while True:
            k = shard + self.position * shards
            self.position += 1
            try:
                yield self.record(k)
            except BrokenRecord:
                continue

    def state_dict(self) -> dict:
        return {"position": self.position, "records": len(self), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("records") != len(self) or state.get("seed") != self.seed:
            raise DataError(
                f"source {self.name!r}: saved position is for {state.get('records')} records with seed "
                f"{state.get('seed')}, this source has {len(self)} records with seed {self.seed}"
            )
        self.position = int(state["position"])

    def stats(self) -> dict:
        with self._lock:
            return {"records": len(self), "skipped": dict(self._skipped + Counter(self.unindexed))}

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_lock"]
        state["_orders"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _line_index(path: Path, chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start and end byte offsets and 1-based numbers of the lines of a file that are not blank."""
    newlines, nonblank_before = [], []  # per newline: its offset, and the non-whitespace bytes before it
    offset, nonblank = 0, 0
    with open(path, "rb") as f:
        while buf := f.read(chunk):
            b = np.frombuffer(buf, dtype=np.uint8)
            cum = np.cumsum(~np.isin(b, (9, 10, 13, 32))) + nonblank
            nl = np.flatnonzero(b == 10)
            newlines.append(nl + offset)
            nonblank_before.append(cum[nl])
            offset += len(b)
            nonblank = int(cum[-1])
    ends = np.concatenate(newlines + [np.array([offset])])  # a last line may lack its newline
    cum = np.concatenate(nonblank_before + [np.array([nonblank])])
    starts = np.concatenate([[0], ends[:-1] + 1])
    keep = np.diff(np.concatenate([[0], cum])) > 0
    numbers = np.arange(1, len(ends) + 1)
    return starts[keep].astype(np.int64), ends[keep].astype(np.int64), numbers[keep]


class JsonlSource(_IndexedSource):
    """A JSONL manifest, one record per line; image paths are relative to the manifest's directory."""

    def __init__(self, path: str | os.PathLike, seed: int = 0, rank: int = 0, world_size: int = 1,
                 name: str | None = None):
        path = Path(path)
        super().__init__(name or path.stem, seed, rank, world_size)
        if not path.is_file():
            raise DataError(f"source {self.name!r}: manifest not found: {path}")
        self.path = path
        self.base_dir = path.parent
        self._starts, self._ends, self._lines = _line_index(path)
        if len(self._starts) == 0:
            raise DataError(f"source {self.name!r}: manifest {path} has no records")

    def __len__(self) -> int:
        return len(self._starts)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return self._rng(epoch).permutation(len(self))

    def _read(self, order, i):
        j = int(order[i])
        raw = _pread(self.path, int(self._starts[j]), int(self._ends[j] - self._starts[j]))
        return self._parse(raw, f"{self.path}:{int(self._lines[j])}"), self.base_dir


def expand_shards(urls_or_glob: str | os.PathLike | list) -> list[Path]:
    """Shard paths from a list, a glob (`shards/*.tar`) or a brace range (`shards/{0000..0099}.tar`)."""
    if isinstance(urls_or_glob, (list, tuple)):
        return [p for u in urls_or_glob for p in expand_shards(u)]
    s = str(urls_or_glob)
    if re.match(r"^[a-z][a-z0-9+]*:", s) and not re.match(r"^[A-Za-z]:[\\/]", s):
        raise DataError(f"{s}: webdataset shards must be local files (download them first)")
    m = re.search(r"\{([^{}]*)\}", s)
    if m:
        body = m.group(1)
        r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if r:
            width = len(r.group(1))
            items = [str(i).zfill(width) for i in range(int(r.group(1)), int(r.group(2)) + 1)]
        else:
            items = body.split(",")
        return [p for it in items for p in expand_shards(s[: m.start()] + it + s[m.end():])]
    if any(c in s for c in "*?["):
        return [Path(p) for p in sorted(glob.glob(s))]
    return [Path(s)]


def _tar_index(shard: Path) -> tuple[list[tuple[str, dict[str, tuple[int, int]]]], int]:
    """Samples of a shard in file order: (key, {member name: (offset, size)}) for keys with a `.json`
    member, and the number of keys without one. Reads only the member headers."""
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(shard, "r:") as tf:
            for m in iter(tf.next, None):
                if not m.isfile():
                    continue
                folder, base = os.path.split(m.name)
                if "." not in base:
                    continue
                key = os.path.join(folder, base.split(".", 1)[0])
                groups.setdefault(key, {})[base] = (m.offset_data, m.size)
                tf.members = []  # the index is ours; do not let tarfile keep every header
    except tarfile.TarError as e:
        raise DataError(f"{shard}: not an uncompressed tar shard ({e})") from None
    samples = [(k, v) for k, v in groups.items() if f"{os.path.basename(k)}.json" in v]
    return samples, len(groups) - len(samples)


class WebDatasetSource(_IndexedSource):
    """Tar shards in the webdataset convention. Each epoch shuffles the shard order and the samples within
    each shard, so reading stays shard by shard."""

    def __init__(self, urls_or_glob, seed: int = 0, rank: int = 0, world_size: int = 1, name: str | None = None):
        shards = expand_shards(urls_or_glob)
        super().__init__(name or (shards[0].parent.name if shards else str(urls_or_glob)), seed, rank, world_size)
        if not shards:
            raise DataError(f"source {self.name!r}: no shards match {urls_or_glob}")
        for s in shards:
            if not s.is_file():
                raise DataError(f"source {self.name!r}: shard not found: {s}")
        self.shards = shards
        self._samples = []
        no_json = 0
        for s in shards:
            samples, n = _tar_index(s)
            self._samples.append(samples)
            no_json += n
        if no_json:
            self.unindexed["no json member"] = no_json
        self._sizes = np.array([len(x) for x in self._samples], dtype=np.int64)
        if self._sizes.sum() == 0:
            raise DataError(f"source {self.name!r}: the shards {urls_or_glob} hold no samples with a .json member")

    def __len__(self) -> int:
        return int(self._sizes.sum())

    def _epoch_order(self, epoch: int):
        shard_order = self._rng(epoch).permutation(len(self.shards))
        ends = np.cumsum(self._sizes[shard_order])
        within = [self._rng(epoch, int(s)).permutation(int(self._sizes[s])) for s in shard_order]
        return shard_order, ends, within

    def _read(self, order, i):
        shard_order, ends, within = order
        pos = int(np.searchsorted(ends, i, side="right"))
        j = i - (int(ends[pos - 1]) if pos else 0)
        s = int(shard_order[pos])
        key, members = self._samples[s][int(within[pos][j])]
        meta = f"{os.path.basename(key)}.json"
        raw = _pread(self.shards[s], *members[meta])
        return self._parse(raw, f"{self.shards[s]}:{key}"), TarMembers(self.shards[s], key, members)
