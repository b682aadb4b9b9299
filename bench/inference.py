"""Inference benchmark: januskit vs transformers' JanusForConditionalGeneration on the same random weights.

Builds the real architecture (default janus-pro-1b) with seeded random weights, writes it in both layouts, and
measures in one run, each implementation in its own subprocess (so peak memory is its own):
  - text-to-image decoding: image tokens/s for n=1 and n=4 (CFG doubles the rows), over --steps steps;
  - understanding: prefill time for one image plus a question (and its FLOP/s against the best GEMM of the same
    rows measured alone), then decode tokens/s;
  - peak resident memory;
  - the roofline: bytes of weights (plus KV cache) read per decode step / measured memory bandwidth, against a
    read probe before and after all the workers (roofline_*) and against each worker's own streamed read of its
    decoder weights just before and after the measurement (own_roofline_*, the same moment and memory).

    python bench/inference.py                         # bf16 and fp32 on CPU, janus-pro-1b
    python bench/inference.py --device cuda --preset janus-pro-7b --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------- setup
def build_checkpoint(preset_name: str, out: Path, seed: int = 0) -> None:
    """Random weights of a preset, saved in the official layout (januskit) and the transformers layout."""
    from januskit.config import preset
    from januskit.hf_layout import hf_config_dict, official_to_hf
    from januskit.weights import build_on_meta, init_weights, save_state_dict, write_json

    cfg = preset(preset_name)
    model = init_weights(build_on_meta(cfg), dtype=torch.bfloat16, seed=seed)
    sd = model.state_dict()
    proc = _processor(cfg)
    for layout in ("official", "hf"):
        d = out / layout
        d.mkdir(parents=True, exist_ok=True)
        if layout == "official":
            save_state_dict(sd, d)
            write_json(d / "config.json", cfg.to_official_dict())
        else:
            save_state_dict(official_to_hf(sd), d)
            hcfg = hf_config_dict(cfg)
            hcfg.update(image_token_id=proc.image_id)
            hcfg["text_config"].update(bos_token_id=proc.bos_id, eos_token_id=proc.eos_id, pad_token_id=proc.pad_id)
            write_json(d / "config.json", hcfg)
        proc.save_pretrained(d)


def _processor(cfg):
    """A byte-level BPE tokenizer with the Janus special tokens, sized to the preset's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from januskit.processor import JANUS_SPECIAL_TOKENS, JanusProcessor

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=JANUS_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What is in the image? A red circle above a blue square."] * 10, trainer)
    bos = tok.token_to_id(JANUS_SPECIAL_TOKENS[0])
    tok.post_processor = processors.TemplateProcessing(single=f"{JANUS_SPECIAL_TOKENS[0]} $A",
                                                       special_tokens=[(JANUS_SPECIAL_TOKENS[0], bos)])
    return JanusProcessor(tok, num_image_tokens=cfg.num_image_tokens, image_size=cfg.vision.image_size)


def memory_bandwidth(device: str, gib: float = 2.0, reps: int = 5) -> tuple[float, float]:
    """(read, copy) bandwidth in bytes/s. Read: a reduction over `gib` GiB, the access pattern of a decode step
    (weights are only read); copy: bytes read + bytes written by a copy of the same size."""
    n = int(gib * 2**30) // 4
    a = torch.ones(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)

    def best(fn):
        t_best = float("inf")
        for _ in range(reps):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            t_best = min(t_best, time.perf_counter() - t)
        return t_best

    read = min(best(loop) for loop in _read_loops(a, device))
    return n * 4 / read, 2 * n * 4 / best(lambda: b.copy_(a))


def _read_loops(a: torch.Tensor, device: str) -> list:
    """Ways to read a float32 tensor once: torch.sum, and on the CPU januskit's streamed read with and without
    software prefetch. The best of them sets the ceiling: which is fastest depends on the CPU and the moment, and a
    roofline below what a kernel reaches would read as > 100%."""
    from januskit import kernels

    loops = [lambda: a.sum()]
    if device == "cpu" and kernels.available() and a.numel() % 64 == 0:
        loops += [lambda: kernels.read_sum(a, True), lambda: kernels.read_sum(a, False)]
    return loops


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def decode_step_bytes(cfg, dtype, int8: bool = False) -> tuple[int, int, int]:
    """(weight bytes an image decode step reads, weight bytes a text decode step reads, KV-cache bytes per row and
    position). Both steps read the decoder layers and final norm; an image step then the image head and the code
    embedding's adaptor, a text step the text head. `int8`: as `quant.quantize_int8` leaves the model (its default
    layers at one byte plus a scale per output channel); everything else, the KV cache too, in `dtype`."""
    from januskit.quant import quantize_int8
    from januskit.weights import build_on_meta

    m = build_on_meta(cfg).to(dtype)
    if int8:
        quantize_int8(m)
    lm = m.language_model

    def size(*parts):
        return sum(t.numel() * t.element_size() for part in parts for t in (*part.parameters(), *part.buffers()))

    decoder = size(lm.model.layers, lm.model.norm)
    l = cfg.llm
    kv = 2 * l.num_hidden_layers * l.num_key_value_heads * l.head_dim * torch.tensor([], dtype=dtype).element_size()
    return decoder + size(m.gen_head, m.gen_aligner), decoder + size(lm.lm_head), kv


def matmul_peak(device: str, dtype: torch.dtype, tokens: int, reps: int = 5) -> float:
    """FLOP/s of the best of the prompt's large products (tokens x 2048 x 5632 and back, tokens x 2048 x 2048) as
    torch runs them alone: the ceiling a prefill's GEMMs can reach here."""
    best = 0.0
    for k, n in ((2048, 5632), (5632, 2048), (2048, 2048)):
        x = torch.randn(tokens, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype)
        torch.nn.functional.linear(x, w)
        for _ in range(reps):
            _sync(device)
            t = time.perf_counter()
            torch.nn.functional.linear(x, w)
            _sync(device)
            best = max(best, 2 * tokens * k * n / (time.perf_counter() - t))
    return best


def prefill_flops(cfg, tokens: int) -> float:
    """Multiply-adds x 2 of an understanding prefill: the encoder over its patches (projections and attention), the
    adaptor, the decoder over `tokens` positions (projections and causal attention, half the score matrix; in its
    last block only k and v for every position, the rest for the last one, as januskit computes it) and the text
    head for the last one."""
    from januskit.weights import build_on_meta

    m = build_on_meta(cfg)
    v, l = cfg.vision, cfg.llm
    patches = (v.image_size // v.patch_size) ** 2

    def linear_params(module):
        return sum(x.weight.numel() for x in module.modules() if isinstance(x, torch.nn.Linear))

    vision = 2 * patches * linear_params(m.vision_model) + 4 * v.depth * patches ** 2 * v.width
    aligner = 2 * patches * linear_params(m.aligner)
    last = m.language_model.model.layers[-1]
    last_kv = last.self_attn.k_proj.weight.numel() + last.self_attn.v_proj.weight.numel()
    llm = 2 * tokens * linear_params(m.language_model.model.layers[:-1])
    llm += 2 * tokens * last_kv + 2 * (linear_params(last) - last_kv)
    attn = l.num_attention_heads * l.head_dim
    llm += 2 * (l.num_hidden_layers - 1) * tokens ** 2 * attn + 4 * tokens * attn  # causal: half of 4 T^2 d
    head = 2 * l.hidden_size * l.vocab_size
    return float(vision + aligner + llm + head)


# ---------------------------------------------------------------------------------------------- workers
def _timeit(fn, device):
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def _marginal(run, steps: int, device) -> float:
    """Seconds per step beyond the first: time(run(steps + 1)) - time(run(1)), after a warm-up."""
    run(2)
    t1, _ = _timeit(lambda: run(1), device)
    tn, _ = _timeit(lambda: run(steps + 1), device)
    return (tn - t1) / steps, t1


def _stream_times(run, steps: int, reps: int = 2) -> tuple[float, float]:
    """(prefill seconds, seconds per decode step) from per-token timestamps: run(k) -> (t_start, [t_token, ...]).
    Prefill = start to the first token; a step = the mean gap between later tokens. Best of `reps` after a
    warm-up. (Subtracting two whole-run times instead buries 16 decode steps under the prefill's +-5%.)"""
    run(2)
    best_p, best_s = float("inf"), float("inf")
    for _ in range(reps):
        t0, stamps = run(steps + 1)
        if len(stamps) < 2:
            raise RuntimeError(f"expected {steps + 1} tokens, got {len(stamps)}")
        best_p = min(best_p, stamps[0] - t0)
        best_s = min(best_s, (stamps[-1] - stamps[0]) / (len(stamps) - 1))
    return best_p, best_s


def weight_read_bandwidth(modules, device, reps: int = 3) -> float:
    """Bytes/s of one read of the modules' parameters and buffers (a worker's own decoder weights: the bytes a decode
    step reads, in the same memory, at the moment of its decode steps), each viewed as float32: the best pass of
    each read loop of `_read_loops` (tensors whose size is not a multiple of 256 bytes are summed by torch)."""
    tensors = [t.detach().reshape(-1) for m in modules for t in (*m.parameters(), *m.buffers())]
    views = [t.view(torch.uint8).view(torch.float32) if (t.numel() * t.element_size()) % 256 == 0 else t.float()
             for t in tensors]
    per_tensor = [_read_loops(v, device) for v in views]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    best = float("inf")
    for i in range(max(len(loops) for loops in per_tensor)):
        passes = [loops[min(i, len(loops) - 1)] for loops in per_tensor]
        for _ in range(reps + 1):  # the first pass is a warm-up
            dt, _ = _timeit(lambda: [read() for read in passes], device)
            best = min(best, dt)
    return nbytes / best


def _around(measure, modules, device):
    """measure(), with the weights' read bandwidth taken just before and just after it (the higher of the two)."""
    before = weight_read_bandwidth(modules, device)
    out = measure()
    return out, max(before, weight_read_bandwidth(modules, device))


def _question(p):
    conv = [{"role": "user", "content": "<image_placeholder>\nWhat is in the image?", "images": [_image()]},
            {"role": "assistant", "content": ""}]
    return p.encode_conversation(conv)


def worker_januskit(args) -> dict:
    from januskit import Janus
    from januskit.generate import generate_image_tokens, generate_text

    janus = Janus.from_pretrained(Path(args.ckpt) / "official", device=args.device, dtype=args.dtype,
                                  compile=args.compiled)
    if args.int8:
        from januskit.quant import quantize_int8

        quantize_int8(janus.model)
    p, m = janus.processor, janus.model
    layers = [m.language_model.model.layers]  # what the weight-read probe reads: ~95% of a decode step's bytes
    res = {}
    for n in (1, 4):
        cond, uncond = p.generation_ids("a red circle above a blue square")

        def run(steps):
            gen = torch.Generator(device=args.device).manual_seed(0)
            return generate_image_tokens(m, [cond], [uncond], p.pad_id, n=n, temperature=1.0, generator=gen,
                                         num_tokens=steps, compiled=janus.compile)

        if janus.compile:
            run(args.steps + 1)  # compiles the graph of the timed run's cache size (`_marginal` warms up the other)
        (step, _), bw = _around(lambda: _marginal(run, args.steps, args.device), layers, args.device)
        res[f"image_step_ms_n{n}"], res[f"image_tok_s_n{n}"] = step * 1e3, n / step
        res[f"read_gb_s_n{n}"] = bw / 1e9
    enc = _question(p)
    batch = p.batch([enc]).to(args.device, dtype=janus.dtype)

    def prefill_and_decode(k):
        stamps = []
        with torch.inference_mode():
            t0 = time.perf_counter()
            embeds = m.embed(batch.input_ids, batch.image_mask, batch.pixel_values)
            for _ in generate_text(m, embeds, batch.attention_mask, eos_id=-1, max_new_tokens=k,
                                   compiled=janus.compile):
                stamps.append(time.perf_counter())
        return t0, stamps

    if janus.compile:
        prefill_and_decode(args.text_steps + 1)
    (prefill, step), bw = _around(lambda: _stream_times(prefill_and_decode, args.text_steps), layers, args.device)
    res.update(prefill_ms=prefill * 1e3, text_tok_s=1 / step, prompt_tokens=len(enc.input_ids), read_gb_s_text=bw / 1e9)
    return res


def worker_transformers(args) -> dict:
    from transformers import GenerationConfig, JanusForConditionalGeneration

    from januskit.processor import JanusProcessor

    d = Path(args.ckpt) / "hf"
    hf = JanusForConditionalGeneration.from_pretrained(d, dtype=args.dtype).to(args.device).eval()
    p = JanusProcessor.from_pretrained(d)
    layers = [hf.model.language_model.layers]
    res = {}
    for n in (1, 4):
        cond, _ = p.generation_ids("a red circle above a blue square")
        ids = cond[None].to(args.device)

        def run(steps):
            hf.model.vision_model.config.num_image_tokens = steps  # limit the 576-step loop for the benchmark
            gc = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, guidance_scale=5.0, num_return_sequences=n,
                                  bos_token_id=p.bos_id, pad_token_id=p.pad_id, eos_token_id=p.eos_id,
                                  generation_kwargs={"boi_token_id": p.boi_id}, max_new_tokens=steps)
            with torch.inference_mode():
                return hf.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                                   generation_config=gc)

        (step, _), bw = _around(lambda: _marginal(run, args.steps, args.device), layers, args.device)
        res[f"image_step_ms_n{n}"], res[f"image_tok_s_n{n}"] = step * 1e3, n / step
        res[f"read_gb_s_n{n}"] = bw / 1e9
    enc = _question(p)
    ids = enc.input_ids[None].to(args.device)
    pv = enc.images.to(args.device, dtype=args.dtype)

    class Stamps:  # a generate() streamer: put() is called with the prompt, then once per new token
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(time.perf_counter())

        def end(self):
            pass

    def gen(k):
        gc = GenerationConfig(do_sample=False, max_new_tokens=k, min_new_tokens=k, pad_token_id=p.pad_id,
                              eos_token_id=p.eos_id, bos_token_id=p.bos_id)
        st = Stamps()
        with torch.inference_mode():
            t0 = time.perf_counter()
            hf.generate(input_ids=ids, pixel_values=pv, attention_mask=torch.ones_like(ids), generation_config=gc,
                        streamer=st)
        return t0, st.calls[1:]  # the first put() is the prompt

    (prefill, step), bw = _around(lambda: _stream_times(gen, args.text_steps), layers, args.device)
    res.update(prefill_ms=prefill * 1e3, text_tok_s=1 / step, prompt_tokens=ids.shape[1], read_gb_s_text=bw / 1e9)
    return res


def _peak_rss_gib() -> float:
    """This process's own resident high-water mark (VmHWM; ru_maxrss would carry the parent's over exec)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _image():
    from PIL import Image

    return Image.new("RGB", (384, 384), (200, 40, 40))


# ---------------------------------------------------------------------------------------------- driver
def _best_of(a: dict, b: dict) -> dict:
    """Per figure, the better of two runs: lower times and memory, higher rates."""
    if "error" in b:
        return a
    out = {}
    for k, v in a.items():
        if not isinstance(v, (int, float)) or k == "prompt_tokens":
            out[k] = v
        elif k.endswith(("_ms", "_gib")) or "_ms_" in k:
            out[k] = min(v, b[k])
        else:
            out[k] = max(v, b[k])
    return out


def run_worker(impl: str, dtype: str, args, variant: str = "") -> dict:
    """One implementation in its own process; `variant` "int8" or "compiled" (januskit's)."""
    cmd = [sys.executable, __file__, "--worker", impl, "--ckpt", str(args.ckpt), "--dtype", dtype,
           "--device", args.device, "--steps", str(args.steps), "--text-steps", str(args.text_steps),
           "--threads", str(args.threads)] + ([f"--{variant}"] if variant else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="janus-pro-1b")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=64, help="image decode steps measured (of 576)")
    ap.add_argument("--text-steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--ckpt", default=None, help="where to write the random checkpoint (default: a temp dir)")
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="also januskit with compiled decode steps (`compile=True`: CUDA graphs on a GPU)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each implementation, alternated; best figures kept")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    ap.add_argument("--int8", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.worker:
        args.dtype = DTYPES[args.dtype]
        torch.manual_seed(0)
        res = (worker_januskit if args.worker == "januskit" else worker_transformers)(args)
        res["peak_rss_gib"] = _peak_rss_gib()
        if args.device.startswith("cuda"):
            res["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(json.dumps(res))
        return

    from januskit.config import preset

    tmp = None
    if args.ckpt is None:
        tmp = tempfile.TemporaryDirectory(prefix="januskit-bench-")
        args.ckpt = tmp.name
    ckpt = Path(args.ckpt)
    if not (ckpt / "hf" / "config.json").exists():
        print(f"writing random {args.preset} weights to {ckpt} ...", flush=True)
        build_checkpoint(args.preset, ckpt)
    cfg = preset(args.preset)
    bw, copy_bw = memory_bandwidth(args.device)
    ctx = 20 + args.steps // 2  # an image step's mean KV length: about 20 prompt tokens and half the steps
    sizes = {}

    def step_bytes(dtype: str, int8: bool) -> tuple[int, int, int]:
        if (dtype, int8) not in sizes:
            sizes[dtype, int8] = decode_step_bytes(cfg, DTYPES[dtype], int8)
        return sizes[dtype, int8]

    rows = []
    all_runs = []
    for dtype in args.dtypes.split(","):
        impls = [("januskit", ""), ("transformers", "")]
        if not args.no_int8 and dtype == "bfloat16":
            impls.append(("januskit", "int8"))
        if args.compile:
            impls.append(("januskit", "compiled"))
        # Alternate the implementations `--repeat` times and keep each one's best figures: the shared machine's
        # bandwidth drifts by ~10% over minutes, and best-of-N in alternation keeps the ratios fair.
        best: dict[str, dict] = {}
        for _ in range(args.repeat):
            for impl, variant in impls:
                name = impl + (f"-{variant}" if variant else "")
                r = run_worker(impl, dtype, args, variant)
                if "error" not in r:
                    _own_rooflines(r, step_bytes(dtype, variant == "int8"), ctx)
                best[name] = r if name not in best or "error" in best[name] else _best_of(best[name], r)
        all_runs.append((dtype, best))
    # Read bandwidth before and after the workers, the higher of the two: a roofline below what was reached
    # at some moment of the run would overstate every fraction.
    bw2, copy_bw2 = memory_bandwidth(args.device)
    bw, copy_bw = max(bw, bw2), max(copy_bw, copy_bw2)
    tokens = next((r["prompt_tokens"] for _, runs in all_runs for r in runs.values() if "prompt_tokens" in r), 0)
    peaks = {d: matmul_peak(args.device, DTYPES[d], tokens) for d in args.dtypes.split(",")} if tokens else {}
    flops = prefill_flops(cfg, tokens) if tokens else 0.0
    print(f"\n{args.preset} on {args.device}, {args.threads} threads, measured read bandwidth {bw / 1e9:.1f} GB/s "
          f"(copy {copy_bw / 1e9:.1f} GB/s read+write); roofline = bytes per step / read bandwidth, "
          f"own_roofline = the same against the implementation's own read of its decoder weights just before and "
          f"after that measurement; {args.steps} image steps, {args.text_steps} text steps; "
          f"prefill of {tokens} tokens = "
          f"{flops / 1e9:.0f} GFLOP, peak = the best {tokens}-row GEMM alone ("
          + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()) + ")\n")
    for dtype, runs in all_runs:
        for name, r in runs.items():
            if "error" in r:
                print(f"{name} {dtype}: FAILED: {r['error']}")
                continue
            row = {"impl": name, "dtype": dtype, **r}
            row["roofline_n1"], row["roofline_n4"], row["text_roofline"] = _rooflines(
                r, step_bytes(dtype, name.endswith("int8")), ctx, bw, bw, bw)
            if dtype in peaks:
                row["prefill_gflop_s"] = flops / (r["prefill_ms"] / 1e3) / 1e9
                row["prefill_peak"] = row["prefill_gflop_s"] * 1e9 / peaks[dtype]
            rows.append(row)
    _print_table(rows)
    if tmp is not None:
        tmp.cleanup()


def _rooflines(r: dict, step_bytes: tuple[int, int, int], ctx: int, bw_n1: float, bw_n4: float,
               bw_text: float) -> tuple[float, float, float]:
    """A run's fractions of the roofline (image n=1, image n=4, text): the time a step's bytes (`decode_step_bytes`
    of its dtype and mode; image steps at KV length ctx, text steps at the prompt's) take at the given read bandwidth
    (bytes/s), over the step's time."""
    image, text, kv = step_bytes
    return ((image + kv * 2 * ctx) / bw_n1 / (r["image_step_ms_n1"] / 1e3),
            (image + kv * 8 * ctx) / bw_n4 / (r["image_step_ms_n4"] / 1e3),
            (text + kv * r["prompt_tokens"]) / bw_text * r["text_tok_s"])


def _own_rooflines(r: dict, step_bytes: tuple[int, int, int], ctx: int) -> None:
    """Each run's fractions of the roofline against its own weight-read probe (`weight_read_bandwidth`, taken just
    before and after the same measurement in the same process), per run, before the best of the runs is kept: the
    shared machine's bandwidth swings by 2x within an hour, so a probe minutes away can put a fraction anywhere."""
    own = _rooflines(r, step_bytes, ctx, *(r[k] * 1e9 for k in ("read_gb_s_n1", "read_gb_s_n4", "read_gb_s_text")))
    r["own_roofline_n1"], r["own_roofline_n4"], r["own_text_roofline"] = own


def _print_table(rows):
    cols = [("impl", "{}"), ("dtype", "{}"), ("image_step_ms_n1", "{:.1f}"), ("image_tok_s_n1", "{:.2f}"),
            ("roofline_n1", "{:.0%}"), ("own_roofline_n1", "{:.0%}"), ("image_step_ms_n4", "{:.1f}"),
            ("image_tok_s_n4", "{:.2f}"), ("roofline_n4", "{:.0%}"), ("own_roofline_n4", "{:.0%}"),
            ("prefill_ms", "{:.0f}"), ("prefill_gflop_s", "{:.0f}"), ("prefill_peak", "{:.0%}"),
            ("text_tok_s", "{:.2f}"), ("text_roofline", "{:.0%}"), ("own_text_roofline", "{:.0%}"),
            ("peak_rss_gib", "{:.2f}")]
    print("| " + " | ".join(c for c, _ in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f.format(r[c]) if c in r else "-" for c, f in cols) + " |")
    print("\nratios januskit / transformers (same dtype, same run):")
    by = {(r["impl"], r["dtype"]): r for r in rows}
    for (impl, dtype), r in by.items():
        peer = by.get(("transformers", dtype))
        if impl == "transformers" or peer is None:
            continue
        print(f"  {impl} {dtype}: image tok/s n=1 x{r['image_tok_s_n1'] / peer['image_tok_s_n1']:.2f}, "
              f"n=4 x{r['image_tok_s_n4'] / peer['image_tok_s_n4']:.2f}, "
              f"prefill x{peer['prefill_ms'] / r['prefill_ms']:.2f} (speed-up), "
              f"text decode x{r['text_tok_s'] / peer['text_tok_s']:.2f}")


if __name__ == "__main__":
    main()
