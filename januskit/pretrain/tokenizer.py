"""A byte-level BPE tokenizer with the Janus special tokens, trained on the texts of a set of manifests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ..processor import JANUS_SPECIAL_TOKENS, JanusProcessor


def manifest_texts(data_dir: Path) -> Iterator[str]:
    """Every string a model will read or write in the manifests (captions, questions, answers, prompts, docs)."""
    for path in sorted(Path(data_dir).glob("*.jsonl")):
        if path.name.startswith("eval_"):
            continue
        for line in open(path):
            rec = json.loads(line)
            for key in ("text", "question", "answer"):
                if isinstance(rec.get(key), str):
                    yield rec[key]
            for seg in rec.get("segments", []):
                if "text" in seg:
                    yield seg["text"]
            for m in rec.get("messages", []):
                yield m.get("content", "")


def train_tokenizer(data_dir: Path, vocab_size: int = 1024, image_size: int = 64, num_image_tokens: int = 64,
                    system_prompt: str | None = "") -> JanusProcessor:
    """BPE on the manifests' texts. The default system prompt is empty: a small model gains nothing from the
    93-token official one, which would be half the tokens of every short chat (None keeps the official one)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=JANUS_SPECIAL_TOKENS + ["<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    template = ["You are a helpful language and vision assistant.", "<|User|>: ", "\n\n<|Assistant|>:"]
    tok.train_from_iterator(list(manifest_texts(data_dir)) + template * 100, trainer)
    bos = JANUS_SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return JanusProcessor(tok, num_image_tokens=num_image_tokens, image_size=image_size, system_prompt=system_prompt)
