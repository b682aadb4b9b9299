"""Pretraining the small Llama LM on text documents: the analogue of the DeepSeek-LLM starting point."""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from ..config import LlamaConfig
from ..llama import LlamaLM

log = logging.getLogger(__name__)


def train_llm(docs: list[list[int]], cfg: LlamaConfig, steps: int = 600, batch: int = 16, block: int = 128,
              lr: float = 2e-3, seed: int = 0, log_every: int = 100, autocast: bool = True) -> tuple[LlamaLM, dict]:
    """docs: token ids per document (BOS first, EOS last); trained as packed blocks of `block` tokens."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    stream = torch.tensor([t for d in docs for t in d])
    n_blocks = (len(stream) - 1) // block
    lm = LlamaLM(cfg)
    for p in lm.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    t0, stats = time.time(), {}
    for step in range(1, steps + 1):
        starts = torch.randint(n_blocks, (batch,), generator=g) * block
        x = torch.stack([stream[s: s + block] for s in starts])
        y = torch.stack([stream[s + 1: s + block + 1] for s in starts])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # the CPU's bf16 GEMMs: ~4x fp32
            logits = lm.lm_head(lm.model(lm.model.embed_tokens(x)))
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        for pg in opt.param_groups:
            pg["lr"] = lr * min(1.0, step / 50)
        opt.step()
        if step % log_every == 0 or step == steps:
            stats = {"step": step, "loss": float(loss.detach()), "s": time.time() - t0}
            log.info("llm %s", stats)
    return lm.eval(), stats
