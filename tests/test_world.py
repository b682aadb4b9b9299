"""The shapes world: determinism, ground truth, held-out combinations; the scorer's accuracy on renders."""

import json
import random
import re

import numpy as np
import pytest
from PIL import ImageFilter

from januskit.data.world import CAPTION_QUESTION, CATEGORIES, HELD_OUT, LIST_QUESTION, Scene, build_dataset, caption, \
    cell_of, final_answer, questions, random_scene, relation_questions, random_spec, scan_answer, scan_questions, \
    scene_for_spec, spec_text, where_questions, write_describe_chats
from januskit.eval.shapescore import answer, check_prompt, detect


def _read(path):
    return [json.loads(line) for line in open(path)]


def test_deterministic_per_seed(tmp_path):
    a, b, c = (build_dataset(tmp_path / n, 30, seed, n_eval=24) for n, seed in (("a", 1), ("b", 1), ("c", 2)))
    assert a == b
    for kind in ("caption", "vqa", "text_to_image", "chat", "eval_geneval"):
        assert (tmp_path / "a" / f"{kind}.jsonl").read_bytes() == (tmp_path / "b" / f"{kind}.jsonl").read_bytes()
    assert (tmp_path / "a" / "img" / "000001.png").read_bytes() == (tmp_path / "b" / "img" / "000001.png").read_bytes()
    assert (tmp_path / "a" / "caption.jsonl").read_bytes() != (tmp_path / "c" / "caption.jsonl").read_bytes()


def test_manifests_resolve_and_hold_no_held_out_pairs(tmp_path):
    build_dataset(tmp_path, 60, 0, n_eval=60)
    held = {tuple(h) for h in HELD_OUT}
    for kind in ("caption", "caption_qa", "vqa", "class_to_image", "text_to_image", "interleaved", "text", "chat"):
        rows = _read(tmp_path / f"{kind}.jsonl")
        assert rows, kind
        for r in rows:
            text = json.dumps(r)
            for c, s in held:
                assert f"{c} {s}" not in text, (kind, r)
            scenes = r.get("scene", [])
            for sc in scenes if isinstance(scenes, list) else [scenes]:
                assert not {(o["color"], o["shape"]) for o in sc["objects"]} & held
            for img in [r.get("image")] + [s.get("image") for s in r.get("segments", [])] + \
                    [i for m in r.get("messages", []) for i in m.get("images", [])]:
                if img:
                    assert (tmp_path / img).exists()
    assert any(e["held_out"] for e in _read(tmp_path / "eval_geneval.jsonl"))
    assert any(e["held_out"] for e in _read(tmp_path / "eval_vqa.jsonl"))


def test_lone_shape_questions(tmp_path):
    """Every other class-name image also gets VQA and a chat about its lone shape: colour, shape, existence."""
    build_dataset(tmp_path, 20, 0, n_eval=12)
    lone = {r["image"]: r["scene"]["objects"][0] for r in _read(tmp_path / "class_to_image.jsonl")}
    vqa = [r for r in _read(tmp_path / "vqa.jsonl") if r["image"] in lone]
    chats = [r for r in _read(tmp_path / "chat.jsonl") if r["messages"][0]["images"][0] in lone]
    assert len(chats) == 10 and {r["image"] for r in vqa} == {c["messages"][0]["images"][0] for c in chats}
    assert {r["qtype"] for r in vqa} >= {"color", "shape", "exist", "count"}
    for r in vqa:
        o = lone[r["image"]]
        if r["qtype"] == "color":
            assert r["question"] == f"What color is the {o['shape']}?" and r["answer"] == o["color"]
        if r["qtype"] == "shape":
            assert r["answer"] == o["shape"]
    for c in chats:
        asked = [m["content"].split("\n")[-1] for m in c["messages"][::2]]
        answers = [m["content"] for m in c["messages"][1::2]]
        want = {(r["question"], r["answer"]) for r in vqa if r["image"] == c["messages"][0]["images"][0]}
        assert set(zip(asked, answers)) == want


def test_relation_questions_come_in_contrasting_pairs(tmp_path):
    """Two-shape scenes get position questions in both orders (one yes, one no), true of the rendered image."""
    rng = random.Random(3)
    for _ in range(200):
        scene = random_scene(rng, n=2)
        qs = relation_questions(scene, rng)
        if {(o.color, o.shape) for o in scene.objects} == {(scene.objects[0].color, scene.objects[0].shape)}:
            assert qs == []  # two objects of one name: no way to tell which is meant
            continue
        assert len(qs) in (2, 4) and [q["answer"] for q in qs] == ["yes", "no"] * (len(qs) // 2)
        for q in qs:
            assert q["qtype"] == "position"
            assert answer(q["question"], detect(scene.render(64))) == q["answer"], q
    build_dataset(tmp_path, 30, 0, n_eval=12, relation_pairs=True)
    pairs = [c for c in _read(tmp_path / "chat.jsonl") if len(c["scene"]["objects"]) == 2
             and all(q["content"].split("\n")[-1].startswith("Is the ") and " the " in q["content"]
                     for q in c["messages"][::2])]
    assert len(pairs) >= 8


def test_captions_questions_and_balance():
    rng = random.Random(0)
    yes = total = 0
    for _ in range(400):
        scene = random_scene(rng)
        cap = caption(scene)
        assert len(cap.split(". ")) == len(scene.objects) + 1  # summary sentence + one per object
        for o in scene.objects:
            assert f"{o.size} {o.color} {o.shape}" in cap
        for q in questions(scene, rng):
            assert answer(q["question"], detect(scene.render(64))) == final_answer(q["answer"]), q
            if q["qtype"] == "exist":
                total += 1
                yes += q["answer"] == "yes"
    assert 0.44 <= yes / total <= 0.56


def test_scorer_on_renders_and_blur():
    rng = random.Random(1)
    clean = blurred = 0
    n = 240
    for i in range(n):
        spec = random_spec(rng, CATEGORIES[i % len(CATEGORIES)], allow_held_out=True)
        img = scene_for_spec(spec, rng).render(64)
        clean += check_prompt(spec, detect(img))
        noisy = np.asarray(img.filter(ImageFilter.GaussianBlur(0.6)), dtype=float)
        noisy += np.random.default_rng(i).normal(0, 6, noisy.shape)
        blurred += check_prompt(spec, detect(np.clip(noisy, 0, 255).astype(np.uint8)))
        assert spec_text(spec)
    assert clean / n >= 0.99 and blurred / n >= 0.95


def test_scorer_rejects_wrong_images():
    rng = random.Random(2)
    spec = {"objects": [{"shape": "circle", "color": "red", "count": 1}], "relation": None}
    other = scene_for_spec({"objects": [{"shape": "square", "color": "red", "count": 1}], "relation": None}, rng)
    assert not check_prompt(spec, detect(other.render(64)))
    spec = {"objects": [{"shape": "circle", "color": "red", "count": 1}, {"shape": "square", "color": "blue", "count": 1}],
            "relation": {"a": 0, "rel": "above", "b": 1}}
    flipped = dict(spec, relation={"a": 0, "rel": "below", "b": 1})
    img = scene_for_spec(spec, rng).render(64)
    assert check_prompt(spec, detect(img)) and not check_prompt(flipped, detect(img))


def test_spec_scenes_lay_objects_out_in_the_order_named():
    rng = random.Random(3)
    reading = lambda o: (o.y, o.x)  # noqa: E731
    for _ in range(60):
        cat = rng.choice(("two_objects", "color_attr", "position"))
        spec = random_spec(rng, cat)
        scene = scene_for_spec(spec, rng)
        assert check_prompt(spec, detect(scene.render(64))), spec
        firsts = [next(o for o in scene.objects if o.shape == want["shape"]) for want in spec["objects"]]
        rel = (spec.get("relation") or {}).get("rel")
        before = reading(firsts[1]) < reading(firsts[0]) if rel == "below" else reading(firsts[0]) < reading(firsts[1])
        assert before, (spec_text(spec), scene.to_dict())


def test_position_answers_give_true_rows_and_columns_first():
    """A reasoned position answer names the grid row (above / below) or column (left / right) of each object, counted
    from 1, then ends in the yes or no that the rendered image bears out; `final_answer` reads that word back."""
    rng = random.Random(5)
    seen = set()
    for _ in range(600):
        scene = random_scene(rng)
        for q in questions(scene, rng, reasons=True):
            if q["qtype"] != "position":
                continue
            text, body = q["answer"], q["question"][len("Is the "):-1]  # "red circle above the blue square"
            axis = "row" if (" above " in body or " below " in body) else "column"
            numbers = [int(w.rstrip(",")) for w in text.split() if w.rstrip(",").isdigit()]
            a, b = (next(o for o in scene.objects if f"{o.color} {o.shape}" == name)
                    for name in (" ".join(body.split()[:2]), body.split(" the ")[-1]))
            want = [cell_of(o.x, o.y)[0 if axis == "row" else 1] + 1 for o in (a, b)]
            assert f" {axis} " in text and numbers == want, (q, scene)
            assert final_answer(text) == answer(q["question"], detect(scene.render(64))), (q, scene)
            seen.add(final_answer(text))
    assert seen == {"yes", "no"}
    assert final_answer(" Yes.") == "yes" and final_answer("The red circle is in row 1, so no.") == "no"
    plain = [q for q in questions(random_scene(random.Random(9), n=3), random.Random(9))]
    assert all(q["answer"] in ("yes", "no") for q in plain if q["qtype"] == "position")


def test_where_and_caption_turns_touch_only_the_chats(tmp_path):
    """Where and caption turns are added to the SFT chats only (their own random stream: images and every other
    manifest are byte for byte those of a plain world); a where answer names the cell the scorer finds the object
    in; a chat holds caption or where turns, never both, and every chat about a scene gets one or the other."""
    build_dataset(tmp_path / "plain", 40, 3, n_eval=12)
    build_dataset(tmp_path / "turns", 40, 3, n_eval=12, where_turns=True, caption_turns=True)
    for f in sorted((tmp_path / "plain").rglob("*")):
        if f.is_file() and f.name != "chat.jsonl":
            assert f.read_bytes() == (tmp_path / "turns" / f.relative_to(tmp_path / "plain")).read_bytes(), f.name
    kinds = {"where": 0, "caption": 0}
    for rec in _read(tmp_path / "turns" / "chat.jsonl"):
        scene = rec["scene"]
        users = [m["content"] for m in rec["messages"] if m["role"] == "user"]
        answers = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
        where = [a for u, a in zip(users, answers) if u.startswith("Where is") or "\nWhere is" in u]
        capt = [a for u, a in zip(users, answers) if u.endswith("Describe the image in detail.")]
        assert not (where and capt) and len(where) <= 2
        kinds["where"] += bool(where)
        kinds["caption"] += bool(capt)
        for a in capt:
            assert a.startswith(f"{['One', 'Two', 'Three', 'Four'][len(scene['objects']) - 1]} shape")
    assert kinds["where"] > 10 and kinds["caption"] > 3
    rng = random.Random(4)
    for _ in range(200):
        scene = random_scene(rng)
        found = detect(scene.render(64))
        for q in where_questions(scene):
            color, shape = q["question"][len("Where is the "):-1].split()
            r, c = (int(q["answer"].split(" row ")[1][0]) - 1, int(q["answer"].split(" column ")[1][0]) - 1)
            assert [cell_of(*o.center) for o in found if (o.color, o.shape) == (color, shape)] == [(r, c)], q


def test_where_chats_ask_every_named_object_once_and_change_nothing_else(tmp_path):
    """The where stage's data: one chat per scene of two or more objects, asking where each nameable object is, in
    some order, with the true cells; every other manifest and image is byte for byte the plain world's."""
    from januskit.data.world import Scene, _named

    build_dataset(tmp_path / "plain", 40, 3, n_eval=12)
    build_dataset(tmp_path / "where", 40, 3, n_eval=12, where_chats=True)
    for f in sorted((tmp_path / "plain").rglob("*")):
        if f.is_file() and f.name != "summary.json":
            assert f.read_bytes() == (tmp_path / "where" / f.relative_to(tmp_path / "plain")).read_bytes(), f.name
    assert not (tmp_path / "plain" / "where_chat.jsonl").exists()
    chats = _read(tmp_path / "where" / "where_chat.jsonl")
    scenes = [r["scene"] for r in _read(tmp_path / "plain" / "caption.jsonl")]
    assert len(chats) == sum(len(s["objects"]) >= 2 and bool(_named(Scene.from_dict(s).objects)) for s in scenes) > 10
    orders = set()
    for rec in chats:
        scene = Scene.from_dict(rec["scene"])
        asked = [(u["content"].split("\n")[-1], a["content"]) for u, a in zip(rec["messages"][::2], rec["messages"][1::2])]
        want = [(q["question"], q["answer"]) for q in where_questions(scene)]
        assert sorted(asked) == sorted(want) and len(scene.objects) >= 2
        assert rec["messages"][0]["content"].startswith("<image_placeholder>\n") and rec["messages"][0]["images"]
        orders.add(asked == want)
    assert orders == {True, False}  # shuffled, not always in the scene's order


def test_places_and_captions_scoring(tmp_path):
    """The eval's where and caption measures: right answers score 1, a wrong column or a dropped sentence counts
    against the model (checked with a stand-in model that answers from the ground truth, edited)."""
    from types import SimpleNamespace

    from PIL import Image

    from januskit.data.world import Scene
    from januskit.eval.bench import places_and_captions

    build_dataset(tmp_path, 20, 2, n_eval=40)
    records = _read(tmp_path / "eval_vqa.jsonl")
    scene_of = {Image.open(tmp_path / r["image"]).convert("RGB").tobytes(): Scene.from_dict(r["scene"])
                for r in records}

    class Truth:
        def __init__(self, edit=lambda a: a):
            self.edit = edit

        def chat_batch(self, convs, **kw):
            out = []
            for conv in convs:
                question, scene = conv[0]["content"].split("\n", 1)[1], scene_of[conv[0]["images"][0].tobytes()]
                want = caption(scene) if question.startswith("Describe") else \
                    next(w["answer"] for w in where_questions(scene) if w["question"] == question)
                out.append(SimpleNamespace(text=" " + self.edit(want)))
            return out

    right = places_and_captions(Truth(), records, tmp_path)
    assert right["where"]["all"] == 1.0 and right["caption"]["sentences"] == right["caption"]["exact"] == 1.0
    assert right["where"]["questions"] > 10 and set(right["where"]["by_objects"]) <= {1, 2, 3, 4}
    off = places_and_captions(Truth(lambda a: a.replace("column", "column 9") if " row " in a else a.rsplit(" ", 3)[0]),
                              records, tmp_path)
    assert off["where"]["all"] == 0.0 and off["caption"]["exact"] == 0.0 and 0.0 < off["caption"]["sentences"] < 1.0


def test_reason_check_separates_finding_the_places_from_comparing_them():
    """A position answer with its reason is taken apart: are both rows or columns the true ones, and does the yes or
    no follow from the two named (whatever they are)."""
    from januskit.data.world import Scene, position_answer
    from januskit.eval.bench import reason_check

    rng, seen = random.Random(6), 0
    for _ in range(300):
        scene = random_scene(rng, n=rng.choice((2, 3, 4)))
        for q in questions(scene, rng):
            rec = {**q, "scene": scene.to_dict()}
            if q["qtype"] != "position":
                assert reason_check(rec, " 2") is None
                continue
            seen += 1
            m = re.fullmatch(r"Is the (\w+) (\w+) (.+) the (\w+) (\w+)\?", q["question"])
            objs = Scene.from_dict(rec["scene"]).objects
            a, b = (next(o for o in objs if (o.color, o.shape) == k) for k in ((m[1], m[2]), (m[4], m[5])))
            truth = position_answer(a, m[3], b)
            x, y = re.findall(r"(?:row|column) (\d)", truth)
            flip = {"yes.": "no.", "no.": "yes."}
            swapped = re.sub(r"(row|column) \d", "\\1 #", truth).replace("#", y, 1).replace("#", x, 1)
            flipped = truth.rsplit(" ", 1)[0] + " " + flip[truth.rsplit(" ", 1)[1]]
            assert final_answer(truth) == q["answer"] and reason_check(rec, " " + truth) == (True, True)
            assert reason_check(rec, flipped) == (True, False)
            assert reason_check(rec, swapped) == (False, False)  # the places of the other object, the true verdict
            assert reason_check(rec, swapped.rsplit(" ", 1)[0] + " " + flip[truth.rsplit(" ", 1)[1]]) == (False, True)
            assert reason_check(rec, q["answer"]) is None  # a bare yes or no has no reason to check
            scan = scan_answer(scene)
            assert reason_check(rec, f" {scan} {truth}") == (True, True)  # a scanned answer: its last sentence
            assert reason_check(rec, f"{scan} {flipped}") == (True, False)
    assert seen > 50


def test_scan_answers_read_the_scene_in_order_and_end_in_the_true_verdict(tmp_path):
    """The scan: every object's cell (as the scorer finds it in the render) in reading order; scanned position answers
    are that scan, then the two rows or columns and the verdict; the option adds scan_chat.jsonl (list and position
    chats, every scene of two or more objects) and changes the position answers of the chats and the evaluation set,
    nothing else."""
    rng = random.Random(8)
    for _ in range(150):
        scene = random_scene(rng, n=rng.choice((1, 2, 3, 4)))
        found = sorted(cell_of(*o.center) + (o.color, o.shape) for o in detect(scene.render(64)))
        said = [(int(r) - 1, int(c) - 1, col, shape) for col, shape, r, c in
                re.findall(r"The (\w+) (\w+) is in row (\d) and column (\d)\.", scan_answer(scene))]
        assert said == found, scene  # reading order: by row, then column
        for q in scan_questions(scene, rng):
            assert q["answer"].startswith(scan_answer(scene))
            if q["qtype"] == "position":
                assert final_answer(q["answer"]) == answer(q["question"], detect(scene.render(64))), q
    assert scan_questions(random_scene(random.Random(1), n=1), rng) == []
    with pytest.raises(ValueError, match="either reasoned or scanned"):
        questions(random_scene(rng, n=2), rng, reasons=True, scan=True)

    build_dataset(tmp_path / "plain", 40, 3, n_eval=12)
    build_dataset(tmp_path / "scan", 40, 3, n_eval=12, position_scan=True)
    for f in sorted((tmp_path / "plain").rglob("*")):
        if f.is_file() and f.name not in ("summary.json", "vqa.jsonl", "chat.jsonl", "eval_vqa.jsonl"):
            assert f.read_bytes() == (tmp_path / "scan" / f.relative_to(tmp_path / "plain")).read_bytes(), f.name
    for name in ("vqa.jsonl", "eval_vqa.jsonl"):
        plain, scanned = _read(tmp_path / "plain" / name), _read(tmp_path / "scan" / name)
        assert [r["question"] for r in plain] == [r["question"] for r in scanned]
        for p, s in zip(plain, scanned):
            if p["qtype"] == "position":
                assert s["answer"].startswith("The ") and final_answer(s["answer"]) == p["answer"]
            else:
                assert s == p
    scanned_turns = 0
    for p, s in zip(_read(tmp_path / "plain" / "chat.jsonl"), _read(tmp_path / "scan" / "chat.jsonl")):
        assert [m for m in p["messages"] if m["role"] == "user"] == [m for m in s["messages"] if m["role"] == "user"]
        for k, (pm, sm) in enumerate(zip(p["messages"], s["messages"])):
            asked = p["messages"][k - 1]["content"] if k else ""
            if pm["role"] == "assistant" and re.search(r"Is the \w+ \w+ (above|below|to the \w+ of) the ", asked):
                assert final_answer(sm["content"]) == pm["content"] and sm["content"].startswith("The ")
                scanned_turns += 1
            else:
                assert pm == sm
    assert scanned_turns > 5
    chats = _read(tmp_path / "scan" / "scan_chat.jsonl")
    kinds = [c["messages"][0]["content"].split("\n")[1] == LIST_QUESTION for c in chats]
    scenes = [r["scene"] for r in _read(tmp_path / "plain" / "chat.jsonl")]
    assert sum(kinds) == sum(len(s["objects"]) >= 2 for s in scenes)
    assert 0 < kinds.count(False) and all(len(c["messages"]) == 2 for c in chats)


def test_describe_chats_ask_every_training_scene_for_its_caption_and_its_list(tmp_path):
    """describe_chat.jsonl: for each scene of caption.jsonl, one single-turn chat answered with its caption and one
    answered with its scan (the list of its shapes in reading order), in an order that depends on the seed only;
    rewriting it from caption.jsonl (as the chain does for a world made before it existed) gives the same file."""
    summary = build_dataset(tmp_path / "w", 30, 4, n_eval=12)
    captions = _read(tmp_path / "w" / "caption.jsonl")
    chats = _read(tmp_path / "w" / "describe_chat.jsonl")
    assert summary["describe_chat"] == len(chats) == 2 * len(captions)
    wanted = sorted((c["image"], q, a) for c in captions for q, a in (
        (CAPTION_QUESTION, c["text"]), (LIST_QUESTION, scan_answer(Scene.from_dict(c["scene"])))))
    said = []
    for r in chats:
        user, reply = r["messages"]
        assert r["kind"] == "chat" and user["role"] == "user" and reply["role"] == "assistant"
        assert user["content"].startswith("<image_placeholder>\n") and len(user["images"]) == 1
        said.append((user["images"][0], user["content"].split("\n", 1)[1], reply["content"]))
    assert sorted(said) == wanted
    assert [s[0] for s in said] != sorted(s[0] for s in said)  # shuffled, not scene by scene
    before = (tmp_path / "w" / "describe_chat.jsonl").read_bytes()
    assert write_describe_chats(tmp_path / "w", 4) == len(chats)
    assert (tmp_path / "w" / "describe_chat.jsonl").read_bytes() == before
