"""The GPU checks that a CPU-only machine cannot make, in one short script for a lent device (a few minutes).

1. Conformance on the device: the official tiny fixture's 576 greedy CFG image tokens, eager and with compiled
   decode steps (`compile=True`: CUDA graphs), float32.
2. janus-pro-1b, random weights built on the device, bf16: a CFG image decode step, eager against compiled, n = 1
   and n = 4 (each the marginal time of a step, as bench/inference.py measures it).
3. janus-pro-7b, random weights, bf16 with `low_memory=True` (the understanding encoder and the VQ model stay on the
   CPU except while they run): the peak GPU memory of generating one whole image (the target: under 16 GiB), and
   its time.

    python bench/gpu_check.py [--device cuda] [--fixture ../shared/fixtures/janus-official-tiny] [--skip-big]

Prints one line per figure and a JSON summary last. `--preset tiny --big-preset tiny --device cpu` runs the same
code in seconds (a smoke test of the script itself).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference import _marginal, _processor, _timeit  # noqa: E402  (the benchmark's timing and tokenizer)

from januskit import Janus  # noqa: E402
from januskit.config import preset  # noqa: E402
from januskit.generate import generate_image_tokens  # noqa: E402
from januskit.weights import build_on_meta, init_weights  # noqa: E402

PROMPT = "a red circle above a blue square"


def random_janus(name: str, device: torch.device, dtype: torch.dtype, low_memory: bool = False) -> Janus:
    """A preset with random weights in memory, placed as `Janus.from_pretrained` places a checkpoint."""
    cfg = preset(name)
    model = init_weights(build_on_meta(cfg), dtype=dtype, seed=0)
    for child, module in model.named_children():
        module.to("cpu" if low_memory and child in Janus.OFFLOADABLE else device)
    return Janus(model, _processor(cfg), device, dtype, low_memory=low_memory)


def conformance(fixture: Path, device: torch.device) -> dict:
    ref = json.loads((fixture / "reference_outputs.json").read_text())["t2i"]
    out = {}
    for compiled in (False, True):
        janus = Janus.from_pretrained(fixture, device=device, dtype=torch.float32, compile=compiled)
        tokens = janus.generate_images(ref["prompt"], cfg_weight=ref["cfg_weight"], temperature=0).tokens[0].tolist()
        same = sum(a == b for a, b in zip(tokens, ref["greedy_tokens"]))
        want = len(ref["greedy_tokens"])
        out["compiled" if compiled else "eager"] = f"{same}/{want} greedy tokens as the reference"
    return out


def step_times(janus: Janus, steps: int, device: torch.device) -> dict:
    """Seconds per CFG decode step beyond the first, eager and compiled, n = 1 and 4."""
    cond, uncond = janus.processor.generation_ids(PROMPT)
    out = {}
    for compiled in (False, True):
        for n in (1, 4):
            def run(k):
                gen = torch.Generator(device=device).manual_seed(0)
                return generate_image_tokens(janus.model, [cond], [uncond], janus.processor.pad_id, n=n,
                                             generator=gen, num_tokens=k, compiled=compiled)

            if compiled:
                run(steps + 1)  # compiles the graph of the timed run's cache size (`_marginal` warms up the other)
            step, _ = _marginal(run, steps, device)
            out[f"{'compiled' if compiled else 'eager'}_step_ms_n{n}"] = round(step * 1e3, 2)
    for n in (1, 4):
        out[f"compiled_speedup_n{n}"] = round(out[f"eager_step_ms_n{n}"] / out[f"compiled_step_ms_n{n}"], 2)
    return out


def low_memory_image(janus: Janus, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, result = _timeit(lambda: janus.generate_images(PROMPT, n=1, seed=0), device)
    out = {"seconds": round(seconds, 1), "image": list(result.images[0].size)}
    if device.type == "cuda":
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--fixture", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
                                            / "janus-official-tiny"))
    ap.add_argument("--preset", default="janus-pro-1b")
    ap.add_argument("--big-preset", default="janus-pro-7b")
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed (of 576)")
    ap.add_argument("--skip-big", action="store_true", help="leave out the low-memory 7B image")
    args = ap.parse_args()
    device = torch.device(args.device)
    summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else args.device}

    fixture = Path(args.fixture)
    if (fixture / "reference_outputs.json").is_file():
        summary["conformance"] = conformance(fixture, device)
    else:
        summary["conformance"] = f"skipped: no fixture at {fixture}"
    print("conformance:", summary["conformance"], flush=True)

    janus = random_janus(args.preset, device, torch.bfloat16)
    summary[args.preset] = step_times(janus, args.steps, device)
    print(f"{args.preset} bf16:", summary[args.preset], flush=True)
    del janus
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if not args.skip_big:
        janus = random_janus(args.big_preset, device, torch.bfloat16, low_memory=True)
        summary[f"{args.big_preset}_low_memory"] = low_memory_image(janus, device)
        print(f"{args.big_preset} bf16 low-memory, one image:", summary[f"{args.big_preset}_low_memory"], flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
