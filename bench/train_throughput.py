"""Training throughput, in one run: tokens/s with and without packing, and with VQ codes encoded on the fly vs
read from a precomputed code cache.

    python bench/train_throughput.py                       # tiny preset, synthetic shapes dataset, CPU
    python bench/train_throughput.py --preset janus-pro-1b --processor /path/to/Janus-Pro-1B --device cuda \
        --max-len 4096 --global-batch 32 --micro-batch 4 --dtype bf16

tokens/s counts real (non-padding) tokens of a whole optimizer step, data building included (the mixture
prefetches the next step in a thread, so on-the-fly VQ encoding competes with the training step for the device
and the CPU cores). The model is randomly initialised: throughput does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from januskit.config import preset  # noqa: E402
from januskit.data.codes import prepare_codes  # noqa: E402
from januskit.train.loop import setup, train_step  # noqa: E402
from januskit.train.parallel import DistEnv  # noqa: E402
from januskit.train.recipe import Recipe  # noqa: E402

WORDS = "red blue green yellow circle square small large bright dark shape centred on a white background".split()


def make_dataset(root: Path, n_images: int, image_size: int, seed: int = 0) -> dict[str, Path]:
    """Shapes images with captions of varied length: captions (understanding), text, text-to-image."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    caps, gens, texts = [], [], []
    for i in range(n_images):
        im = Image.new("RGB", (image_size, image_size), tuple(rng.randrange(256) for _ in range(3)))
        d = ImageDraw.Draw(im)
        for _ in range(3):
            x, y = rng.randrange(image_size // 2), rng.randrange(image_size // 2)
            s = rng.randrange(image_size // 8, image_size // 2)
            d.ellipse((x, y, x + s, y + s), fill=tuple(rng.randrange(256) for _ in range(3)))
        name = f"images/{i:05d}.png"
        im.save(root / name)
        words = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
        caps.append({"kind": "caption", "image": name, "text": words(5, 60) + "."})
        gens.append({"kind": "text_to_image", "image": name, "text": words(3, 30)})
        texts.append({"kind": "text", "text": words(10, 200) + "."})
    paths = {}
    for key, recs in (("captions", caps), ("generation", gens), ("text", texts)):
        paths[key] = root / f"{key}.jsonl"
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in recs))
    return paths


def recipe_for(args, paths, out: Path, packing: bool, codes: str) -> Recipe:
    r = Recipe(name="bench", output_dir=str(out))
    r.model.preset, r.model.processor = args.preset, args.processor
    t = r.train
    t.stage, t.steps, t.global_batch, t.micro_batch, t.max_len = 3, args.steps + 1, args.global_batch, \
        args.micro_batch, args.max_len
    t.packing, t.dtype, t.device = packing, args.dtype, args.device
    r.checkpoint.every, r.feedback.tensorboard = 0, False
    r.data.codes = codes
    r.data.ratio = {"understanding": 2.0, "text": 3.0, "generation": 5.0}
    r.data.sources = [{"name": "captions", "path": str(paths["captions"]), "group": "understanding"},
                      {"name": "text", "path": str(paths["text"]), "group": "text"},
                      {"name": "generation", "path": str(paths["generation"]), "group": "generation"}]
    return r.validate()


def measure(args, paths, out: Path, packing: bool, codes: str) -> dict:
    run = setup(recipe_for(args, paths, out, packing, codes), DistEnv(device=torch.device(args.device)))
    train_step(run, 0)  # warm-up: allocator, kernels, first data step
    tokens = 0
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        stats = train_step(run, step)
        tokens += stats.tokens
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    run.data.close()
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--processor", default=str(ROOT.parent / "shared" / "fixtures" / "janus-official-tiny"),
                   help="directory with the tokenizer and processor files")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    config = preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_dataset(tmp / "data", args.images, config.vq.image_size)
        # The cache is made with the VQ the runs start from (same preset, same init seed).
        from januskit.train.checkpoint import init_model, load_processor

        model, _ = init_model(recipe_for(args, paths, tmp / "x", True, "").model)
        processor = load_processor(recipe_for(args, paths, tmp / "x", True, "").model, config)
        t0 = time.perf_counter()
        prepare_codes([paths["generation"]], model.gen_vision_model, processor, tmp / "codes",
                      image_size=config.vq.image_size, device=args.device)
        print(f"code cache for {args.images} images made in {time.perf_counter() - t0:.1f}s")
        del model

        # Rounds interleave the four settings; the best round of each counts (robust to a busy machine).
        results: dict[tuple, list[dict]] = {}
        for round_ in range(args.rounds):
            for packing in (True, False):
                for codes in ("cache", "on the fly"):
                    res = measure(args, paths, tmp / f"run-{round_}-{packing}-{codes[:2]}", packing,
                                  str(tmp / "codes") if codes == "cache" else "")
                    results.setdefault((packing, codes), []).append(res)
                    print(f"round {round_} | packing {'on ' if packing else 'off'} | codes {codes:10s} | "
                          f"{res['tokens_per_s']:10,.0f} tok/s ({res['seconds']:.2f}s)")

    r = {k: max(x["tokens_per_s"] for x in v) for k, v in results.items()}
    for (packing, codes), v in r.items():
        print(f"best: packing {'on ' if packing else 'off'} | codes {codes:10s} | {v:10,.0f} tok/s")
    print(f"packing speed-up:    {r[(True, 'cache')] / r[(False, 'cache')]:.2f}x (cache), "
          f"{r[(True, 'on the fly')] / r[(False, 'on the fly')]:.2f}x (on the fly)")
    print(f"code-cache speed-up: {r[(True, 'cache')] / r[(True, 'on the fly')]:.2f}x (packing), "
          f"{r[(False, 'cache')] / r[(False, 'on the fly')]:.2f}x (no packing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
