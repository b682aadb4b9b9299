"""`januskit build-default`: run the whole chain that makes the bundled model."""

from __future__ import annotations

import logging


def add_cli(sub) -> None:
    p = sub.add_parser("build-default", help="train the bundled model from nothing (data, tokenizer, VQ, SigLIP, "
                                             "LLM, stages I-III, the describe stage); resumes an interrupted run")
    p.add_argument("--out", required=True, help="working directory; the model ends up in OUT/model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="a seconds-long toy version of every step (smoke test)")
    p.add_argument("--install", action="store_true", help="copy the result into the package as the default model")
    p.add_argument("--factored-head", action="store_true",
                   help="experimental: the image head scores a code by the sum of its shape, colour and size (frozen), "
                        "aiming at drawing the held-out pair")
    p.add_argument("--position-reasons", action="store_true",
                   help="answer position questions with the two objects' rows or columns before the yes or no")
    p.add_argument("--image-pos-embed", action="store_true",
                   help="add a learned table of patch positions to the understanding features (januskit extension)")
    p.add_argument("--where-turns", action="store_true",
                   help="SFT chats (those without a caption turn) also ask where two objects are (row and column)")
    p.add_argument("--caption-turns", action="store_true",
                   help="a quarter of the SFT chats also ask for a detailed caption")
    p.add_argument("--where-stage", action="store_true",
                   help="a stage of where-only chats (row and column of each named object) between stages II and III")
    p.add_argument("--position-scan", action="store_true",
                   help="answer position questions by listing every shape's row and column in reading order first, "
                        "with a scan stage (list and position chats) between stages II and III")
    p.set_defaults(func=run)


def run(args) -> int:
    from .chain import install_default, run_chain

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model = run_chain(args.out, seed=args.seed, fast=args.fast, factored_head=args.factored_head,
                      position_reasons=args.position_reasons, image_pos_embed=args.image_pos_embed,
                      where_turns=args.where_turns, caption_turns=args.caption_turns, where_stage=args.where_stage,
                      position_scan=args.position_scan)
    print(model)
    if args.install:
        print(install_default(model))
    return 0
