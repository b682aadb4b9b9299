"""`januskit eval`: the shapes-world benchmarks for a model (the bundled one by default)."""

from __future__ import annotations

import json
from pathlib import Path


def add_cli(sub) -> None:
    p = sub.add_parser("eval", help="GenEval-style generation and VQA/POPE understanding benchmarks (shapes world)")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--data", required=True, help="a directory made by `januskit data shapes` (eval_*.jsonl)")
    p.add_argument("--out", default="eval-out", help="where report.md, eval.json and samples.png go")
    p.add_argument("-n", type=int, default=4, help="images per prompt")
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--max-questions", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the generation benchmark")
    p.add_argument("--int8", action="store_true", help="evaluate the int8 weight-only decoder")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weights and activations (bfloat16 runs the CPU kernels where the CPU has them)")
    p.add_argument("--cfg-cutoff", type=float, default=None,
                   help="override the model's guidance cutoff (0: every token kept, the official decoding)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..api import Janus
    from .bench import run_eval

    janus = Janus.from_pretrained(args.model, dtype=args.dtype)
    janus.generation = janus.generation.override(cfg_cutoff=args.cfg_cutoff)
    if args.int8:
        janus.quantize_int8()
    report = run_eval(janus, args.data, args.out, n=args.n, max_prompts=args.max_prompts,
                      max_questions=args.max_questions, seed=args.seed)
    print((Path(args.out) / "report.md").read_text())
    print(json.dumps({"geneval_overall": report["geneval"]["all"]["overall"],
                      "understanding_accuracy": report["understanding"]["all"]["accuracy"]}))
    return 0
