"""Sources and the mixture: exact per-step ratios, step windows, rank sharding, skips, resume, tar shards.

The mixture is exercised with a stand-in builder (one token per record) so that these tests check the
scheduling alone; the real builder has its own tests.
"""

import io
import json
import tarfile
from fractions import Fraction

import pytest
import torch

from januskit.data.mixture import Mixture, MixtureSpec
from januskit.data.sample import GROUPS, IGNORE, Sample
from januskit.data.sources import BrokenRecord, DataError, JsonlSource, WebDatasetSource, image_ref

GROUP_OF = {"caption": "understanding", "text": "text", "text_to_image": "generation",
            "class_to_image": "generation"}


class StubBuilder:
    """Record {"kind", "id"} -> a 2-token sample [id, draw]; `"broken": reason` records are skipped."""

    def build(self, record, base, rng):
        if "broken" in record:
            raise BrokenRecord(record["broken"], f"record {record.get('id')}")
        draw = rng.randrange(10**6)
        ids = torch.tensor([record["id"], draw])
        return Sample(ids, torch.tensor([draw, IGNORE]), torch.full((2,), IGNORE), torch.zeros(2, dtype=torch.bool),
                      torch.full((2,), -1), torch.zeros(0, 3, 4, 4), group=GROUP_OF[record["kind"]],
                      kind=record["kind"])


def write_manifest(path, kind, ids, extra=None):
    lines = []
    for i in ids:
        rec = {"kind": kind, "id": i}
        rec.update((extra or {}).get(i, {}))
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def manifests(tmp_path):
    return {
        "und": write_manifest(tmp_path / "und.jsonl", "caption", range(1000, 1050)),
        "txt": write_manifest(tmp_path / "txt.jsonl", "text", range(2000, 2050)),
        "gen": write_manifest(tmp_path / "gen.jsonl", "text_to_image", range(3000, 3050)),
        "cls": write_manifest(tmp_path / "cls.jsonl", "class_to_image", range(4000, 4050)),
    }


def mixture(manifests, ratio, names=("und", "txt", "gen"), seed=0, rank=0, world_size=1, extra=(), **kw):
    groups = {"und": "understanding", "txt": "text", "gen": "generation", "cls": "generation"}
    sources = [{"name": n, "path": manifests[n], "group": groups[n]} for n in names] + list(extra)
    spec = MixtureSpec.from_dict({"ratio": ratio, "sources": sources})
    return Mixture(spec, StubBuilder(), base_seed=seed, rank=rank, world_size=world_size, **kw)


def counts(samples):
    return [sum(s.group == g for s in samples) for g in GROUPS]


def ids(samples):
    return [tuple(s.input_ids.tolist()) for s in samples]


# ---------------------------------------------------------------------------------------------- ratios
def test_ratio_1_0_3_gives_2_0_6_every_step(manifests):
    m = mixture(manifests, {"understanding": 1, "text": 0, "generation": 3}, names=("und", "gen"))
    for step in range(12):
        assert counts(m.next_step(step, 8)) == [2, 0, 6]
    assert m.stats()["slots"] == {"understanding": 24, "text": 0, "generation": 72}
    m.close()


def test_ratio_2_3_5_counts_are_exact_and_track_the_ratio(manifests):
    ratio = {"understanding": 2, "text": 3, "generation": 5}
    m = mixture(manifests, ratio)
    total = [0, 0, 0]
    per_step = []
    for step in range(25):
        c = counts(m.next_step(step, 16))
        per_step.append(c)
        assert sum(c) == 16
        total = [a + b for a, b in zip(total, c)]
        n = 16 * (step + 1)
        for g, (got, r) in enumerate(zip(total, (2, 3, 5))):
            assert abs(got - Fraction(n * r, 10)) < 1, (step, GROUPS[g], got)
    assert total == [80, 120, 200]  # 400 samples: exactly 2:3:5
    m.close()
    again = mixture(manifests, ratio)
    assert [counts(again.next_step(s, 16)) for s in range(25)] == per_step
    again.close()


def test_step_windows_switch_sources(manifests):
    spec_sources = [
        {"name": "und", "path": manifests["und"], "group": "understanding"},
        {"name": "cls", "path": manifests["cls"], "group": "generation", "end_step": 3},
        {"name": "gen", "path": manifests["gen"], "group": "generation", "start_step": 3},
    ]
    spec = MixtureSpec.from_dict({"ratio": {"understanding": 1, "generation": 1}, "sources": spec_sources})
    m = Mixture(spec, StubBuilder(), base_seed=1)
    for step in range(6):
        kinds = {s.kind for s in m.next_step(step, 6) if s.group == "generation"}
        assert kinds == ({"class_to_image"} if step < 3 else {"text_to_image"})
    m.close()


def test_weights_choose_sources_within_a_group(manifests):
    extra = [{"name": "cls", "path": manifests["cls"], "group": "generation", "weight": 3.0}]
    m = mixture(manifests, {"generation": 1}, names=("gen",), extra=extra)
    kinds = [s.kind for step in range(40) for s in m.next_step(step, 10)]
    share = kinds.count("class_to_image") / len(kinds)
    assert abs(share - 0.75) < 3 * (0.75 * 0.25 / len(kinds)) ** 0.5
    m.close()


# ---------------------------------------------------------------------------------------------- errors
def test_group_without_active_source_is_an_error_at_start(manifests):
    sources = [{"name": "gen", "path": manifests["gen"], "group": "generation", "end_step": 100},
               {"name": "und", "path": manifests["und"], "group": "understanding"}]
    spec = MixtureSpec.from_dict({"ratio": {"understanding": 1, "generation": 1}, "sources": sources})
    with pytest.raises(DataError, match="'generation'.*step 100"):
        Mixture(spec, StubBuilder())
    Mixture(spec, StubBuilder(), total_steps=100).close()  # fine when the run ends before the gap
    with pytest.raises(DataError, match="'text'.*step 0"):
        mixture(manifests, {"understanding": 1, "text": 1}, names=("und",))


def test_missing_manifest_is_an_error_naming_it(manifests, tmp_path):
    bad = [{"name": "web", "path": str(tmp_path / "nope.jsonl"), "group": "understanding"}]
    with pytest.raises(DataError, match="nope.jsonl"):
        mixture(manifests, {"understanding": 1, "generation": 1}, names=("gen",), extra=bad)


@pytest.mark.parametrize("d, field", [
    ({"ratio": {"understanding": 1, "vision": 1}, "sources": []}, "mixture.ratio.vision"),
    ({"ratio": {"understanding": -1}, "sources": []}, "mixture.ratio.understanding"),
    ({"ratio": {"text": 0}, "sources": []}, "mixture.ratio"),
    ({"ratio": {"text": 1}, "sources": [{"name": "a", "path": "x.jsonl", "group": "txt"}]}, r"sources\[0\].*group"),
    ({"ratio": {"text": 1}, "sources": [{"name": "a", "path": "x.jsonl", "group": "text", "wieght": 2}]}, "wieght"),
    ({"ratio": {"text": 1}, "sources": [{"name": "a", "path": "x.jsonl", "group": "text", "weight": 0}]}, "weight"),
    ({"ratio": {"text": 1}, "sources": [{"name": "a", "group": "text"}]}, r"sources\[0\].*path"),
    ({"ratio": {"text": 1}, "sources": [{"name": "a", "path": "x", "group": "text", "start_step": 5,
                                          "end_step": 5}]}, "end_step"),
    ({"ratio": {"text": 1}, "sources": [{"name": "a", "path": "x", "group": "text"}] * 2}, "duplicate"),
    ({"ratio": {"text": 1}, "sources": [{"name": "a", "path": "x.tar", "group": "text"}]}, "webdataset"),
    ({"ratio": {"text": 1}, "sources": [], "extra": 1}, "extra"),
])
def test_spec_validation_names_the_field(d, field):
    with pytest.raises(DataError, match=field):
        MixtureSpec.from_dict(d)


# ---------------------------------------------------------------------------------------------- skipping
def test_broken_records_are_skipped_and_counted(tmp_path, manifests):
    extra = {i: {"broken": "missing image"} for i in range(1000, 1050, 5)}
    manifests["und"] = write_manifest(tmp_path / "und.jsonl", "caption", range(1000, 1050), extra)
    with open(manifests["und"], "a") as f:
        f.write("{not json\n\n[1, 2]\n")
    m = mixture(manifests, {"understanding": 1, "generation": 1}, names=("und", "gen"))
    seen = []
    for step in range(20):
        samples = m.next_step(step, 8)
        assert counts(samples) == [4, 0, 4]
        seen += [s.input_ids[0].item() for s in samples if s.group == "understanding"]
    assert not any(i in extra for i in seen)
    st = m.stats()["sources"]["und"]
    assert st["records"] == 52
    assert st["skipped"]["missing image"] >= 1 and st["skipped"]["malformed"] >= 1
    assert st["samples"] == 80 and "und.jsonl:" in st["examples"]["malformed"]
    m.close()


# ---------------------------------------------------------------------------------------------- determinism
def test_resume_from_state_dict_gives_the_identical_stream(manifests):
    ratio = {"understanding": 2, "text": 3, "generation": 5}
    a = mixture(manifests, ratio, seed=7)
    stream = [ids(a.next_step(s, 12)) for s in range(4)]
    state = json.loads(json.dumps(a.state_dict()))
    stream += [ids(a.next_step(s, 12)) for s in range(4, 12)]
    a.close()
    b = mixture(manifests, ratio, seed=7)
    b.load_state_dict(state)
    assert [ids(b.next_step(s, 12)) for s in range(4, 12)] == stream[4:]
    b.close()
    c = mixture(manifests, ratio, seed=7, prefetch=False, workers=1)
    assert [ids(c.next_step(s, 12)) for s in range(12)] == stream
    d = mixture(manifests, ratio, seed=8)
    assert ids(d.next_step(0, 12)) != stream[0]
    d.close()


def test_ranks_partition_the_step(manifests):
    ratio = {"understanding": 5, "text": 1, "generation": 4}
    one = mixture(manifests, ratio, seed=3)
    two = [mixture(manifests, ratio, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in range(10):
        whole = ids(one.next_step(step, 10))
        parts = [ids(m.next_step(step, 10)) for m in two]
        assert [len(p) for p in parts] == [5, 5]
        assert parts[0] + parts[1] == whole
    assert two[0].state_dict() == two[1].state_dict() == one.state_dict()
    for m in [one, *two]:
        m.close()


def test_epochs_cover_every_record_once_in_a_new_order(tmp_path):
    path = write_manifest(tmp_path / "t.jsonl", "text", range(10))
    spec = MixtureSpec.from_dict({"ratio": {"text": 1}, "sources": [{"name": "t", "path": path, "group": "text"}]})
    m = Mixture(spec, StubBuilder(), base_seed=0)
    epochs = [[s.input_ids[0].item() for s in m.next_step(step, 10)] for step in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1]
    m.close()


# ---------------------------------------------------------------------------------------------- sources
def test_jsonl_source_iterates_its_rank_share_and_resumes(tmp_path):
    path = write_manifest(tmp_path / "t.jsonl", "text", range(20))
    (tmp_path / "t.jsonl").write_text((tmp_path / "t.jsonl").read_text() + "\n   \n")  # blank lines are no records
    whole = JsonlSource(path, seed=5)
    assert len(whole) == 20
    epoch = [whole.record(k)[0]["id"] for k in range(20)]
    assert sorted(epoch) == list(range(20))
    shares = []
    for rank in range(2):
        it = iter(JsonlSource(path, seed=5, rank=rank, world_size=2))
        shares.append([next(it)[0]["id"] for _ in range(10)])
    assert sorted(shares[0] + shares[1]) == list(range(20))
    src = JsonlSource(path, seed=5, rank=1, world_size=2)
    it = iter(src)
    first = [next(it)[0]["id"] for _ in range(4)]
    state = src.state_dict()
    rest = [next(it)[0]["id"] for _ in range(8)]
    again = JsonlSource(path, seed=5, rank=1, world_size=2)
    again.load_state_dict(state)
    it = iter(again)
    assert first == shares[1][:4] and [next(it)[0]["id"] for _ in range(8)] == rest
    assert whole.record(0)[1] == tmp_path


def _tar(path, samples):
    with tarfile.open(path, "w") as tf:
        for key, files in samples:
            for name, data in files.items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_webdataset_shards_stream_records_and_images(tmp_path):
    for s in range(3):
        samples = []
        for i in range(4):
            key = f"s{s}-{i:03d}"
            rec = {"kind": "caption", "text": f"caption {key}", "image": f"{key}.png"}
            samples.append((key, {"json": json.dumps(rec).encode(), "png": f"PNG{key}".encode()}))
        samples.append((f"s{s}-orphan", {"txt": b"no json"}))
        _tar(tmp_path / f"shard-{s:02d}.tar", samples)
    src = WebDatasetSource(str(tmp_path / "shard-{00..02}.tar"), seed=0)
    assert len(src) == 12 and src.stats()["skipped"] == {"no json member": 3}
    seen = []
    for k in range(12):
        rec, base = src.record(k)
        key = rec["text"].split()[1]
        ref = image_ref(base, rec["image"])
        assert ref.read() == f"PNG{key}".encode()
        assert image_ref(base, "png").read() == f"PNG{key}".encode()
        assert ref.path.name == f"{key}.png" and ref.path.parent.name.startswith("shard-")
        seen.append(key)
    assert sorted(seen) == sorted(f"s{s}-{i:03d}" for s in range(3) for i in range(4))
    # an epoch reads shard by shard
    assert all(len({k[:2] for k in seen[i:i + 4]}) == 1 for i in range(0, 12, 4))
    assert [src.record(12 + k)[0]["text"] for k in range(12)] != [f"caption {k}" for k in seen]
    globbed = WebDatasetSource(str(tmp_path / "*.tar"), seed=0)
    assert [globbed.record(k)[0] for k in range(12)] == [src.record(k)[0] for k in range(12)]
    with pytest.raises(BrokenRecord, match="missing image"):
        image_ref(src.record(0)[1], "nothing.png")
    shares = [iter(WebDatasetSource(str(tmp_path / "*.tar"), rank=r, world_size=3)) for r in range(3)]
    assert sorted(next(it)[0]["text"] for it in shares for _ in range(4)) == sorted(f"caption {k}" for k in seen)


def test_webdataset_source_errors(tmp_path):
    with pytest.raises(DataError, match="no shards"):
        WebDatasetSource(str(tmp_path / "*.tar"))
    with pytest.raises(DataError, match="shard not found"):
        WebDatasetSource([str(tmp_path / "a.tar")])
    (tmp_path / "bad.tar").write_bytes(b"\x1f\x8b not a tar" * 100)
    with pytest.raises(DataError, match="uncompressed tar"):
        WebDatasetSource(str(tmp_path / "bad.tar"))
