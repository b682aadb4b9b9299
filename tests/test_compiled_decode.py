"""Compiled decode steps (`Janus(..., compile=True)`): fixed shapes over a static KV cache, the same tokens as the
eager loop and the official reference.

On a GPU these steps replay as CUDA graphs; here torch.compile's CPU backend compiles the same graphs, so what is
checked is what they compute, and that all the steps of a generation (and of the next prompt of a similar
length) reuse one graph, which is what lets a CUDA graph be captured once and replayed.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from januskit import Janus
from januskit.generate import _cache_len
from januskit.llama import KVCache

from conftest import OFFICIAL_TINY


@pytest.fixture(scope="module")
def compiled_janus(official_tiny_dir):
    return Janus.from_pretrained(official_tiny_dir, dtype=torch.float32, compile=True)


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_greedy_cfg_image_tokens_match_the_official_with_one_graph(compiled_janus, reference):
    t2i = reference["json"]["t2i"]
    before = graphs()
    out = compiled_janus.generate_images(t2i["prompt"], n=1, cfg_weight=t2i["cfg_weight"], temperature=0)
    assert out.tokens[0].tolist() == t2i["greedy_tokens"]
    assert graphs() - before == 1  # 575 decode steps, one graph


def test_batched_prompts_and_n_equal_the_eager_loop(compiled_janus, reference):
    t2i = reference["json"]["t2i"]
    prompts = [t2i["prompt"], "a circle"]  # left padding, and n = 2 rows a prompt after one prefill
    compiled = compiled_janus.generate_images(prompts, n=2, temperature=0)
    compiled_janus.compile = False
    try:
        eager = compiled_janus.generate_images(prompts, n=2, temperature=0)
    finally:
        compiled_janus.compile = True
    assert torch.equal(compiled.tokens, eager.tokens)
    assert compiled.tokens[0].tolist() == t2i["greedy_tokens"]

    # Prompts of another length whose cache rounds to the same size take the same graph.
    lengths = [len(compiled_janus.processor.generation_ids(p)[0]) for p in ("a red circle", "a big red circle")]
    assert lengths[0] != lengths[1] and _cache_len(lengths[0] + 576, True) == _cache_len(lengths[1] + 576, True)
    compiled_janus.generate_images("a red circle", temperature=0)
    before = graphs()
    compiled_janus.generate_images("a big red circle", temperature=0)
    assert graphs() == before


def test_many_batch_sizes_and_lengths_stay_within_a_few_graphs(compiled_janus):
    # A server meets every batch size and prompt length: after the first recompilation the sizes turn symbolic,
    # so torch.compile never reaches its recompilation limit (with fullgraph=True that limit is a hard error).
    from januskit.generate import generate_image_tokens

    p = compiled_janus.processor
    prompts = ["a circle", "a red circle", "a big red circle beside a small blue square " * 3]
    before = graphs()
    for i, n in enumerate(range(1, 11)):
        cond, uncond = p.generation_ids(prompts[i % 3])
        got = [generate_image_tokens(compiled_janus.model, [cond], [uncond], p.pad_id, n=n, temperature=0,
                                     num_tokens=4, compiled=compiled) for compiled in (True, False)]
        assert torch.equal(*got), n
    assert graphs() - before <= 3


def test_seeded_sampling_is_reproducible(compiled_janus):
    a = compiled_janus.generate_images("a red circle", n=2, seed=3)
    b = compiled_janus.generate_images("a red circle", n=2, seed=3)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens[0], a.tokens[1])


def test_greedy_answers_match_the_official(compiled_janus, reference):
    cases = reference["json"]["cases"]
    convs = []
    for name in ("single", "multi"):
        convs.append([{**m, **({"images": [str(OFFICIAL_TINY / p) for p in m["images"]]} if "images" in m else {})}
                      for m in cases[name]["conversation"]])
    replies = compiled_janus.chat_batch(convs, max_new_tokens=12, temperature=0)
    assert [r.token_ids for r in replies] == [cases[name]["greedy_new_tokens"] for name in ("single", "multi")]
    streamed = "".join(compiled_janus.stream_chat(messages=convs[0], max_new_tokens=12))
    assert streamed == replies[0].text


def test_static_cache_refuses_reorder(tiny_model):
    cache = KVCache(tiny_model.config.llm, 2, 8)
    cache.make_static()
    assert cache.slot.tolist() == [0] and not cache.k.isnan().any()
    with pytest.raises(RuntimeError, match="make_static"):
        cache.reorder(torch.tensor([0, 0, 1, 1]))


def test_bf16_on_the_kernels_cpu_compiles_torch_ops_and_draws_the_same():
    # In bf16 on a CPU with AVX-512 BF16 the eager steps run januskit's C++ kernels, which torch.compile cannot
    # trace (fullgraph would fail); inside a compiled step they step aside for torch's own ops.
    # The two compute bf16 products in other orders, so a near-tie between two cells can go either way ("a green
    # triangle" says nothing of where: the bundled model of 2026-12-08 puts it one cell apart in the two): both must
    # draw what was asked, and the codes agree almost everywhere.
    from januskit.data.world import spec_text
    from januskit.eval.shapescore import check_prompt, detect

    janus = Janus.from_pretrained(dtype=torch.bfloat16)  # the bundled model
    specs = [{"objects": [{"shape": "circle", "color": "red", "count": 1}, {"shape": "square", "color": "blue",
                                                                         "count": 1}],
              "relation": {"a": 0, "rel": "above", "b": 1}},
             {"objects": [{"shape": "triangle", "color": "green", "count": 1}]}]
    prompts = [spec_text(s) for s in specs]
    eager = janus.generate_images(prompts, temperature=0)
    janus.compile = True
    compiled = janus.generate_images(prompts, temperature=0)
    for out in (eager, compiled):
        assert all(check_prompt(s, detect(img)) for s, img in zip(specs, out.images)), prompts
    assert compiled.tokens.eq(eager.tokens).float().mean() >= 0.9


def test_without_a_compiler_it_says_so_and_decodes_eagerly(official_tiny_dir, reference, monkeypatch, caplog):
    monkeypatch.setattr("januskit.generate.shutil.which", lambda name: None)
    with caplog.at_level("WARNING"):
        janus = Janus.from_pretrained(official_tiny_dir, compile=True)
    assert not janus.compile and "compile=True: no C++ compiler" in caplog.text
    t2i = reference["json"]["t2i"]
    before = graphs()
    out = janus.generate_images(t2i["prompt"], cfg_weight=t2i["cfg_weight"], temperature=0)
    assert out.tokens[0].tolist() == t2i["greedy_tokens"] and graphs() == before


def test_warm_up_leaves_nothing_to_compile_for_requests(official_tiny_dir):
    janus = Janus.from_pretrained(official_tiny_dir, compile=True)
    janus.warm_up()
    before = graphs()
    janus.generate_images(["a red circle", "a big blue square beside a circle"], n=3, temperature=0)
    janus.chat_batch([[{"role": "user", "content": "hello"}]] * 3, max_new_tokens=5)
    assert graphs() == before
