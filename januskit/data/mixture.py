"""The data mixture: which samples make up each optimizer step, on every rank, deterministically.

Janus / Janus-Pro mix the three data types inside every step by a fixed ratio (understanding : text :
generation, e.g. Janus-Pro 1:0:3, 2:3:5, 5:1:4) and switch sources at given steps (Janus stage II: ImageNet
class-to-image first, then ordinary text-to-image). A step's *global* plan is a pure function of the seed and
the data state: slot n of the endless slot sequence goes to the group furthest behind its share (so every step's
counts are exact integers and the running totals never drift a whole sample from the ratio), each slot picks
an active source of its group by weight, and each source hands out its records in order. Rank r builds the r-th
contiguous block of the step's slots. The plan does not depend on the number of ranks, so the union of the
ranks' samples is the single-rank step, and the state is the same on every rank.

A broken record is counted and replaced by a record drawn at a seeded random position of the same source; the
draw depends on the slot only, so replacements too are independent of ranks and timing.
"""

from __future__ import annotations

import math
import os
import random
import threading
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .sample import GROUPS, Sample
from .sources import BrokenRecord, DataError, JsonlSource, WebDatasetSource

if TYPE_CHECKING:
    from .builders import SampleBuilder

MAX_ATTEMPTS = 32  # consecutive broken records tolerated for one slot before the source is declared unusable
FORMATS = ("jsonl", "webdataset")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class SourceSpec:
    name: str
    path: str | list[str]  # a JSONL manifest; for webdataset a glob, brace range or list of tar shards
    group: str
    weight: float = 1.0
    start_step: int = 0
    end_step: int | None = None  # exclusive; None: until the end
    format: str = "jsonl"
    kind: str | None = None  # record kind for records that carry none

    def active(self, step: int) -> bool:
        return self.start_step <= step and (self.end_step is None or step < self.end_step)


@dataclass
class MixtureSpec:
    ratio: dict[str, float]
    sources: list[SourceSpec] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any], base_dir: str | os.PathLike | None = None) -> "MixtureSpec":
        """Read `{"ratio": {group: number}, "sources": [{name, path, group, ...}]}` (a TOML table works).

        Relative source paths are resolved against `base_dir` (the recipe's directory) when given.
        """
        if not isinstance(d, dict):
            raise DataError(f"mixture: expected a table with 'ratio' and 'sources', got {type(d).__name__}")
        unknown = set(d) - {"ratio", "sources"}
        if unknown:
            raise DataError(f"mixture: unknown field(s) {sorted(unknown)} (expected 'ratio' and 'sources')")
        ratio_in = d.get("ratio")
        if not isinstance(ratio_in, dict):
            raise DataError("mixture.ratio: expected a table {understanding, text, generation} of numbers")
        for g, v in ratio_in.items():
            if g not in GROUPS:
                raise DataError(f"mixture.ratio.{g}: unknown group (groups: {', '.join(GROUPS)})")
            if not _is_number(v) or v < 0:
                raise DataError(f"mixture.ratio.{g}: expected a number >= 0, got {v!r}")
        ratio = {g: ratio_in.get(g, 0) for g in GROUPS}
        if sum(ratio.values()) <= 0:
            raise DataError("mixture.ratio: at least one group needs a ratio > 0")

        sources_in = d.get("sources", [])
        if not isinstance(sources_in, list):
            raise DataError("mixture.sources: expected a list of tables")
        names = set()
        sources = []
        allowed = {f.name for f in SourceSpec.__dataclass_fields__.values()}
        for i, s in enumerate(sources_in):
            where = f"mixture.sources[{i}]"
            if not isinstance(s, dict):
                raise DataError(f"{where}: expected a table, got {type(s).__name__}")
            if isinstance(s.get("name"), str):
                where += f" ({s['name']!r})"
            unknown = set(s) - allowed
            if unknown:
                raise DataError(f"{where}: unknown field(s) {sorted(unknown)} (fields: {', '.join(sorted(allowed))})")
            for req in ("name", "path", "group"):
                if req not in s:
                    raise DataError(f"{where}.{req}: required")
            spec = SourceSpec(**s)
            if not isinstance(spec.name, str) or not spec.name:
                raise DataError(f"{where}.name: expected a non-empty string")
            if spec.name in names:
                raise DataError(f"{where}.name: duplicate source name {spec.name!r}")
            names.add(spec.name)
            paths = spec.path if isinstance(spec.path, list) else [spec.path]
            if not paths or not all(isinstance(p, str) and p for p in paths):
                raise DataError(f"{where}.path: expected a path or a list of paths")
            if spec.group not in GROUPS:
                raise DataError(f"{where}.group: {spec.group!r} is not one of {', '.join(GROUPS)}")
            if not _is_number(spec.weight) or spec.weight <= 0:
                raise DataError(f"{where}.weight: expected a number > 0, got {spec.weight!r}")
            if not _is_int(spec.start_step) or spec.start_step < 0:
                raise DataError(f"{where}.start_step: expected an integer >= 0, got {spec.start_step!r}")
            if spec.end_step is not None and (not _is_int(spec.end_step) or spec.end_step <= spec.start_step):
                raise DataError(f"{where}.end_step: expected an integer > start_step ({spec.start_step}), "
                                f"got {spec.end_step!r}")
            if spec.format not in FORMATS:
                raise DataError(f"{where}.format: {spec.format!r} is not one of {', '.join(FORMATS)}")
            if spec.format == "jsonl" and (isinstance(spec.path, list) or spec.path.endswith(".tar")):
                raise DataError(f"{where}.path: a jsonl source takes one manifest file; set format = \"webdataset\" "
                                "for tar shards")
            if spec.kind is not None and not isinstance(spec.kind, str):
                raise DataError(f"{where}.kind: expected a record kind string")
            if base_dir is not None:
                spec.path = [str(Path(base_dir) / p) for p in paths] if isinstance(spec.path, list) \
                    else str(Path(base_dir) / spec.path)
            sources.append(spec)
        return cls(ratio, sources)

    def check(self, total_steps: int | None = None) -> None:
        """Every group with a positive ratio has an active source at every step (up to `total_steps`)."""
        for g in GROUPS:
            if not self.ratio[g]:
                continue
            mine = [s for s in self.sources if s.group == g]
            # Coverage can only start failing at step 0 or where a window ends.
            for step in sorted({0} | {s.end_step for s in mine if s.end_step is not None}):
                if total_steps is not None and step >= total_steps:
                    break
                if not any(s.active(step) for s in mine):
                    windows = ", ".join(f"{s.name} [{s.start_step}, {s.end_step if s.end_step is not None else 'end'})"
                                        for s in mine) or "none"
                    raise DataError(f"mixture: group {g!r} has ratio {self.ratio[g]} but no active source at step "
                                    f"{step} (its sources: {windows})")


@dataclass
class _Slot:
    index: int  # position within the step's global slots
    group: str
    source: str
    record: int  # index into the source's endless stream


def _open_source(spec: SourceSpec, seed: int):
    if spec.format == "webdataset":
        return WebDatasetSource(spec.path, seed=seed, name=spec.name)
    return JsonlSource(spec.path, seed=seed, name=spec.name)


class Mixture:
    """This rank's share of every step's samples. `next_step(step, global_samples)` must be called with
    consecutive steps (a later step fast-forwards the plan); `state_dict()` resumes the stream exactly."""

    def __init__(self, spec: MixtureSpec, builder: "SampleBuilder", base_seed: int = 0, rank: int = 0,
                 world_size: int = 1, total_steps: int | None = None, workers: int = 2, prefetch: bool = True):
        if not 0 <= rank < world_size:
            raise DataError(f"mixture: rank {rank} is not in [0, {world_size})")
        spec.check(total_steps)
        self.spec, self.builder, self.seed = spec, builder, int(base_seed)
        self.rank, self.world_size = rank, world_size
        self.specs = {s.name: s for s in spec.sources}
        # Sources of zero-ratio groups are never read; do not make them a reason to fail.
        self.sources = {s.name: _open_source(s, self.seed) for s in spec.sources if spec.ratio[s.group]}
        total = sum(Fraction(str(v)) for v in spec.ratio.values())
        self.share = {g: Fraction(str(spec.ratio[g])) / total for g in GROUPS}
        self._state = {"step": 0, "slots": 0, "counts": {g: 0 for g in GROUPS},
                       "cursors": {name: 0 for name in self.sources}}
        self._samples: Counter = Counter()
        self._by_source: Counter = Counter()
        self._skipped: dict[str, Counter] = defaultdict(Counter)
        self._examples: dict[str, dict[str, str]] = defaultdict(dict)
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="januskit-data") if workers > 1 else None
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="januskit-prefetch") if prefetch else None
        self._ahead: tuple[int, int, Future] | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the plan (cheap, global)
    def _group_of_next_slot(self, slots: int, counts: dict[str, int]) -> str:
        """The group furthest behind its share after `slots + 1` slots; ties go to the first in GROUPS."""
        return max(GROUPS, key=lambda g: ((slots + 1) * self.share[g] - counts[g], -GROUPS.index(g)))

    def _plan(self, step: int, global_samples: int, state: dict) -> tuple[list[_Slot], dict]:
        state = {"step": state["step"] + 1, "slots": state["slots"], "counts": dict(state["counts"]),
                 "cursors": dict(state["cursors"])}
        rng = random.Random(f"januskit-mixture:{self.seed}:{step}")
        active = {g: [s for s in self.spec.sources if s.group == g and s.active(step)] for g in GROUPS}
        plan = []
        for j in range(global_samples):
            g = self._group_of_next_slot(state["slots"], state["counts"])
            state["slots"] += 1
            state["counts"][g] += 1
            if not active[g]:  # only past `total_steps`: the spec was checked at start
                raise DataError(f"mixture: group {g!r} has no active source at step {step}")
            src = active[g][0] if len(active[g]) == 1 else rng.choices(active[g], [s.weight for s in active[g]])[0]
            plan.append(_Slot(j, g, src.name, state["cursors"][src.name]))
            state["cursors"][src.name] += 1
        return plan, state

    def step_counts(self, step: int, global_samples: int) -> dict[str, int]:
        """Global samples per group that step `step` will have (planning from the current state)."""
        if step != self._state["step"]:
            raise DataError(f"step_counts({step}) but the mixture is at step {self._state['step']}")
        plan, _ = self._plan(step, global_samples, self._state)
        return {g: sum(s.group == g for s in plan) for g in GROUPS}

    # ------------------------------------------------------------------ building (this rank's slots)
    def _build_slot(self, step: int, slot: _Slot) -> tuple[Sample, list[tuple[str, BrokenRecord]]]:
        source, spec = self.sources[slot.source], self.specs[slot.source]
        skipped = []
        k = slot.record
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                n = len(source)
                pick = random.Random(f"januskit-retry:{self.seed}:{slot.source}:{slot.record}:{attempt}")
                k = (slot.record // n) * n + pick.randrange(n)
            rng = random.Random(f"januskit-sample:{self.seed}:{step}:{slot.index}:{attempt}")
            try:
                record, base = source.record(k)
                if spec.kind is not None and "kind" not in record:
                    record = {**record, "kind": spec.kind}
                sample = self.builder.build(record, base, rng)
                if sample.group != slot.group:
                    raise BrokenRecord("wrong group", f"a {sample.kind} record makes a {sample.group} sample but "
                                                      f"source {slot.source!r} is in group {slot.group!r}")
                return sample, skipped
            except BrokenRecord as e:
                skipped.append((slot.source, e))
        raise DataError(f"source {slot.source!r}: {MAX_ATTEMPTS} broken records in a row for one sample at step "
                        f"{step}; last: {skipped[-1][1]}")

    def _mine(self, plan: list[_Slot], global_samples: int) -> list[_Slot]:
        lo = self.rank * global_samples // self.world_size
        hi = (self.rank + 1) * global_samples // self.world_size
        return plan[lo:hi]

    def _produce(self, step: int, global_samples: int, state: dict):
        plan, new_state = self._plan(step, global_samples, state)
        mine = self._mine(plan, global_samples)
        if self._pool is not None and len(mine) > 1:
            built = list(self._pool.map(lambda s: self._build_slot(step, s), mine))
        else:
            built = [self._build_slot(step, s) for s in mine]
        return [b[0] for b in built], [s.source for s in mine], [e for b in built for e in b[1]], new_state

    def _commit(self, samples, names, skipped, new_state) -> None:
        with self._lock:
            self._state = new_state
            for s, name in zip(samples, names):
                self._samples[s.group] += 1
                self._by_source[name] += 1
            for name, e in skipped:
                self._skipped[name][e.reason] += 1
                self._examples[name][e.reason] = e.detail

    def next_step(self, step: int, global_samples: int) -> list[Sample]:
        """This rank's samples of step `step` when the whole step has `global_samples` samples."""
        if global_samples < 1:
            raise DataError(f"global_samples must be >= 1, got {global_samples}")
        if step < self._state["step"]:
            raise DataError(f"step {step} was already produced (the mixture is at step {self._state['step']}); "
                            "restore an earlier state_dict to replay it")
        while self._state["step"] < step:  # fast-forward: plan the skipped steps without building them
            _, self._state = self._plan(self._state["step"], global_samples, self._state)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:2] == (step, global_samples):
            produced = ahead[2].result()
        else:
            if ahead is not None:
                ahead[2].cancel()
            produced = self._produce(step, global_samples, self._state)
        self._commit(*produced)
        if self._prefetcher is not None:  # build the next step while the trainer works on this one
            self._ahead = (step + 1, global_samples,
                           self._prefetcher.submit(self._produce, step + 1, global_samples, produced[-1]))
        return produced[0]

    # ------------------------------------------------------------------ state and reports
    def state_dict(self) -> dict:
        """The same on every rank (the plan is global); loading it resumes the identical stream."""
        s = self._state
        return {"step": s["step"], "slots": s["slots"], "counts": dict(s["counts"]), "cursors": dict(s["cursors"]),
                "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise DataError(f"mixture state was saved with seed {state.get('seed')}, this run uses {self.seed}")
        if self._ahead is not None:
            self._ahead[2].cancel()
            self._ahead = None
        self._state = {"step": int(state["step"]), "slots": int(state["slots"]),
                       "counts": {g: int(state["counts"].get(g, 0)) for g in GROUPS},
                       # a source added since the state was saved starts from its beginning
                       "cursors": {name: int(state["cursors"].get(name, 0)) for name in self.sources}}

    def stats(self) -> dict:
        """This rank's counts: samples per group; per source its records, the samples built from it, and the
        skipped records by reason with the last message of each; plus the global slot counts per group."""
        with self._lock:
            return {
                "step": self._state["step"],
                "groups": {g: self._samples[g] for g in GROUPS},
                "slots": dict(self._state["counts"]),
                "sources": {
                    name: {"records": len(src), "samples": self._by_source[name],
                           "skipped": dict(self._skipped[name] + Counter(src.unindexed)),
                           "examples": dict(self._examples[name])}
                    for name, src in self.sources.items()
                },
            }

    def close(self) -> None:
        for pool in (self._pool, self._prefetcher):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
