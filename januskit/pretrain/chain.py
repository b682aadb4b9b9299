"""The whole chain that makes the bundled model, from nothing: world data -> tokenizer -> VQ -> SigLIP -> LLM ->
assembled stage-0 checkpoint -> VQ code cache -> stages I, II, III (the trainer, Janus-Pro ratios) -> the describe
stage (stage III's mixture with caption and list chats, `ChainSize.describe_steps`) -> export.

Every step writes into OUT and is skipped when its output is already there, so an interrupted chain resumes.
`fast=True` shrinks every step to seconds (tests).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import preset
from ..data.world import GRID, build_dataset, random_scene, write_describe_chats
from ..processor import JanusProcessor
from ..weights import build_on_meta, init_weights, load_into, write_json
from .cells import cell_labels

log = logging.getLogger(__name__)


@dataclass
class ChainSize:
    scenes: int = 5000
    vq_steps: int = 1500
    siglip_steps: int = 500
    llm_steps: int = 500
    stage_steps: tuple[int, int, int] = (150, 400, 400)
    where_steps: int = 300  # the where stage between II and III (`where_stage`)
    # `position_scan`: the scan chats run as a stage of their own (scan_steps, recipe shapes-scan-stage3) between
    # stages II and III; with scan_weight > 0 they join stage III's understanding sources at that weight (chat's is 1)
    # and stage III runs scan_steps more steps instead. Mixed in at weight 2 for 6000 stage III steps (chain 67
    # minutes against 102), the yes or no did not follow the scan and colour and shape fell to 0.67 (README).
    scan_steps: int = 300
    scan_weight: float = 0.0
    scan_stage3_steps: int = 0  # stage III's steps after a scan stage (0: stage_steps[2])
    # The describe stage after stage III (recipe shapes-describe-stage3; 0: none): stage III's mixture with caption
    # and list chats beside the others, which stage III's chats had made the model forget.
    describe_steps: int = 0
    global_batch: int = 64
    vq_lr: float = 1e-3
    vq_ae_warmup: float = 0.6
    vq_images: int = 12000
    vq_merge_steps: int = 300


# Stage III (5 understanding : 1 text : 4 generation, multi-turn chats of ~5 answers each) teaches understanding far
# faster a step than stage II (about one answer a sample): 2000 steps moved from II to III (6000/2000 -> 4000/3000)
# lifted understanding 0.75 -> 0.88 (POPE F1 0.67 -> 0.87), and 2000 more stage III steps on top of that model
# 0.87 -> 0.94 (POPE F1 0.76 -> 0.93, held-out pair 0.69 -> 0.80) with generation unchanged (0.93 with the guidance
# cutoff); stage II gave up 1500 steps to pay for part of it (about 8 of the chain's minutes).
# The scan stage: 4000 steps (fine-tunes of the model shipped before it: 3000 had not brought the yes or no, 4000 did).
# Stage III after it: 2500 steps (chain 81 minutes against 102) left understanding 0.94 with the held-out pair's scenes
# counted in (against 0.96) and generation 0.91 (0.92), position lower in both; 4200 and the describe stage's 800 after
# them (the same steps as 5000 alone, 2026-12-08) gave understanding 0.979, generation 0.92 and captions.
FULL = ChainSize(scenes=30000, vq_steps=3000, siglip_steps=300, llm_steps=200, stage_steps=(300, 2500, 5000),
                 global_batch=32, vq_ae_warmup=0.75, where_steps=1500, scan_steps=4000, scan_stage3_steps=4200,
                 describe_steps=800)
FAST = ChainSize(scenes=40, vq_steps=6, siglip_steps=4, llm_steps=4, stage_steps=(2, 2, 2), global_batch=8,
                 vq_images=32, vq_merge_steps=2, where_steps=2, scan_steps=2, describe_steps=2)

# The exported model's guidance cutoff (generation.json, `sampling.cfg_merge`). The conditional model of this
# world is nearly certain of each code, and w = 5 over every code lost to w = 1 (0.80 against 0.89): where the
# unconditional row is confident, guidance boosts codes the prompt leaves at ~1e-3 above the right one. Guiding
# only among codes within 10x of the conditional top code: w = 5 0.93 against w = 1 0.89 (0.92 / 0.90, seed-7 world).
SHAPES_CFG_CUTOFF = 0.1


class _Timings(dict):
    """Seconds per chain step, written to OUT/timings.json as each step ends: a resumed chain keeps the times of the
    steps an earlier call ran (a step skipped now is not timed again; a stage resumed from a checkpoint records the
    resumed part)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            earlier = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            earlier = None
        if not isinstance(earlier, dict):  # not JSON, or JSON but not an object of step times
            log.warning("chain: %s is unreadable; earlier step times are lost", path)
            earlier = {}
        super().__init__(earlier)

    def __setitem__(self, name: str, seconds: float) -> None:
        super().__setitem__(name, seconds)
        write_json(self.path, dict(self))


def _step(out: Path, name: str, timings: dict):
    """Decorator-like helper: run fn unless OUT/name/.done exists; record the time."""

    def run(fn):
        d = out / name
        if (d / ".done").exists():
            log.info("chain: %s already done", name)
            return d
        d.mkdir(parents=True, exist_ok=True)
        t = time.time()
        info = fn(d) or {}
        timings[name] = round(time.time() - t, 1)
        (d / ".done").write_text(json.dumps(info, indent=2))
        log.info("chain: %s done in %.0fs %s", name, timings[name], info)
        return d

    return run


def run_chain(out: Path, seed: int = 0, fast: bool = False, size: ChainSize | None = None,
              factored_head: bool = False, position_reasons: bool = False, image_pos_embed: bool = False,
              where_turns: bool = False, caption_turns: bool = False, where_stage: bool = False,
              position_scan: bool = False) -> Path:
    """Run (or resume) the chain; returns the exported model directory.

    `factored_head`: the image head's last layer scores a code as the sum of its shape, colour and size
    (`cells.factored_head`), frozen in every stage, so that the held-out pair can be drawn from what the other codes
    taught about its attributes (experimental; an OUT keeps the choice it was started with).

    `position_reasons`: the data answers position questions with the two rows or columns before the yes or no
    (`world.position_answer`); likewise kept by an OUT, as are `where_turns` (SFT chats also ask where each object
    is, `world.where_questions`) and `caption_turns` (a quarter of the SFT chats also ask for a detailed caption).

    `where_stage`: between stages II and III, a stage of chats that ask only where each named object is
    (recipe shapes-where-stage3, data where_chat.jsonl, OUT/where); likewise kept by an OUT.

    `position_scan`: position questions are answered with every object's place in reading order, then the two rows
    or columns and the yes or no (`world.scan_questions`), and between stages II and III (after a where stage) a
    stage of chats that list the shapes or answer a position question that way (recipe shapes-scan-stage3, data
    scan_chat.jsonl, OUT/scan); likewise kept by an OUT.

    `image_pos_embed`: the model adds a learned table of patch positions to the understanding features after the
    aligner (`JanusConfig.image_pos_embed`, a januskit extension), seeded with 2-D sine-cosine codes of unit norm;
    likewise kept by an OUT."""
    from ..api import GenerationDefaults
    from . import llm as llm_mod
    from . import siglip as siglip_mod
    from . import tokenizer as tok_mod
    from . import vq as vq_mod

    if position_reasons and position_scan:
        raise ValueError("position answers are either reasoned (--position-reasons) or scanned (--position-scan), "
                         "not both")
    size = size or (FAST if fast else FULL)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings = _Timings(out / "timings.json")
    torch.manual_seed(seed)

    def data_step(d):
        info = build_dataset(d, size.scenes, seed, n_eval=60 if fast else 300, position_reasons=position_reasons,
                             where_turns=where_turns, caption_turns=caption_turns, where_chats=where_stage,
                             position_scan=position_scan)
        return {**info, "position_reasons": position_reasons, "where_turns": where_turns,
                "caption_turns": caption_turns, "where_stage": where_stage, "position_scan": position_scan}

    data = _step(out, "data", timings)(data_step)
    _kept_choice(out, data, "position_reasons", position_reasons, "position reasons")
    _kept_choice(out, data, "where_turns", where_turns, "where turns")
    _kept_choice(out, data, "caption_turns", caption_turns, "caption turns")
    _kept_choice(out, data, "where_stage", where_stage, "the where stage")
    _kept_choice(out, data, "position_scan", position_scan, "scanned position answers")
    tokdir = _step(out, "tokenizer", timings)(
        lambda d: tok_mod.train_tokenizer(data).save_pretrained(d) or {})
    proc = JanusProcessor.from_pretrained(tokdir)
    vocab = proc.tokenizer.get_vocab_size()
    config = preset("januskit-shapes")
    config.llm.vocab_size = vocab
    config.image_pos_embed = image_pos_embed

    def vq_step(d):
        # The tokenizer's images: scenes of the same world but denser (1-16 shapes), as a tokenizer is trained on
        # broad image data: several times more shape pixels a step, and GroupNorm statistics that are not all
        # background. They include the held-out pairs (images only, no text), as LlamaGen's VQ saw all of ImageNet:
        # the generator can draw a purple triangle only if the LLM composes "purple" and "triangle" itself.
        rng = random.Random(seed + 1)
        dense = [random_scene(rng, allow_held_out=True, n=rng.randint(1, GRID * GRID)) for _ in range(size.vq_images)]
        imgs = vq_mod.pil_to_tensor([s.render(config.vq.image_size) for s in dense])
        # Whole images (the mid-block attention and GroupNorm statistics see the whole grid), batch 8: ~0.2 s a
        # step on 2 cores. A plain-autoencoder warm-up learns colours and shapes first (exact gradients); k-means
        # on its latents then seeds the codebook and the rest of the steps train with quantisation. The semantic
        # loss (each latent must tell its cell's shape, colour and size) gets the small shapes right 3x sooner.
        labels = torch.stack([cell_labels(s) for s in dense])
        vq, stats = vq_mod.train_vq(imgs, config.vq, steps=size.vq_steps, batch=8, lr=size.vq_lr, seed=seed,
                                    ae_warmup=size.vq_ae_warmup, labels=labels)
        # One code per cell content: the codes that hold the same thing are merged and the decoder fine-tuned on
        # them, so the generator predicts what a cell holds and nothing else (2.2 bits of noise a cell before).
        stats["merge"] = vq_mod.merge_codes(vq, imgs, labels, steps=size.vq_merge_steps, seed=seed)
        # The generator's ceiling: how often the scorer reads a reconstruction right.
        prng = random.Random(seed + 2)
        probe = [random_scene(prng) for _ in range(200 if not fast else 8)]
        stats["reconstruction"] = vq_mod.reconstruction_accuracy(vq, probe)
        stats["code_entropy"] = vq_mod.code_entropy(vq, probe)
        save_file({f"gen_vision_model.{k}": v.contiguous() for k, v in vq.state_dict().items()}, str(d / "vq.safetensors"))
        return stats

    vqdir = _step(out, "vq", timings)(vq_step)

    def siglip_step(d):
        rows = [json.loads(line) for line in open(data / "caption.jsonl")]
        pixels = torch.stack([proc.understanding_transform(data / r["image"]) for r in rows])
        ids = [proc.encode(r["text"], add_bos=False) for r in rows]
        vision, stats = siglip_mod.train_siglip(pixels, ids, config.vision, vocab, proc.pad_id,
                                                steps=size.siglip_steps, seed=seed)
        # Gate: a linear probe must read every cell's shape, colour and size from the patch features.
        prng = random.Random(seed + 3)

        def probe_set(n):
            scenes = [random_scene(prng) for _ in range(n)]
            return (torch.stack([proc.understanding_transform(s.render(config.vision.image_size)) for s in scenes]),
                    torch.stack([cell_labels(s) for s in scenes]))

        stats["probe"] = siglip_mod.probe_accuracy(vision, probe_set(64 if fast else 1500), probe_set(16 if fast else 300),
                                                   steps=20 if fast else 300)
        save_file({f"vision_model.{k}": v.contiguous() for k, v in vision.state_dict().items()},
                  str(d / "siglip.safetensors"))
        return stats

    sigdir = _step(out, "siglip", timings)(siglip_step)

    def llm_step(d):
        docs = []
        for kind, key in (("text", "text"), ("caption", "text")):
            for line in open(data / f"{kind}.jsonl"):
                docs.append(proc.encode(json.loads(line)[key]) + [proc.eos_id])
        lm, stats = llm_mod.train_llm(docs, config.llm, steps=size.llm_steps, seed=seed)
        save_file({f"language_model.{k}": v.contiguous() for k, v in lm.state_dict().items()},
                  str(d / "llm.safetensors"))
        return stats

    llmdir = _step(out, "llm", timings)(llm_step)

    def assemble(d):
        from ..api import Janus

        model = init_weights(build_on_meta(config), seed=seed)
        sd = model.state_dict()
        for f in (vqdir / "vq.safetensors", sigdir / "siglip.safetensors", llmdir / "llm.safetensors"):
            sd.update(read_state_dict_file(f))
        load_into(build_on_meta(config), sd)  # strict check of names and shapes
        model.load_state_dict(sd)
        if image_pos_embed:
            # Unit norm, the scale of the aligner's output: the place of a patch as loud as what it shows.
            with torch.no_grad():
                d_model = config.llm.hidden_size
                grid = config.vision.image_size // config.vision.patch_size
                model.image_pos_embed.copy_(siglip_mod.sincos_2d(grid, d_model) / d_model ** 0.5)
        info = {"params": sum(p.numel() for p in model.parameters()), "factored_head": factored_head,
                "image_pos_embed": image_pos_embed}
        if factored_head:
            info["codes_with_content"] = _factor_head(model, seed, n=64 if fast else 2000)
        Janus(model, proc).save_pretrained(d)
        return info

    stage0 = _step(out, "stage0", timings)(assemble)
    _kept_choice(out, stage0, "image_pos_embed", image_pos_embed, "the image position table")
    _kept_choice(out, stage0, "factored_head", factored_head, "the factored image head")

    def codes_step(d):
        from ..data.codes import prepare_codes
        from ..vq import VQModel

        vq = VQModel(config.vq)
        vq.load_state_dict({k[len("gen_vision_model."):]: v for k, v in read_state_dict_file(vqdir / "vq.safetensors").items()})
        manifests = [data / f"{k}.jsonl" for k in ("class_to_image", "text_to_image", "chat_image")]
        return prepare_codes(manifests, vq.eval(), proc, d, root=data)

    codes = _step(out, "codes", timings)(codes_step)

    previous = stage0
    # Chats with caption or where turns, or a scanned position answer, reach ~220 tokens, past the recipe's 192-token
    # rows (plain chats ~150).
    longer = ["train.max_len=256"] if where_turns or caption_turns or position_scan else []
    frozen = [FACTORED_HEAD] if factored_head else []
    for stage, steps in zip((1, 2, 3), size.stage_steps):
        if stage == 3 and where_stage:
            previous = _run_stage(out, "where", "shapes-where-stage3", size.where_steps, previous, data, codes, size,
                                  timings, frozen=frozen)
        added = []
        if stage == 3 and position_scan and size.scan_weight > 0:
            steps += size.scan_steps
            added = [{"name": "scan_chat", "path": "scan_chat.jsonl", "group": "understanding",
                      "weight": size.scan_weight}]
        elif stage == 3 and position_scan:
            previous = _run_stage(out, "scan", "shapes-scan-stage3", size.scan_steps, previous, data, codes, size,
                                  timings, frozen=frozen)
            steps = size.scan_stage3_steps or steps
        previous = _run_stage(out, f"stage{stage}", f"shapes-stage{stage}", steps, previous, data, codes, size,
                              timings, frozen=frozen, extra=longer if stage == 3 else [], added_sources=added)
    if size.describe_steps:
        if not (data / "describe_chat.jsonl").exists():  # a world written before the describe stage existed
            write_describe_chats(data, seed)
        previous = _run_stage(out, "describe", "shapes-describe-stage3", size.describe_steps, previous, data, codes,
                              size, timings, frozen=frozen)
    final = out / "model"
    if not (final / "config.json").exists():
        shutil.copytree(previous, final, dirs_exist_ok=True)
    GenerationDefaults(cfg_cutoff=SHAPES_CFG_CUTOFF).write(final)
    return final


def _kept_choice(out: Path, step_dir: Path, key: str, wanted: bool, what: str) -> None:
    """An OUT keeps the experimental choices it was started with: `key` as recorded in a finished step's .done
    must equal what this call asks for."""
    made = json.loads((step_dir / ".done").read_text()).get(key, False)
    if made != wanted:
        raise ValueError(f"{out} was started {'with' if made else 'without'} {what}; "
                         f"resume it the same way or start another --out")


FACTORED_HEAD = "gen_head.vision_head.*"


def _factor_head(model, seed: int, n: int) -> int:
    """Set the image head's last layer to `cells.factored_head` of what each of the model's VQ codes holds, read
    from n scenes that include the held-out pairs (as the VQ's own training images did). Returns how many codes
    hold something."""
    from .cells import code_contents, factored_head
    from .vq import pil_to_tensor

    rng = random.Random(seed + 3)
    scenes = [random_scene(rng, allow_held_out=True, n=rng.randint(1, GRID * GRID)) for _ in range(n)]
    vq = model.gen_vision_model.eval()
    with torch.no_grad():
        pixels = pil_to_tensor([s.render(model.config.vq.image_size) for s in scenes])
        codes = torch.cat([vq.encode(x) for x in pixels.split(64)])
    contents = code_contents(codes, torch.stack([cell_labels(s) for s in scenes]), model.config.vq.codebook_size)
    head = model.gen_head.vision_head
    weight, bias = factored_head(contents, head.in_features, seed)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return int((contents >= 0).sum())


def read_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _run_stage(out: Path, name: str, recipe_name: str, steps: int, start: Path, data: Path, codes: Path,
               size: ChainSize, timings: dict, frozen: list[str] = (), extra: list[str] = (),
               added_sources: list[dict] = ()) -> Path:
    """Train `recipe_name` from `start` for `steps` into OUT/name (the recipe's data read from the chain's world,
    with `added_sources` after the recipe's own); a finished one is skipped, an interrupted one resumes."""
    from ..train import checkpoint
    from ..train.recipe import load_recipe

    run_dir = out / name
    final = run_dir / "final"
    if (final / "config.json").exists():
        return final
    recipe = load_recipe(recipe_name, [])
    overrides = [f"model.checkpoint={start}", f"output_dir={run_dir}", f"train.steps={steps}",
                 f"train.global_batch={size.global_batch}", f"data.codes={codes}"]
    sources = [{**s, "path": str(data / Path(s["path"]).name)} for s in [*recipe.data.sources, *added_sources]]
    overrides.append("data.sources=[" + ", ".join(_inline_table(s) for s in sources) + "]")
    if frozen:
        overrides.append(f"train.frozen={json.dumps(list(recipe.train.frozen) + list(frozen))}")
    overrides += extra
    load_recipe(recipe_name, overrides)  # a bad override fails here, before a process starts
    t = time.time()
    # An interrupted stage resumes from its newest checkpoint (written under run_dir/checkpoints/).
    resume = "latest" if checkpoint.latest_checkpoint(run_dir) is not None else None
    _train_in_own_process(recipe_name, overrides, resume)
    timings[name] = round(time.time() - t, 1)
    return final


def _inline_table(table: dict) -> str:
    """`table` as a TOML inline table (its values strings or numbers; a JSON string is a TOML basic string)."""
    return "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in table.items()) + "}"


def _train_in_own_process(recipe_name: str, overrides: list[str], resume: str | None) -> None:
    """`train(load_recipe(recipe_name, overrides), resume)` in a fresh (spawned) process. In the process that had
    run the chain's earlier steps, the same stage III steps took ~0.42 s against ~0.29 s in a new process (same
    start, data and numbers; the cause is not pinned down), so every stage starts clean."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=_train_entry, args=(recipe_name, overrides, resume),
                                                          name=recipe_name)
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"{recipe_name}: training stopped with exit code {child.exitcode} (its error is printed "
                           "above); run build-default again to resume from the stage's last checkpoint")


def _train_entry(recipe_name: str, overrides: list[str], resume: str | None) -> None:
    from ..train import loop
    from ..train.recipe import load_recipe

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    loop.train(load_recipe(recipe_name, overrides), resume=resume)


def install_default(model_dir: Path) -> Path:
    """Copy a trained model into the package (januskit/assets/default-model), weights stored in bfloat16."""
    from ..api import Janus, default_model_dir

    janus = Janus.from_pretrained(model_dir)
    dst = default_model_dir()
    janus.model.to(torch.bfloat16)
    janus.save_pretrained(dst)
    return dst
