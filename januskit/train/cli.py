"""`januskit train RECIPE [--set key=value ...] [--resume [CHECKPOINT]]`: parsing and dispatch only."""

from __future__ import annotations

import json
import logging
import os


def cmd_train(args) -> int:
    from .loop import train
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    if args.print_recipe:
        print(json.dumps(recipe.to_dict(), indent=2))
        return 0
    if int(os.environ.get("RANK", "0")) == 0:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    train(recipe, resume=args.resume)
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train or fine-tune Janus from a recipe (single process, or under torchrun for ddp/fsdp)",
        description="RECIPE is a TOML file or the name of a shipped recipe (januskit/recipes/NAME.toml), e.g. "
                    "tiny-stage1, janus-pro-1b-stage2. Multi-GPU: torchrun --nproc_per_node 8 -m januskit.cli "
                    "train RECIPE --set train.strategy=fsdp")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set optim.lr=1e-4 --set data.sources.0.path=/data/x.jsonl "
                        "(values are TOML: strings may be bare; repeatable)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the newest checkpoint in the run's output_dir (or from CHECKPOINT)")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe as JSON and exit")
    p.set_defaults(func=cmd_train)
