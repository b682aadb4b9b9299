"""The `januskit` command: argument parsing and dispatch only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the bundled model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--int8", action="store_true", help="int8 weight-only decoder (faster, memory-bound decoding)")
    p.add_argument("--low-memory", action="store_true",
                   help="keep the image encoder and VQ decoder on the CPU except while they run")
    p.add_argument("--compile", action="store_true",
                   help="compiled decode steps: CUDA graphs on a GPU (on CPUs the bf16 kernels are faster)")


def _load(args):
    from .api import Janus

    janus = Janus.from_pretrained(args.model, device=args.device, dtype=args.dtype, low_memory=args.low_memory,
                                  compile=args.compile)
    return janus.quantize_int8() if args.int8 else janus


def cmd_generate(args) -> int:
    from PIL import Image

    janus = _load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = janus.generate_images(args.prompt, n=args.n, cfg_weight=args.cfg, cfg_cutoff=args.cfg_cutoff,
                                   temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    stem = "".join(c if c.isalnum() else "_" for c in args.prompt.lower())[:48].strip("_") or "image"
    for i, img in enumerate(result.images):
        path = out / f"{stem}_{args.seed if args.seed is not None else 'r'}_{i}.png"
        if args.scale > 1:
            img = img.resize((img.width * args.scale, img.height * args.scale), Image.NEAREST)
        img.save(path)
        print(path)
    return 0


def cmd_chat(args) -> int:
    janus = _load(args)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.prompt is not None:
        # The reply keeps the tokenizer's leading space (" 3"), as the official decode does; print the answer itself.
        print(janus.chat(args.prompt, images=args.image, **kw).text.strip())
        return 0
    # Interactive loop: the conversation grows turn by turn; images attach to the first question.
    messages: list[dict] = []
    images = list(args.image or [])
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("exit", "quit", ":q"):
            return 0
        if not line:
            continue
        content = line
        turn = {"role": "<|User|>", "content": content}
        if images:
            turn["content"] = "<image_placeholder>\n" * len(images) + content
            turn["images"], images = images, []
        messages.append(turn)
        pieces, shown = [], ""
        print("janus> ", end="", flush=True)
        for piece in janus.stream_chat(messages=messages + [{"role": "<|Assistant|>", "content": ""}], **kw):
            pieces.append(piece)
            out = piece if shown else piece.lstrip()  # no leading space before the answer
            shown += out
            print(out, end="", flush=True)
        print()
        messages.append({"role": "<|Assistant|>", "content": "".join(pieces)})


def cmd_info(args) -> int:
    import json

    from .api import resolve_model_path
    from .config import JanusConfig
    from .weights import build_on_meta

    directory = resolve_model_path(args.model_path)
    config = JanusConfig.from_file(directory / "config.json")
    model = build_on_meta(config)
    print(json.dumps(config.to_dict(), indent=2))
    total = 0
    for name, mod in model.named_children():
        n = sum(p.numel() for p in mod.parameters())
        total += n
        print(f"{name:20s} {n:>15,d}")
    print(f"{'total':20s} {total:>15,d}")
    return 0


def cmd_convert(args) -> int:
    from .api import Janus

    janus = Janus.from_pretrained(args.src, dtype=args.dtype)
    print(janus.save_pretrained(args.dst, layout=args.to))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="januskit", description="DeepSeek Janus / Janus-Pro: run, train, serve.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="text-to-image: write PNG files and print their paths")
    p.add_argument("prompt")
    _model_args(p)
    p.add_argument("-n", type=int, default=1, help="images to generate")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance weight (default: the model's, 5 for the released checkpoints)")
    p.add_argument("--cfg-cutoff", type=float, default=None,
                   help="guide only among image tokens with at least this fraction of the conditional top "
                        "token's probability (default: the model's; 0 keeps all, as the official code does)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default="out", help="output directory")
    p.add_argument("--scale", type=int, default=1, help="save images enlarged this many times (nearest neighbour)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="ask about images; interactive when no prompt is given")
    p.add_argument("prompt", nargs="?")
    _model_args(p)
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="print a model's config and parameter counts")
    p.add_argument("model_path", nargs="?", default=None)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="rewrite a checkpoint in the official or the transformers layout")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=["official", "hf"], required=True)
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=cmd_convert)

    for extension in _extensions():
        extension(sub)
    return parser


def _extensions():
    """Subcommands that live with their feature (data, training, evaluation, serving)."""
    found = []
    for module, attr in (("januskit.data.world", "add_cli"), ("januskit.data.codes", "add_cli"),
                         ("januskit.train.cli", "add_cli"), ("januskit.pretrain.cli", "add_cli"),
                         ("januskit.eval.cli", "add_cli"), ("januskit.serve.cli", "add_cli")):
        try:
            mod = __import__(module, fromlist=[attr])
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                continue
            raise
        found.append(getattr(mod, attr))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except USER_ERRORS as e:
        print(f"januskit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
