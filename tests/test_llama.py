"""Decoder equivalences: cached vs uncached, left-padded batch vs single rows, packed vs separate samples."""

import pytest
import torch

from januskit.config import LlamaConfig
from januskit.llama import KVCache, LlamaLM, document_mask, padded_mask, positions_from_mask


def _lm(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    lm = LlamaLM(cfg).eval()
    for p in lm.parameters():  # perturb norms too, so a skipped weight would show
        p.data.add_(torch.randn_like(p) * 0.05)
    return lm


@torch.no_grad()
def test_cached_decoding_equals_full_forward():
    lm = _lm()
    x = torch.randn(2, 9, 32)
    full = lm.model(x)
    cache = KVCache(lm.cfg, 2, 16)
    parts = [lm.model(x[:, :5], cache=cache)]
    for t in range(5, 9):
        parts.append(lm.model(x[:, t:t + 1], cache=cache))
    assert cache.length == 9
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_chunked_prefill_with_cache_is_causal():
    lm = _lm()
    x = torch.randn(1, 8, 32)
    cache = KVCache(lm.cfg, 1, 8)
    a = lm.model(x[:, :3], cache=cache)
    b = lm.model(x[:, 3:], cache=cache)  # several new queries after a cached prefix
    torch.testing.assert_close(torch.cat([a, b], 1), lm.model(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_left_padded_batch_matches_single_rows():
    lm = _lm()
    long, short = torch.randn(1, 7, 32), torch.randn(1, 4, 32)
    pad = torch.randn(1, 3, 32) * 100  # garbage in the padding must not leak
    x = torch.cat([long, torch.cat([pad, short], 1)], 0)
    am = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    h = lm.model(x, positions=positions_from_mask(am), mask=padded_mask(am, 7))
    torch.testing.assert_close(h[0:1], lm.model(long), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h[1:2, 3:], lm.model(short), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_packed_samples_are_isolated():
    lm = _lm()
    a, b = torch.randn(1, 5, 32), torch.randn(1, 6, 32)
    doc = torch.tensor([[0] * 5 + [1] * 6])
    pos = torch.cat([torch.arange(5), torch.arange(6)])[None]
    h = lm.model(torch.cat([a, b], 1), positions=pos, mask=document_mask(doc))
    torch.testing.assert_close(h[:, :5], lm.model(a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h[:, 5:], lm.model(b), atol=1e-5, rtol=1e-5)


def test_cache_reorder_repeats_rows():
    lm = _lm()
    cache = KVCache(lm.cfg, 2, 8)
    with torch.no_grad():
        lm.model(torch.randn(2, 3, 32), cache=cache)
    k0 = cache.k.clone()
    cache.reorder(torch.tensor([0, 0, 1, 1]))
    assert cache.k.shape[1] == 4
    # Only the written positions are defined (the cache is allocated uninitialised).
    torch.testing.assert_close(cache.k[:, 1, :, :3], k0[:, 0, :, :3])
    torch.testing.assert_close(cache.k[:, 3, :, :3], k0[:, 1, :, :3])


@torch.inference_mode()
@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 8), (torch.bfloat16, 64)])  # bf16 hd 64: the CPU kernels
def test_last_only_prefill_matches_the_full_prompt_and_fills_the_same_cache(dtype, head_dim):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=4 * head_dim, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    lm = LlamaLM(cfg).to(dtype).eval()
    for p in lm.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    am = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])  # left-padded: the last query's mask row matters
    x = torch.randn(2, 7, cfg.hidden_size, dtype=dtype)
    pos, mask = positions_from_mask(am), padded_mask(am, 7)
    full_cache, last_cache = KVCache(cfg, 2, 9, dtype=dtype), KVCache(cfg, 2, 9, dtype=dtype)
    full = lm.model(x, positions=pos, cache=full_cache, mask=mask)
    last = lm.model(x, positions=pos, cache=last_cache, mask=mask, last_only=True)
    assert last.shape == (2, 1, cfg.hidden_size) and last_cache.length == full_cache.length == 7
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(last, full[:, -1:], **tol)
    torch.testing.assert_close(last_cache.k[:, :, :, :7], full_cache.k[:, :, :, :7], atol=0, rtol=0)
    torch.testing.assert_close(last_cache.v[:, :, :, :7], full_cache.v[:, :, :, :7], atol=0, rtol=0)
    step = torch.randn(2, 1, cfg.hidden_size, dtype=dtype)  # a decode step after each prefill: the same
    step_mask = torch.cat([am, torch.ones(2, 1, dtype=am.dtype)], 1).bool()[:, None, None]
    a, b = (lm.model(step, positions=pos[:, -1:] + 1, cache=c, mask=step_mask) for c in (full_cache, last_cache))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
