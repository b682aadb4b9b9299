"""A procedural world of flat shapes, and every data kind the Janus recipe needs, built from it.

Scenes hold 1-4 shapes (circle, square, triangle) in six colours and two sizes on a white background, with exact
ground truth. Shapes sit at the centres of the cells of a 4x4 grid (16-px cells at 64 px), one shape a cell: the
cell is the unit the bundled model's VQ tokenizer (downsample 16) and vision patches (16 px) see, so one image is
16 image tokens, and positions and relations are always unambiguous. From scenes come captions (several
sentences, so the first-sentence rule matters), class names
(the ImageNet analogue), GenEval-style prompts with a checkable spec, caption QA, visual QA, interleaved
documents, text-only documents and chat conversations, written as the JSONL manifests of docs/data.md.
Held-out colour-shape pairs never appear in training data; the evaluation sets test them separately.
Everything is deterministic per seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (235, 205, 20), "purple": (140, 40, 180), "orange": (245, 135, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 8, "large": 14}  # extent in pixels at 64 px
BACKGROUND = (255, 255, 255)
HELD_OUT: tuple[tuple[str, str], ...] = (("purple", "triangle"),)
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("above", "below", "to the left of", "to the right of")
REF = 64  # coordinates are stored at this resolution and scaled when rendering
GRID = 4  # cells a side; a shape's centre is a cell centre
CELL = REF // GRID


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    x: float  # centre, in REF pixels
    y: float

    @property
    def extent(self) -> int:
        return SIZES[self.size]

    def bbox(self) -> tuple[float, float, float, float]:
        h = self.extent / 2
        return (self.x - h, self.y - h, self.x + h, self.y + h)

    def name(self, with_size=False) -> str:
        return f"{self.size + ' ' if with_size else ''}{self.color} {self.shape}"


@dataclass
class Scene:
    objects: list[Obj] = field(default_factory=list)

    def render(self, size: int = 64) -> Image.Image:
        img = Image.new("RGB", (size, size), BACKGROUND)
        d = ImageDraw.Draw(img)
        s = size / REF
        for o in self.objects:
            x0, y0, x1, y1 = (v * s for v in o.bbox())
            c = COLORS[o.color]
            if o.shape == "circle":
                d.ellipse((x0, y0, x1 - 1, y1 - 1), fill=c)
            elif o.shape == "square":
                d.rectangle((x0, y0, x1 - 1, y1 - 1), fill=c)
            else:
                d.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=c)
        return img

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls([Obj(**o) for o in d["objects"]])

    def combos(self) -> set[tuple[str, str]]:
        return {(o.color, o.shape) for o in self.objects}


# ---------------------------------------------------------------------------------------------- sampling
def cell_of(x: float, y: float) -> tuple[int, int]:
    """(row, col) of the grid cell holding a point in REF coordinates."""
    return min(int(y // CELL), GRID - 1), min(int(x // CELL), GRID - 1)


def _place(rng: random.Random, scene: Scene, obj: Obj) -> bool:
    """Put obj at the centre of a random free cell."""
    taken = {cell_of(o.x, o.y) for o in scene.objects}
    free = [(c * CELL + CELL / 2, r * CELL + CELL / 2) for r in range(GRID) for c in range(GRID) if (r, c) not in taken]
    if not free:
        return False
    obj.x, obj.y = rng.choice(free)
    scene.objects.append(obj)
    return True


def _attrs(rng, held_out, allow_held_out=False, shape=None, color=None):
    for _ in range(100):
        s, c = shape or rng.choice(SHAPES), color or rng.choice(list(COLORS))
        if allow_held_out or (c, s) not in held_out:
            return s, c
    raise ValueError(f"no allowed colour/shape for shape={shape} color={color}")


def random_scene(rng: random.Random, held_out=HELD_OUT, allow_held_out=False, n: int | None = None) -> Scene:
    while True:
        scene = Scene()
        k = n or rng.choice((1, 1, 2, 2, 3, 4))
        for _ in range(k):
            s, c = _attrs(rng, held_out, allow_held_out)
            _place(rng, scene, Obj(s, c, rng.choice(tuple(SIZES)), 0, 0))
        if len(scene.objects) == k:
            return scene


# ---------------------------------------------------------------------------------------------- language
def where(o: Obj) -> str:
    col = "left" if o.x < REF / 3 else "right" if o.x > 2 * REF / 3 else "center"
    row = "top" if o.y < REF / 3 else "bottom" if o.y > 2 * REF / 3 else "middle"
    if (row, col) == ("middle", "center"):
        return "in the center"
    if row == "middle":
        return f"on the {col}"
    if col == "center":
        return f"at the {row}"
    return f"in the {row} {col}"


def caption(scene: Scene) -> str:
    n = len(scene.objects)
    first = f"{NUMBERS[n].capitalize()} shape{'s' if n > 1 else ''} on a white background."
    rest = [f"A {o.size} {o.color} {o.shape} is {where(o)}." for o in sorted(scene.objects, key=lambda o: (o.y, o.x))]
    return " ".join([first] + rest)


def relation_holds(a: Obj, rel: str, b: Obj, margin: float = 4) -> bool:
    return {"above": a.y < b.y - margin, "below": a.y > b.y + margin,
            "to the left of": a.x < b.x - margin, "to the right of": a.x > b.x + margin}[rel]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def spec_text(spec: dict) -> str:
    """The prompt for a spec: objects [{shape, color, count}], optional relation {a, rel, b}."""
    parts = []
    for o in spec["objects"]:
        noun = o["shape"] + ("s" if o["count"] > 1 else "")
        words = ([o["color"]] if o.get("color") else []) + [noun]
        head = NUMBERS[o["count"]] if o["count"] > 1 else _article(words[0])
        parts.append(f"{head} {' '.join(words)}")
    rel = spec.get("relation")
    if rel:
        return f"{parts[rel['a']]} {rel['rel']} {parts[rel['b']]}"
    return " and ".join(parts)


def random_spec(rng: random.Random, category: str, held_out=HELD_OUT, allow_held_out=False) -> dict:
    def obj(count=1, need_color=True):
        s, c = _attrs(rng, held_out, allow_held_out)
        return {"shape": s, "color": c if need_color else None, "count": count}

    if category == "single_object":
        return {"objects": [obj(need_color=rng.random() < 0.5)], "relation": None}
    if category == "colors":
        return {"objects": [obj()], "relation": None}
    if category == "counting":
        return {"objects": [obj(count=rng.choice((2, 3, 4)), need_color=rng.random() < 0.7)], "relation": None}
    a = obj()
    while True:
        b = obj()
        if (a["shape"], a["color"]) != (b["shape"], b["color"]) and a["shape"] != b["shape"]:
            break
    if category == "two_objects":  # GenEval names the objects only; here each is coloured half of the time
        for o in (a, b):
            if rng.random() < 0.5:
                o["color"] = None
        return {"objects": [a, b], "relation": None}
    if category == "color_attr":
        return {"objects": [a, b], "relation": None}
    if category == "position":
        return {"objects": [a, b], "relation": {"a": 0, "rel": rng.choice(RELATIONS), "b": 1}}
    raise ValueError(f"unknown category {category!r}")


CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
OPEN_CATEGORIES = ("single_object", "colors", "counting")  # too few distinct prompts (21, 18, 63) to hold out


def scene_for_spec(spec: dict, rng: random.Random, held_out=HELD_OUT, allow_held_out=True, in_order=True) -> Scene:
    """A scene that satisfies the spec exactly (only the named objects).

    `in_order`: without a relation, the objects take their cells in reading order (rows top to bottom, each left
    to right) as the prompt names them, so the n-th object a raster-order generator draws is the n-th the prompt
    names; with a relation, likewise, except that "below" puts the second-named object first. A convention of the
    world, as captions list objects in reading order: it makes binding a colour to its shape a matter of attending to
    one noun phrase at a time (colour attribution 0.31 -> 0.77 at w = 5 after 750 generation-only steps)."""
    for _ in range(1000):
        scene = Scene()
        objs = []
        for o in spec["objects"]:
            group = []
            color = o.get("color")
            for _ in range(o["count"]):
                c = color or _attrs(rng, held_out, allow_held_out, shape=o["shape"])[1]
                group.append(Obj(o["shape"], c, rng.choice(tuple(SIZES)), 0, 0))
            objs.append(group)
        rel = spec.get("relation")
        if rel:
            a, b = objs[rel["a"]][0], objs[rel["b"]][0]
            ok = _place(rng, scene, a) and _place(rng, scene, b) and relation_holds(a, rel["rel"], b)
            if ok and in_order and rel["rel"] != "below":  # "below" puts the second-named object first
                ok = (a.y, a.x) < (b.y, b.x)
        else:
            ok = all(_place(rng, scene, o) for group in objs for o in group)
            if ok and in_order:
                cells = sorted((o.y, o.x) for o in scene.objects)
                for o, (y, x) in zip(scene.objects, cells):
                    o.x, o.y = x, y
        if ok and len(scene.objects) == sum(len(g) for g in objs):
            return scene
    raise RuntimeError(f"could not place {spec}")


# ---------------------------------------------------------------------------------------------- questions
def _named(objs: list[Obj]) -> list[Obj]:
    """The objects that "the <colour> <shape>" picks out: the only one of their colour and shape in the scene."""
    return [o for o in objs if sum(p.color == o.color and p.shape == o.shape for p in objs) == 1]


def position_answer(a: Obj, rel: str, b: Obj) -> str:
    """The answer to "Is the <a> <rel> the <b>?" with its reason first: where each one is (the grid row for above and
    below, the column for left and right, counted from 1 at the top / left), then "so yes" or "so no". Said first,
    the rows or columns turn the question into comparing two small numbers the model has just written."""
    axis = "row" if rel in ("above", "below") else "column"
    ra, ca = cell_of(a.x, a.y)
    rb, cb = cell_of(b.x, b.y)
    ia, ib = (ra, rb) if axis == "row" else (ca, cb)
    ans = "yes" if relation_holds(a, rel, b) else "no"
    return f"The {a.color} {a.shape} is in {axis} {ia + 1} and the {b.color} {b.shape} is in {axis} {ib + 1}, so {ans}."


def final_answer(text: str) -> str:
    """What an answer comes to: what follows its last ", so " for a reasoned answer, else the whole answer; lower
    case, without the closing full stop."""
    t = text.strip().lower().rstrip(".").strip()
    cut = t.rfind(", so ")
    return t[cut + len(", so "):].strip() if cut >= 0 else t


# "List the shapes.": every object's place in reading order (`scan_answer`), the chats of the scan stage.
LIST_QUESTION = "List the shapes."


def place_sentence(o: Obj) -> str:
    """"The red circle is in row 2 and column 3." (grid cell, counted from 1 at the top / left)."""
    r, c = cell_of(o.x, o.y)
    return f"The {o.color} {o.shape} is in row {r + 1} and column {c + 1}."


def scan_answer(scene: Scene) -> str:
    """Every object's `place_sentence`, in reading order (by row, then column): the answer to `LIST_QUESTION`, and
    the first part of a scanned position answer. Reading the scene in order is learnt far faster than looking a named
    object up (README, the bundled model's findings)."""
    return " ".join(place_sentence(o) for o in sorted(scene.objects, key=lambda o: (o.y, o.x)))


def scanned_position_answer(scene: Scene, a: Obj, rel: str, b: Obj) -> str:
    """The scene's `scan_answer`, then `position_answer`: the two rows or columns read back and the yes or no."""
    return f"{scan_answer(scene)} {position_answer(a, rel, b)}"


def _draw_relation(named: list[Obj], rng: random.Random) -> tuple[Obj, str, Obj] | None:
    """Two of the named objects and a relation, or None when it holds in neither order (no clear answer)."""
    a, b = rng.sample(named, 2)
    rel = rng.choice(RELATIONS)
    return (a, rel, b) if relation_holds(a, rel, b) or relation_holds(b, rel, a) else None


def _position_question(a: Obj, rel: str, b: Obj, answer: str) -> dict:
    return {"question": f"Is the {a.color} {a.shape} {rel} the {b.color} {b.shape}?", "answer": answer,
            "qtype": "position"}


def questions(scene: Scene, rng: random.Random, held_out=HELD_OUT, allow_held_out=False,
              reasons: bool = False, scan: bool = False) -> list[dict]:
    """Visual QA for a scene: count, colour, shape, position, existence (balanced yes/no). `reasons`: position
    answers give the rows or columns before the yes or no (`position_answer`); `scan`: that, after the scene's
    `scan_answer`; else a bare yes or no."""
    if reasons and scan:
        raise ValueError("position answers are either reasoned or scanned, not both")
    objs = scene.objects
    qs = [{"question": "How many shapes are there?", "answer": str(len(objs)), "qtype": "count"}]
    s = rng.choice(SHAPES)
    qs.append({"question": f"How many {s}s are there?", "answer": str(sum(o.shape == s for o in objs)), "qtype": "count"})
    by_shape = {s: [o for o in objs if o.shape == s] for s in SHAPES}
    uniq = [o for o in objs if len(by_shape[o.shape]) == 1]
    if uniq:
        o = rng.choice(uniq)
        qs.append({"question": f"What color is the {o.shape}?", "answer": o.color, "qtype": "color"})
    by_color = {c: [o for o in objs if o.color == c] for c in COLORS}
    uniq_c = [o for o in objs if len(by_color[o.color]) == 1]
    if uniq_c:
        o = rng.choice(uniq_c)
        qs.append({"question": f"What shape is the {o.color} object?", "answer": o.shape, "qtype": "shape"})
    named = _named(objs)
    if len(named) >= 2 and (drawn := _draw_relation(named, rng)):
        a, rel, b = drawn
        if scan:
            ans = scanned_position_answer(scene, a, rel, b)
        elif reasons:
            ans = position_answer(a, rel, b)
        else:
            ans = "yes" if relation_holds(a, rel, b) else "no"
        qs.append(_position_question(a, rel, b, ans))
    present = scene.combos()
    if rng.random() < 0.5:
        c, s = rng.choice(sorted(present))
        ans = "yes"
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present
                  and (allow_held_out or (c, s) not in held_out)]
        c, s = rng.choice(absent)
        ans = "no"
    qs.append({"question": f"Is there {_article(c)} {c} {s} in the image?", "answer": ans, "qtype": "exist"})
    return qs


# The caption question of stage II's caption QA (Janus's "<image>Describe the image in detail.<caption>"), also asked
# in SFT chats with `caption_turns` and by the eval.
CAPTION_QUESTION = "Describe the image in detail."


def where_questions(scene: Scene) -> list[dict]:
    """"Where is the <colour> <shape>?" for every object the phrase picks out, answered with its grid cell ("The red
    circle is in row 2 and column 3.", counted from 1 at the top / left): the lookup from a named object to its
    place that position questions need, asked on its own."""
    return [{"question": f"Where is the {o.color} {o.shape}?", "answer": place_sentence(o), "qtype": "where"}
            for o in _named(scene.objects)]


def scan_questions(scene: Scene, rng: random.Random, positions: int = 4) -> list[dict]:
    """The scan stage's questions about a scene of two or more objects: `LIST_QUESTION`, and up to `positions`
    position questions (two named objects in different rows for above / below, columns for left / right) answered
    with the scan first: `scan_answer`, then `position_answer`, which names the two rows or columns (read back from
    the scan) and gives the yes or no that follows from them. Four a scene make about three quarters of the chats
    position chats: at 60% (two a scene) the yes or no had not come after 3000 steps; 1000 more at ~75% brought it."""
    if len(scene.objects) < 2:
        return []
    qs = [{"question": LIST_QUESTION, "answer": scan_answer(scene), "qtype": "list"}]
    named = _named(scene.objects)
    for _ in range(positions if len(named) >= 2 else 0):
        if drawn := _draw_relation(named, rng):
            qs.append(_position_question(*drawn, scanned_position_answer(scene, *drawn)))
    return qs


def relation_questions(scene: Scene, rng: random.Random, relations: int = 2) -> list[dict]:
    """Position questions contrasted within one image: for up to `relations` relations that hold between two named
    objects, the question in both orders (one yes, one no), so the answer can only come from where each one is."""
    named = _named(scene.objects)
    if len(named) < 2:
        return []
    a, b = rng.sample(named, 2)
    holding = [(x, rel, y) for rel in RELATIONS for x, y in ((a, b), (b, a)) if relation_holds(x, rel, y)]
    qs = []
    for x, rel, y in rng.sample(holding, min(relations, len(holding))):
        for p, q, ans in ((x, y, "yes"), (y, x, "no")):
            qs.append(_position_question(p, rel, q, ans))
    return qs


def text_document(rng: random.Random, held_out=HELD_OUT) -> str:
    facts = ["A triangle has three sides.", "A square has four equal sides.", "A circle is round and has no corners.",
             "Red, green, blue, yellow, purple and orange are colors.", "One plus one is two.",
             "Two plus one is three.", "Three plus one is four.", "The top of an image is above its bottom.",
             "Left is the opposite of right.", "Above is the opposite of below."]
    kind = rng.random()
    if kind < 0.4:
        return " ".join(rng.sample(facts, 3))
    if kind < 0.7:
        n = rng.randint(1, 4)
        return f"Counting: {' '.join(NUMBERS[i] for i in range(1, n + 1))}. There {'is' if n == 1 else 'are'} {NUMBERS[n]}."
    return "Here is a picture: " + caption(random_scene(rng, held_out))


# ---------------------------------------------------------------------------------------------- datasets
class _Writer:
    def __init__(self, out: Path, size: int):
        self.out, self.size, self.n = out, size, 0
        (out / "img").mkdir(parents=True, exist_ok=True)

    def image(self, scene: Scene) -> str:
        self.n += 1
        rel = f"img/{self.n:06d}.png"
        scene.render(self.size).quantize(colors=16).save(self.out / rel, optimize=True)
        return rel


def build_dataset(out_dir, n: int, seed: int, size: int = 64, held_out=HELD_OUT, n_eval: int = 300,
                  relation_pairs: bool = False, position_reasons: bool = False, where_turns: bool = False,
                  caption_turns: bool = False, where_chats: bool = False, position_scan: bool = False) -> dict:
    """Write every training manifest (about n records per kind), describe_chat.jsonl (`write_describe_chats`) and the
    held-out evaluation sets.

    `caption_turns`: a quarter of the SFT chats about a scene also ask "Describe the image in detail." (without
    it, SFT erases the captioning that stage II taught). `where_turns`: the other chats about a scene (all of them
    without `caption_turns`) also ask where two of its nameable objects are (`where_questions`). Caption and where
    turns are never in one chat, which keeps every chat within 256 tokens. Both touch only chat.jsonl (their own
    random stream), so the images and every other manifest stay the same.

    `where_chats`: also where_chat.jsonl, the data of the chain's where stage: for every scene of two or more
    objects, one chat that asks where each of its nameable objects is (`where_questions`), in a random order of
    their own stream; no other manifest changes.

    `position_reasons`: position questions are answered with the rows or columns first (`position_answer`), in
    training and in the evaluation set (which is scored on the final yes or no, `final_answer`).

    `position_scan`: position questions are answered with every object's place in reading order first, then as with
    `position_reasons` (`scan_questions`), in training and in the evaluation set; and scan_chat.jsonl, the data of
    the chain's scan stage: for every scene of two or more objects, single-turn chats of `LIST_QUESTION` and of up
    to four scanned position questions (their own random stream).

    `relation_pairs`: also two-shape scenes with position questions in contrasting pairs (off by default: the one
    full chain trained with them, 2026-12-02, left position at chance, 0.53, and lost elsewhere: understanding 0.85
    against 0.95, shape 0.83 against 0.99, generation 0.91 against 0.93)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Evaluation prompts come first, from their own random stream (held-out combinations allowed and flagged),
    # so that training can avoid them: prompts of the categories with many possible prompts (two objects,
    # position, colour attribution) never occur in training. Single-object, colour and counting prompts are too
    # few to reserve (21, 18 and 63 in all); for those the report says how many were seen in training.
    erng = random.Random(seed * 7919 + 17)
    geneval = []
    for cat in CATEGORIES:
        seen: set[str] = set()
        for _ in range(4000):
            if len(seen) >= n_eval // len(CATEGORIES):
                break
            spec = random_spec(erng, cat, held_out, allow_held_out=True)
            prompt = spec_text(spec)
            if prompt in seen:
                continue
            seen.add(prompt)
            held = any((o.get("color"), o["shape"]) in set(held_out) for o in spec["objects"])
            geneval.append({"prompt": prompt, "category": cat, "spec": spec, "held_out": held})
    reserved = {g["prompt"] for g in geneval if g["category"] not in OPEN_CATEGORIES}

    rng = random.Random(seed)
    srng = random.Random(seed * 7_919 + 23)  # single-object questions (their own stream: the rest stays the same)
    prng = random.Random(seed * 7_919 + 29)  # two-shape relation questions (likewise)
    crng = random.Random(seed * 7_919 + 31)  # which chats get a caption turn (likewise)
    wrng = random.Random(seed * 7_919 + 7)  # the order of the where chats' questions (likewise)
    scrng = random.Random(seed * 7_919 + 37)  # the scan chats' position questions (likewise)
    w = _Writer(out, size)
    rec: dict[str, list[dict]] = {k: [] for k in ("caption", "caption_qa", "vqa", "class_to_image", "text_to_image",
                                                  "interleaved", "text", "chat", "chat_image")}
    if where_chats:
        rec["where_chat"] = []
    if position_scan:
        rec["scan_chat"] = []
    train_prompts = set()
    for i in range(n):
        scene = random_scene(rng, held_out)
        img = w.image(scene)
        sd = scene.to_dict()
        cap = caption(scene)
        rec["caption"].append({"kind": "caption", "image": img, "text": cap, "scene": sd})
        rec["caption_qa"].append({"kind": "caption_qa", "image": img, "question": CAPTION_QUESTION,
                                  "answer": cap, "scene": sd})
        qs = questions(scene, rng, held_out, reasons=position_reasons, scan=position_scan)
        for q in qs:
            rec["vqa"].append({"kind": "vqa", "image": img, **q, "scene": sd})
        # SFT chats are multi-turn, as in LLaVA-style data: every question about the image, in a random order (its
        # own stream, so the rest of the data does not depend on it), each answer a loss target. Several answers per
        # image make a step's understanding samples carry several times the supervision for a few more tokens.
        chat_qs = list(qs)
        where_qs = where_questions(scene)
        if caption_turns and crng.random() < 0.25:
            chat_qs.append({"question": CAPTION_QUESTION, "answer": cap, "qtype": "caption"})
        elif where_turns:
            chat_qs += crng.sample(where_qs, min(2, len(where_qs)))
        rec["chat"].append(_chat_record(img, chat_qs, random.Random(seed * 1_000_003 + i), sd))
        if where_chats and len(scene.objects) >= 2 and where_qs:
            rec["where_chat"].append(_chat_record(img, where_qs, wrng, sd))
        if position_scan:
            rec["scan_chat"] += [_chat_record(img, [q], scrng, sd) for q in scan_questions(scene, scrng)]
        # generation: a GenEval-style prompt, a class name, and sometimes a full caption as the prompt
        spec = random_spec(rng, CATEGORIES[i % len(CATEGORIES)], held_out)
        while spec_text(spec) in reserved:
            spec = random_spec(rng, CATEGORIES[i % len(CATEGORIES)], held_out)
        gscene = scene_for_spec(spec, rng, held_out, allow_held_out=False)
        gimg = w.image(gscene)
        prompt = spec_text(spec)
        train_prompts.add(prompt)
        rec["text_to_image"].append({"kind": "text_to_image", "text": prompt, "image": gimg, "spec": spec,
                                     "scene": gscene.to_dict()})
        if i % 4 == 0:
            rec["text_to_image"].append({"kind": "text_to_image", "text": caption(gscene), "image": gimg,
                                         "scene": gscene.to_dict()})
        if i % 3 == 0:
            rec["chat_image"].append({"kind": "chat", "messages": [
                {"role": "user", "content": f"Draw {prompt}."},
                {"role": "assistant", "content": "", "images": [gimg]}], "scene": gscene.to_dict()})
        one = random_scene(rng, held_out, n=1)
        o = one.objects[0]
        one_img = w.image(one)
        rec["class_to_image"].append({"kind": "class_to_image", "text": o.name(with_size=rng.random() < 0.5),
                                      "image": one_img, "scene": one.to_dict()})
        if i % 2 == 0:
            # The understanding analogue of class names: questions about a lone shape (its colour, its shape, is
            # there a ...), from a stream of their own. In the mixture alone the model never learned to read
            # colour (chance even on training images), while 100 steps on lone shapes taught it.
            lone = questions(one, srng, held_out)
            rec["vqa"] += [{"kind": "vqa", "image": one_img, **q, "scene": one.to_dict()} for q in lone]
            rec["chat"].append(_chat_record(one_img, lone, srng, one.to_dict()))
        if relation_pairs and i % 3 == 1:
            # The same for relations: on two-shape scenes, position questions in contrasting pairs (A above B: yes,
            # B above A: no). One such question per mixed scene left every model at chance on position.
            pair = random_scene(prng, held_out, n=2)
            rel_qs = relation_questions(pair, prng)
            if rel_qs:
                pair_img = w.image(pair)
                rec["vqa"] += [{"kind": "vqa", "image": pair_img, **q, "scene": pair.to_dict()} for q in rel_qs]
                rec["chat"].append(_chat_record(pair_img, rel_qs, prng, pair.to_dict()))
        if i % 2 == 0:
            scenes = [random_scene(rng, held_out) for _ in range(rng.choice((2, 3)))]
            segs = [{"text": "Some pictures of shapes."}]
            for k, s in enumerate(scenes):
                segs += [{"image": w.image(s)}, {"text": f"Picture {k + 1}. {caption(s)}"}]
            rec["interleaved"].append({"kind": "interleaved", "segments": segs, "scene": [s.to_dict() for s in scenes]})
        rec["text"].append({"kind": "text", "text": text_document(rng, held_out)})
    for kind, rows in rec.items():
        _write_jsonl(out / f"{kind}.jsonl", rows)
    n_describe = write_describe_chats(out, seed)

    for g in geneval:
        g["in_training"] = g["prompt"] in train_prompts
    vqa = []
    for k in range(n_eval // 2):
        scene = random_scene(erng, held_out, allow_held_out=True)
        if k % 4 == 3:  # make sure held-out pairs are represented
            c, s = erng.choice(held_out)
            scene.objects[0].color, scene.objects[0].shape = c, s
        img = w.image(scene)
        held = bool(scene.combos() & set(held_out))
        for q in questions(scene, erng, held_out, allow_held_out=True, reasons=position_reasons, scan=position_scan):
            vqa.append({"image": img, **q, "held_out": held, "scene": scene.to_dict()})
    _write_jsonl(out / "eval_geneval.jsonl", geneval)
    _write_jsonl(out / "eval_vqa.jsonl", vqa)
    summary = {"seed": seed, "size": size, "held_out": [list(h) for h in held_out], "images": w.n,
               **{k: len(v) for k, v in rec.items()}, "describe_chat": n_describe, "eval_geneval": len(geneval),
               "eval_vqa": len(vqa)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def write_describe_chats(data_dir, seed: int) -> int:
    """Write DATA/describe_chat.jsonl, the data of the chain's describe stage, from DATA/caption.jsonl: for every
    training scene one single-turn chat that asks for its detailed caption (`CAPTION_QUESTION`, answered with the
    caption stage II learnt) and one that asks for the list of its shapes (`LIST_QUESTION`, answered with
    `scan_answer`), in a random order of their own stream. SFT chats about counts, colours and places erase both
    skills; these bring them back. Returns the number of chats."""
    data_dir = Path(data_dir)
    rows, one_order = [], random.Random(0)  # a one-question chat has one order: `one_order` draws nothing that matters
    for line in open(data_dir / "caption.jsonl"):
        r = json.loads(line)
        answers = {CAPTION_QUESTION: r["text"], LIST_QUESTION: scan_answer(Scene.from_dict(r["scene"]))}
        rows += [_chat_record(r["image"], [{"question": q, "answer": a}], one_order, r["scene"])
                 for q, a in answers.items()]
    random.Random(seed * 7_919 + 41).shuffle(rows)
    _write_jsonl(data_dir / "describe_chat.jsonl", rows)
    return len(rows)


def _chat_record(img: str, qs: list[dict], rng: random.Random, scene: dict) -> dict:
    """A multi-turn SFT chat about one image: every question in `qs`, in an order drawn from `rng`."""
    turns = []
    for k, q in enumerate(rng.sample(qs, len(qs))):
        first = {"images": [img]} if k == 0 else {}
        turns += [{"role": "user", "content": ("<image_placeholder>\n" if k == 0 else "") + q["question"], **first},
                  {"role": "assistant", "content": q["answer"]}]
    return {"kind": "chat", "messages": turns, "scene": scene}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


# ---------------------------------------------------------------------------------------------- CLI
def add_cli(sub) -> None:
    p = sub.add_parser("data", help="build datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("shapes", help="the procedural shapes world: every manifest kind plus evaluation sets")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=5000, help="scenes (about that many records per kind)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=64)
    s.set_defaults(func=lambda a: print(json.dumps(build_dataset(a.out, a.n, a.seed, a.size), indent=2)) or 0)
