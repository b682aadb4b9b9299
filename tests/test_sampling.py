"""Sampling functions: greedy, reproducibility with a generator, top-k / top-p support, CFG merge."""

import torch

from januskit.sampling import cfg_merge, draw, filter_logits, sample


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 50)
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1))


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.randn(4, 1000)
    draw = lambda s: sample(logits, 1.0, generator=torch.Generator().manual_seed(s))
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(torch.stack([draw(1) for _ in range(3)]), torch.stack([draw(s) for s in (2, 3, 4)]))


def test_draw_follows_the_distribution_and_never_draws_zero_probability():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    gen = torch.Generator().manual_seed(0)
    ids = torch.stack([draw(probs, gen) for _ in range(4000)])  # (4000, 2)
    freq = torch.bincount(ids[:, 0], minlength=5).float() / len(ids)
    assert freq[1] == 0 and freq[4] == 0
    assert (freq - probs[0]).abs().max() < 0.03, freq  # ~4 standard errors at 4000 draws
    assert (ids[:, 1] == 4).all()
    # unnormalised rows (a softmax in float32 sums to 1 only up to rounding) sample the same way
    assert torch.equal(draw(probs * 3, torch.Generator().manual_seed(5)), draw(probs, torch.Generator().manual_seed(5)))


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ...
    kept = torch.isfinite(filter_logits(logits, top_p=0.8)[0])
    assert kept.tolist() == [True, True, False, False, False], probs
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, top_k=2, generator=gen)) for _ in range(200)}
    assert draws == {0, 1}


def test_cfg_merge_layout_and_formula():
    cond = torch.randn(3, 7)
    uncond = torch.randn(3, 7)
    out = cfg_merge(torch.cat([cond, uncond]), 5.0)
    torch.testing.assert_close(out, uncond + 5.0 * (cond - uncond))
    torch.testing.assert_close(cfg_merge(torch.cat([cond, uncond]), 1.0), cond)


def test_cfg_cutoff_keeps_guidance_among_plausible_tokens():
    # The failure the cutoff exists for: the unconditional row is sure of token 0, the conditional row prefers
    # token 1 (p ~ 0.98) and leaves token 2 at ~1e-3 where the unconditional row has ~1e-7. At w = 5 plain
    # guidance picks token 2, which the conditional model itself all but rules out.
    cond = torch.log(torch.tensor([[0.02, 0.979, 0.001]]))
    uncond = torch.log(torch.tensor([[0.9, 0.0999999, 1e-7]]))
    logits = torch.cat([cond, uncond])
    assert cfg_merge(logits, 5.0).argmax(-1).item() == 2
    cut = cfg_merge(logits, 5.0, cutoff=0.1)
    assert cut.argmax(-1).item() == 1
    assert torch.isinf(cut[0, [0, 2]]).all()  # 0.02 / 0.979 and 0.001 / 0.979 are under 0.1
    # A cutoff below every ratio changes nothing; at w = 1 the kept tokens keep their conditional logits.
    torch.testing.assert_close(cfg_merge(logits, 5.0, cutoff=1e-4), cfg_merge(logits, 5.0))
    torch.testing.assert_close(cfg_merge(logits, 1.0, cutoff=0.01)[0, :2], cond[0, :2])
