"""Evaluation on the shapes world: a GenEval-style generation benchmark and a VQA / POPE-style understanding
benchmark, both on held-out prompts and images, with held-out colour-shape pairs reported separately; beside them,
outside the understanding score, where the model places a named object and how well it captions.

GenEval (Ghosh et al. 2023) scores each generated image by detecting its objects; a prompt category's accuracy
is the fraction of correct images, and the overall score is the mean of the category accuracies.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

from ..data.world import CAPTION_QUESTION, CATEGORIES, RELATIONS, Scene, caption, final_answer, position_answer, \
    scene_for_spec, where_questions
from ..vq import to_uint8
from .shapescore import check_prompt, detect


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def geneval(janus, prompts: list[dict], n: int = 4, cfg_weight: float | None = None, seed: int = 0, batch: int = 8,
            keep: int = 0, cfg_cutoff: float | None = None) -> dict:
    """Per-category accuracy over `n` images per prompt; overall = mean of category accuracies.

    `cfg_weight` / `cfg_cutoff` None: the model's own defaults (`janus.generation`)."""
    results, samples = [], []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        out = janus.generate_images([p["prompt"] for p in chunk], n=n, cfg_weight=cfg_weight, cfg_cutoff=cfg_cutoff,
                                    seed=seed + i)
        for k, p in enumerate(chunk):
            for j in range(n):
                img = out.images[k * n + j]
                ok = check_prompt(p["spec"], detect(img))
                results.append((p["category"], p.get("held_out", False), ok, p.get("in_training", False)))
                if len(samples) < keep and j == 0:
                    samples.append((img, p["prompt"], ok))
    return _summarise(results) | {"samples": samples}


def _summarise(results) -> dict:
    def block(rows):
        by = defaultdict(list)
        for cat, _, ok, _ in rows:
            by[cat].append(ok)
        cats = {c: _mean(by[c]) for c in CATEGORIES if by[c]}
        return {"overall": _mean(cats.values()), "categories": cats, "images": len(rows)}

    return {"seen": block([r for r in results if not r[1]]), "held_out": block([r for r in results if r[1]]),
            "novel": block([r for r in results if not r[3]]), "all": block(results)}


def _ask(janus, asks: list[tuple[str, str]], data_dir: Path, max_new_tokens: int, batch: int = 16) -> list[str]:
    """Greedy replies to single-turn questions about images: `asks` holds (image path under data_dir, question)."""
    replies = []
    for i in range(0, len(asks), batch):
        convs = [[{"role": "user", "content": f"<image_placeholder>\n{q}",
                   "images": [Image.open(data_dir / im).convert("RGB")]},
                  {"role": "assistant", "content": ""}] for im, q in asks[i:i + batch]]
        replies += [r.text for r in janus.chat_batch(convs, max_new_tokens=max_new_tokens, temperature=0)]
    return replies


_POSITION = re.compile(r"Is the (\w+) (\w+) (" + "|".join(RELATIONS) + r") the (\w+) (\w+)\?")
_PLACE = re.compile(r"(?:row|column) (\d+)")


def reason_check(record: dict, reply: str) -> tuple[bool, bool] | None:
    """A position answer given with its reason ("The red circle is in row 1 and the blue square is in row 3, so
    yes."), taken apart: (both rows or columns named right, the yes or no follows from the two named). Separates
    finding where each named object is from comparing the two places. None for other questions and replies."""
    m = _POSITION.fullmatch(record["question"])
    reply = reply.strip().split(". ")[-1]  # a scanned answer (`world.scan_answer` first): its last sentence
    named = _PLACE.findall(reply)
    if record["qtype"] != "position" or not m or ", so " not in reply or len(named) != 2:
        return None
    ca, sa, rel, cb, sb = m.groups()
    objs = Scene.from_dict(record["scene"]).objects
    a, b = (next(o for o in objs if (o.color, o.shape) == name) for name in ((ca, sa), (cb, sb)))
    x, y = map(int, named)
    follows = x < y if rel in ("above", "to the left of") else x > y  # rows count down, columns right
    return named == _PLACE.findall(position_answer(a, rel, b)), (final_answer(reply) == "yes") == follows


def understanding(janus, records: list[dict], data_dir: Path, batch: int = 16) -> dict:
    # Room for a scanned position answer (`world.scan_questions`: up to ~100 tokens about four shapes); answers stop at
    # the end-of-sequence token, so short ones cost nothing more.
    replies = _ask(janus, [(r["image"], r["question"]) for r in records], data_dir, max_new_tokens=128, batch=batch)
    # Reasoned answers ("The red circle is in row 1 and ..., so yes.") are scored on their final yes or no.
    rows = [(r, final_answer(text), reason_check(r, text)) for r, text in zip(records, replies)]

    def block(sel):
        by = defaultdict(list)
        for r, a, _ in sel:
            by[r["qtype"]].append(a == final_answer(r["answer"]))
        exist = [(final_answer(r["answer"]), a) for r, a, _ in sel if r["qtype"] == "exist"]
        reasons = [c for _, _, c in sel if c is not None]
        tp = sum(g == "yes" and a == "yes" for g, a in exist)
        fp = sum(g == "no" and a == "yes" for g, a in exist)
        fn = sum(g == "yes" and a != "yes" for g, a in exist)
        prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
        return {"accuracy": _mean(ok for v in by.values() for ok in v), "per_type": {k: _mean(v) for k, v in by.items()},
                "pope": {"accuracy": _mean(g == a for g, a in exist), "precision": prec, "recall": rec,
                         "f1": 2 * prec * rec / max(prec + rec, 1e-9), "yes_ratio": _mean(a == "yes" for _, a in exist)},
                "questions": len(sel),
                "reasons": {"answers": len(reasons), "places_right": _mean(p for p, _ in reasons),
                            "follows": _mean(f for _, f in reasons)} if reasons else None}

    return {"seen": block([x for x in rows if not x[0]["held_out"]]),
            "held_out": block([x for x in rows if x[0]["held_out"]]), "all": block(rows)}


_CELL = re.compile(r"row (\d+) and column (\d+)")


def places_and_captions(janus, records: list[dict], data_dir: Path, batch: int = 16) -> dict:
    """On each evaluation image (scenes without held-out pairs): "Where is the <colour> <shape>?" for every object the
    phrase picks out, right when the reply's row and column are the object's cell (by the scene's object count), and
    "Describe the image in detail.", scored by the share of the caption's sentences the reply holds word for word
    (`sentences`) and of replies that are the whole caption (`exact`). Not part of the understanding score: a model
    trained without such turns is not expected to answer them."""
    scenes = {}
    for r in records:
        if not r["held_out"]:
            scenes.setdefault(r["image"], Scene.from_dict(r["scene"]))
    asks = [(im, len(sc.objects), q["question"], q["answer"]) for im, sc in scenes.items() for q in where_questions(sc)]
    asks += [(im, 0, CAPTION_QUESTION, caption(sc)) for im, sc in scenes.items()]
    where, sentences, exact = defaultdict(list), [], []
    replies = _ask(janus, [(im, q) for im, _, q, _ in asks], data_dir, max_new_tokens=96, batch=batch)
    for (_, n, _, want), text in zip(asks, replies):
        got = text.strip()
        if n:
            cell = _CELL.search(got)
            where[n].append(cell is not None and cell.groups() == _CELL.search(want).groups())
        else:
            sentences += [t in got for t in re.split(r"(?<=\.) ", want)]
            exact.append(got == want)
    return {"where": {"by_objects": {n: _mean(v) for n, v in sorted(where.items())},
                      "all": _mean(x for v in where.values() for x in v), "questions": sum(map(len, where.values()))},
            "caption": {"sentences": _mean(sentences), "exact": _mean(exact), "images": len(exact)}}


@torch.inference_mode()
def scorer_validation(janus, prompts: list[dict], seed: int = 0) -> dict:
    """The scorer on ground-truth renders (its accuracy) and on their VQ reconstructions (the generator's ceiling)."""
    rng = random.Random(seed)
    vq, proc = janus.model.gen_vision_model, janus.processor
    size = janus.config.vq.image_size
    gt = rec = 0
    for p in prompts:
        img = scene_for_spec(p["spec"], rng).render(size)
        gt += check_prompt(p["spec"], detect(img))
        x = proc.generation_transform(img, size=size)[None].to(janus.device, janus.dtype)
        # converted as generated images are (to_uint8), so this is the ceiling of what generation can score
        rec += check_prompt(p["spec"], detect(to_uint8(vq.decode_codes(vq.encode(x)))[0]))
    return {"ground_truth": gt / len(prompts), "vq_reconstruction": rec / len(prompts), "n": len(prompts)}


def grid(samples, cols: int = 8, cell: int = 96) -> Image.Image:
    rows = (len(samples) + cols - 1) // cols
    out = Image.new("RGB", (cols * cell, rows * cell), (255, 255, 255))
    for i, (img, _, ok) in enumerate(samples):
        tile = img.resize((cell - 4, cell - 4), Image.NEAREST)
        frame = Image.new("RGB", (cell, cell), (40, 170, 60) if ok else (210, 40, 40))
        frame.paste(tile, (2, 2))
        out.paste(frame, ((i % cols) * cell, (i // cols) * cell))
    return out


def run_eval(janus, data_dir: Path, out_dir: Path, n: int = 4, cfg_weights=(1.0, 3.0, 5.0, 7.0),
             max_prompts: int | None = None, max_questions: int | None = None, seed: int = 0) -> dict:
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = _read(data_dir / "eval_geneval.jsonl")[:max_prompts]
    questions = _read(data_dir / "eval_vqa.jsonl")[:max_questions]
    t = time.time()
    default_w, cutoff = janus.generation.cfg_weight, janus.generation.cfg_cutoff
    main = geneval(janus, prompts, n=n, seed=seed, keep=32)
    ablation = {w: (main if w == default_w else geneval(janus, prompts, n=n, cfg_weight=w, seed=seed))["all"]["overall"]
                for w in cfg_weights}
    # The same weights decoded the official way (every token kept), when the model's default cuts the tail.
    uncut = {w: geneval(janus, prompts, n=n, cfg_weight=w, cfg_cutoff=0.0, seed=seed)["all"]["overall"]
             for w in cfg_weights} if cutoff > 0 else None
    und = understanding(janus, questions, data_dir)
    extra = places_and_captions(janus, questions, data_dir)
    val = scorer_validation(janus, prompts[:120])
    report = {"geneval": {k: v for k, v in main.items() if k != "samples"}, "cfg_weight": default_w,
              "cfg_cutoff": cutoff, "cfg_ablation": ablation, "cfg_ablation_no_cutoff": uncut,
              "understanding": und, "places_and_captions": extra, "scorer": val, "seconds": round(time.time() - t, 1)}
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2))
    grid(main["samples"]).save(out_dir / "samples.png")
    (out_dir / "report.md").write_text(markdown(report))
    return report


def markdown(r: dict) -> str:
    g, u = r["geneval"], r["understanding"]
    default_w, cut = r.get("cfg_weight", 5.0), r.get("cfg_cutoff", 0.0)
    lines = ["# januskit evaluation (shapes world)", "",
             f"## Generation (GenEval-style, the model's default decoding: CFG {default_w:g}, cutoff {cut:g})", "",
             "| split | overall | " + " | ".join(CATEGORIES) + " |", "|---" * (len(CATEGORIES) + 2) + "|"]
    for split in ("seen", "held_out", "novel", "all"):
        cats = g[split]["categories"]
        lines.append(f"| {split} | {g[split]['overall']:.3f} | "
                     + " | ".join(f"{cats[c]:.2f}" if c in cats else "-" for c in CATEGORIES) + " |")
    lines += ["", "Splits: `seen` = prompts without held-out colour-shape pairs, `held_out` = prompts naming one, `novel` ="
              " prompts that occur in no training sample (every two-object, position and colour-attribution prompt;"
              " single-object, colour and counting prompts are too few to reserve), `all` = every prompt.", "",
              f"CFG ablation (overall, all prompts, same seeds, cutoff {cut:g}): "
              + ", ".join(f"w={w:g}: {v:.3f}" for w, v in r["cfg_ablation"].items()), ""]
    if r.get("cfg_ablation_no_cutoff"):
        lines += ["Without the cutoff (every token kept, the official decoding): "
                  + ", ".join(f"w={w:g}: {v:.3f}" for w, v in r["cfg_ablation_no_cutoff"].items()), ""]
    lines += ["## Understanding", "", "| split | accuracy | count | color | shape | position | exist | POPE acc | "
              "POPE F1 | yes-ratio |", "|---" * 10 + "|"]
    for split in ("seen", "held_out", "all"):
        b = u[split]
        pt = b["per_type"]
        lines.append(f"| {split} | {b['accuracy']:.3f} | " + " | ".join(
            f"{pt[k]:.2f}" if k in pt else "-" for k in ("count", "color", "shape", "position", "exist"))
            + f" | {b['pope']['accuracy']:.3f} | {b['pope']['f1']:.3f} | {b['pope']['yes_ratio']:.2f} |")
    why = u["seen"].get("reasons")
    if why:
        lines += ["", f"Position answers given with their reason (seen): {why['answers']}; both rows or columns named "
                  f"right in {why['places_right']:.2f} of them, the yes or no follows from the two named in "
                  f"{why['follows']:.2f}."]
    pc = r.get("places_and_captions")
    if pc:
        w, c = pc["where"], pc["caption"]
        per_count = ", ".join(f"{n} object{'s' if int(n) > 1 else ''}: {v:.2f}" for n, v in w["by_objects"].items())
        lines += ["", "Outside the score (images without held-out pairs): \"Where is the <colour> <shape>?\" answered "
                  f"with the object's row and column: {w['all']:.3f} of {w['questions']} ({per_count}); \"Describe the "
                  f"image in detail.\": {c['sentences']:.3f} of the caption sentences said word for word, "
                  f"{c['exact']:.3f} of {c['images']} captions whole."]
    s = r["scorer"]
    lines += ["", f"Scorer: {s['ground_truth']:.3f} correct on ground-truth renders, {s['vq_reconstruction']:.3f} on "
              f"their VQ reconstructions (the generator's ceiling), {s['n']} prompts.", ""]
    return "\n".join(lines)
