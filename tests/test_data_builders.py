"""Sample builders token by token, the CFG-dropout and first-sentence rates, broken records, VQ code sources.

Ids below are those of the official fixture tokenizer (tests/fixtures: janus-official-tiny) with the tiny
preset: 16 understanding tokens per image and 16 VQ codes per generated image.
"""

import argparse
import io
import json
import random
import shutil
import tarfile

import pytest
import torch
from PIL import Image

from januskit.config import preset
from januskit.data.builders import SampleBuilder, first_sentence
from januskit.data.codes import CodeCache, OnTheFlyCodes, add_cli, prepare_codes, vq_fingerprint
from januskit.data.sample import IGNORE as I
from januskit.data.sources import BrokenRecord, DataError, ImageRef, WebDatasetSource, image_ref
from januskit.processor import JanusProcessor, load_image

from conftest import OFFICIAL_TINY

BOS, EOS, PAD, IMG, BOI, EOI, USER, ASSISTANT = 484, 485, 486, 487, 488, 489, 490, 491
N = 16  # understanding tokens per image (tiny preset)
BLOCK = [BOI] + [IMG] * N + [EOI]
CODES = list(range(10, 26))  # what StubCodes returns: 16 codes < the tiny codebook (64)


@pytest.fixture
def processor(request):
    try:
        return request.getfixturevalue("tiny_processor")
    except pytest.FixtureLookupError:
        p = JanusProcessor.from_pretrained(OFFICIAL_TINY, num_image_tokens=N)
        p.image_size = 64
        return p


@pytest.fixture
def config():
    return preset("tiny")


class StubCodes:
    def __init__(self):
        self.calls = []

    def codes_for(self, image):
        self.calls.append(image.path)
        if not image.path.exists():
            raise BrokenRecord("missing image", str(image.path))
        return torch.tensor(CODES)


@pytest.fixture
def images(tmp_path):
    rng = torch.Generator().manual_seed(0)
    for name, (w, h) in {"a.png": (40, 24), "b.png": (64, 80), "c.jpg": (30, 30)}.items():
        arr = (torch.rand(h, w, 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    return tmp_path


def builder(processor, config, **kw):
    kw.setdefault("cfg_dropout", 0.0)
    kw.setdefault("first_sentence_prob", 0.0)
    return SampleBuilder(processor, config, kw.pop("codes", None) or StubCodes(), **kw)


def build(b, record, base, seed=0):
    return b.build(record, base, random.Random(seed))


def absolute(messages, base):
    """The messages with image paths the inference processor can open."""
    return [dict(m, images=[str(base / n) for n in m.get("images", [])]) for m in messages]


def und_pixels(processor, path):
    return processor.understanding_transform(load_image(path))


# ---------------------------------------------------------------------------------------------- layouts
def test_caption(processor, config, images):
    s = build(builder(processor, config), {"kind": "caption", "image": "a.png", "text": "A cat."}, images)
    assert s.input_ids.tolist() == [BOS] + BLOCK + [32, 331, 13, EOS]
    assert s.text_targets.tolist() == [I] * 18 + [32, 331, 13, EOS, I]
    assert s.image_targets.tolist() == [I] * 23
    assert s.und_mask.tolist() == [False, False] + [True] * N + [False] * 5
    assert s.gen_codes.tolist() == [-1] * 23
    assert torch.equal(s.pixel_values, und_pixels(processor, images / "a.png")[None])
    assert (s.group, s.kind, s.num_loss_tokens) == ("understanding", "caption", 4)


def test_vqa(processor, config, images):
    rec = {"kind": "vqa", "image": "a.png", "question": "What is it?", "answer": "Red.", "qtype": "chart"}
    s = build(builder(processor, config), rec, images)
    question = [302, 262, 256, 83, 30, 198]  # "What is it?\n"
    assert s.input_ids.tolist() == [BOS] + BLOCK + question + [49, 68, 67, 13, EOS]
    assert s.text_targets.tolist() == [I] * 24 + [49, 68, 67, 13, EOS, I]
    assert s.und_mask.sum() == N and s.group == "understanding"


def test_text(processor, config, images):
    s = build(builder(processor, config), {"kind": "text", "text": "Hi there"}, images)
    assert s.input_ids.tolist() == [BOS, 39, 72, 446, EOS]
    assert s.text_targets.tolist() == [39, 72, 446, EOS, I]
    assert s.pixel_values.shape == (0, 3, 64, 64) and s.group == "text" and not s.und_mask.any()


def test_text_to_image(processor, config, images):
    s = build(builder(processor, config), {"kind": "text_to_image", "text": "a dog", "image": "b.png"}, images)
    prompt = [BOS, USER, 25, 259, 330, 198, 198, ASSISTANT, 25, BOI]  # "<|User|>: a dog\n\n<|Assistant|>:<boi>"
    assert prompt == processor.generation_ids("a dog")[0].tolist()
    assert s.input_ids.tolist() == prompt + [PAD] * 16 + [EOI]
    assert s.gen_codes.tolist() == [-1] * 10 + CODES + [-1]
    # <begin_of_image> predicts code 1, code i predicts code i+1, nothing at or after the last code
    assert s.image_targets.tolist() == [I] * 9 + CODES + [I, I]
    assert s.text_targets.tolist() == [I] * 27
    assert (s.group, s.num_loss_tokens, s.pixel_values.shape[0]) == ("generation", 16, 0)
    cls = build(builder(processor, config), {"kind": "class_to_image", "text": "a dog", "image": "b.png"}, images)
    assert torch.equal(cls.input_ids, s.input_ids) and cls.kind == "class_to_image"


def test_interleaved(processor, config, images):
    rec = {"kind": "interleaved", "segments": [{"text": "Hi"}, {"image": "a.png"}, {"text": " A cat."},
                                               {"image": "c.jpg"}]}
    s = build(builder(processor, config), rec, images)
    assert s.input_ids.tolist() == [BOS, 39, 72] + BLOCK + [220, 32, 331, 13] + BLOCK + [EOS]
    assert s.text_targets.tolist() == [39, 72] + [I] * 18 + [220, 32, 331, 13] + [I] * 18 + [EOS, I]
    assert torch.equal(s.pixel_values, torch.stack([und_pixels(processor, images / n) for n in ("a.png", "c.jpg")]))
    assert s.und_mask.sum() == 2 * N


def test_two_turn_chat_with_system_prompt(processor, config, images):
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "<image_placeholder>\nWhat?", "images": ["a.png"]},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Hello."},
    ]
    s = build(builder(processor, config), {"kind": "chat", "messages": messages}, images)
    system = [398, 386, 481, 13, 198, 198, USER, 25, 220]  # "You are helpful.\n\n<|User|>: "
    ask1 = [198, 302, 30, 198, 198, ASSISTANT, 25]  # "\nWhat?\n\n<|Assistant|>:"
    ans1 = [437, 13, EOS]  # " Yes." EOS
    ask2 = [USER, 25, 220, 284, 88, 30, 198, 198, ASSISTANT, 25]  # "<|User|>: Why?\n\n<|Assistant|>:"
    ans2 = [220, 39, 353, 75, 78, 13, EOS]  # " Hello." EOS
    assert s.input_ids.tolist() == [BOS] + system + BLOCK + ask1 + ans1 + ask2 + ans2
    n1 = 1 + len(system) + len(BLOCK) + len(ask1)
    # the ':' closing "<|Assistant|>:" predicts the answer's first token; the answer's EOS predicts nothing
    assert s.text_targets.tolist() == [I] * (n1 - 1) + ans1 + [I] * len(ask2) + ans2 + [I]
    # the same ids as the inference processor encodes the whole conversation, and its prompt as a prefix
    full = processor.encode_conversation(absolute(messages, images))
    assert torch.equal(s.input_ids, full.input_ids) and torch.equal(s.und_mask, full.image_mask)
    assert torch.equal(s.pixel_values, full.images)
    prompt = processor.encode_conversation(absolute(messages[:2], images) + [{"role": "assistant", "content": ""}])
    assert torch.equal(s.input_ids[:len(prompt.input_ids)], prompt.input_ids)
    assert s.group == "understanding" and s.num_loss_tokens == len(ans1) + len(ans2)


def test_chat_default_system_prompt_and_untagged_images(processor, config, images):
    messages = [{"role": "<|User|>", "content": "What?", "images": ["a.png"]},
                {"role": "<|Assistant|>", "content": "Yes."}]
    s = build(builder(processor, config), {"kind": "chat", "messages": messages}, images)
    tagged = [{"role": "user", "content": "<image_placeholder>\nWhat?", "images": ["a.png"]}, messages[1]]
    assert torch.equal(s.input_ids, processor.encode_conversation(absolute(tagged, images)).input_ids)
    assert s.text_targets[s.text_targets != I].tolist() == [437, 13, EOS]


def test_image_answer_chat_equals_inference_prompt(processor, config, images):
    rec = {"kind": "chat", "messages": [{"role": "user", "content": "a dog"},
                                        {"role": "assistant", "content": "", "images": ["b.png"]}]}
    s = build(builder(processor, config), rec, images)
    t2i = build(builder(processor, config), {"kind": "text_to_image", "text": "a dog", "image": "b.png"}, images)
    for f in ("input_ids", "text_targets", "image_targets", "gen_codes", "und_mask"):
        assert torch.equal(getattr(s, f), getattr(t2i, f)), f
    assert (s.group, s.kind) == ("generation", "chat")
    # multi-turn: the earlier turns stay in the prompt, none of their text takes a loss
    rec["messages"] = [{"role": "user", "content": "a dog"}, {"role": "assistant", "content": "Sure."},
                       {"role": "user", "content": "a red one"}, {"role": "assistant", "images": ["b.png"]}]
    m = build(builder(processor, config), rec, images)
    prompt = [BOS, USER, 25, 259, 330, 198, 198, ASSISTANT, 25, 220, 50, 84, 265, 13, EOS,
              USER, 25, 259, 376, 272, 68, 198, 198, ASSISTANT, 25, BOI]
    assert m.input_ids.tolist() == prompt + [PAD] * 16 + [EOI]
    assert m.image_targets.tolist() == [I] * (len(prompt) - 1) + CODES + [I, I]
    assert (m.text_targets == I).all()
    dropped = build(builder(processor, config, cfg_dropout=1.0), rec, images)
    assert dropped.input_ids[:len(prompt)].tolist() == [BOS] + [PAD] * (len(prompt) - 2) + [BOI]


# ---------------------------------------------------------------------------------------------- rates
def test_cfg_dropout_and_first_sentence_rates(processor, config, images):
    b = builder(processor, config, cfg_dropout=0.1, first_sentence_prob=0.25)
    caption = "A cat. It sleeps."
    cond_full, uncond_full = processor.generation_ids(caption)
    cond_cut, uncond_cut = processor.generation_ids("A cat.")
    n, dropped, cut = 2000, 0, 0
    for seed in range(n):
        s = build(b, {"kind": "text_to_image", "text": caption, "image": "b.png"}, images, seed)
        prompt = s.input_ids[:-17]
        if torch.equal(prompt, cond_full):
            pass
        elif torch.equal(prompt, cond_cut):
            cut += 1
        elif torch.equal(prompt, uncond_full):
            dropped += 1
        else:
            assert torch.equal(prompt, uncond_cut)
            dropped, cut = dropped + 1, cut + 1
    for count, p in ((dropped, 0.1), (cut, 0.25)):
        assert abs(count - n * p) < 3 * (n * p * (1 - p)) ** 0.5, (count, p)
    # a one-sentence prompt is never cut, and class names never are
    one = build(b, {"kind": "text_to_image", "text": "a dog", "image": "b.png"}, images, 3)
    assert one.input_ids[:-17].tolist() in (processor.generation_ids("a dog")[0].tolist(),
                                             processor.generation_ids("a dog")[1].tolist())


def test_first_sentence_applies_to_captions(processor, config, images):
    b = builder(processor, config, first_sentence_prob=1.0)
    s = build(b, {"kind": "caption", "image": "a.png", "text": "A cat. It sleeps."}, images)
    assert s.input_ids.tolist()[-4:] == [32, 331, 13, EOS]
    qa = build(b, {"kind": "caption_qa", "image": "a.png", "question": "What?", "answer": "A cat. It sleeps."}, images)
    assert qa.input_ids.tolist()[-4:] == [32, 331, 13, EOS]
    vqa = build(b, {"kind": "vqa", "image": "a.png", "question": "What?", "answer": "A cat. It sleeps."}, images)
    assert vqa.input_ids.tolist()[-13:] == [32, 331, 13, 220, 40, 83, 312, 273, 68, 79, 82, 13, EOS]  # never cut
    assert first_sentence("A cat. It sleeps.") == "A cat."
    assert first_sentence('He said "hi." Then left.') == 'He said "hi."'
    assert first_sentence("One sentence only") == "One sentence only"


# ---------------------------------------------------------------------------------------------- broken
@pytest.mark.parametrize("record, reason", [
    ({"kind": "caption", "image": "missing.png", "text": "A cat."}, "missing image"),
    ({"kind": "caption", "image": "broken.png", "text": "A cat."}, "bad image"),
    ({"kind": "caption", "image": "a.png"}, "malformed"),
    ({"kind": "caption", "image": 3, "text": "x"}, "malformed"),
    ({"kind": "poem", "text": "x"}, "malformed"),
    ({"text": "x"}, "malformed"),
    ({"kind": "interleaved", "segments": [{"text": "a", "image": "a.png"}]}, "malformed"),
    ({"kind": "text_to_image", "text": "a dog", "image": "missing.png"}, "missing image"),
    ({"kind": "chat", "messages": [{"role": "user", "content": "<image_placeholder> hi"},
                                   {"role": "assistant", "content": "x"}]}, "malformed"),
    ({"kind": "chat", "messages": [{"role": "user", "content": "hi"}]}, "malformed"),
    ({"kind": "chat", "messages": [{"role": "assistant", "content": "hi"}]}, "malformed"),
    ({"kind": "chat", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a dog"},
                                   {"role": "assistant", "images": ["b.png"]}]}, "malformed"),
    ({"kind": "text", "text": "Hi there " * 40}, "too long"),
])
def test_broken_records(processor, config, images, record, reason):
    with pytest.raises(BrokenRecord) as e:
        build(builder(processor, config, max_len=64), record, images)
    assert e.value.reason == reason


def test_processor_must_match_the_model(config):
    p = JanusProcessor.from_pretrained(OFFICIAL_TINY)  # 576 tokens of 384px images
    with pytest.raises(ValueError, match="576"):
        SampleBuilder(p, config, StubCodes())


# ---------------------------------------------------------------------------------------------- codes
@pytest.fixture
def vq(tiny_model):
    return tiny_model.gen_vision_model


def test_on_the_fly_codes_run_the_frozen_encoder(processor, vq, images):
    codes = OnTheFlyCodes(vq, processor, 64).codes_for(ImageRef(images / "b.png"))
    with torch.no_grad():
        want = vq.encode(processor.generation_transform(load_image(images / "b.png"), 64)[None])[0]
    assert codes.dtype == torch.long and codes.shape == (16,) and torch.equal(codes, want)


def test_code_cache_round_trip(processor, config, vq, images, tmp_path):
    (images / "sub").mkdir()
    (images / "sub" / "b.png").write_bytes((images / "b.png").read_bytes())
    lines = [{"kind": "text_to_image", "text": "a dog", "image": "b.png"},
             {"kind": "class_to_image", "text": "dog", "image": "sub/b.png"},
             {"kind": "text_to_image", "text": "again", "image": "b.png"},
             {"kind": "text_to_image", "text": "gone", "image": "missing.png"},
             {"kind": "caption", "text": "not generated", "image": "a.png"},
             {"kind": "chat", "messages": [{"role": "user", "content": "x"},
                                           {"role": "assistant", "images": ["c.jpg"]}]}]
    manifest = images / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "cache"
    summary = prepare_codes([manifest], vq, processor, out, batch_size=2, image_size=64, rows_per_file=2)
    assert summary["images"] == 3 and summary["broken"] == 1 and summary["files"] == 2
    fp = vq_fingerprint(vq, 64)
    cache = CodeCache(out, fingerprint=fp)
    fly = OnTheFlyCodes(vq, processor, 64)
    for name in ("b.png", "sub/b.png", "c.jpg"):
        assert torch.equal(cache.codes_for(ImageRef(images / name)), fly.codes_for(ImageRef(images / name)))
    with pytest.raises(BrokenRecord, match="missing.png") as e:
        cache.codes_for(ImageRef(images / "missing.png"))
    assert e.value.reason == "bad image"
    with pytest.raises(BrokenRecord, match="looked up relative to") as e:
        cache.codes_for(ImageRef(images / "a.png"))
    assert e.value.reason == "no codes" and str(images.resolve()) in str(e.value)  # the recorded root
    # a dataset reached through a symlink has the same keys
    (tmp_path / "linked").symlink_to(images, target_is_directory=True)
    assert torch.equal(cache.codes_for(ImageRef(tmp_path / "linked" / "sub/b.png")),
                       fly.codes_for(ImageRef(images / "sub/b.png")))
    with pytest.raises(DataError, match="stale"):
        CodeCache(out, fingerprint=vq_fingerprint(vq, 128))
    with pytest.raises(DataError, match="prepare-codes"):
        CodeCache(tmp_path / "nothing")
    # the builder gives the same sample with either source
    rec = {"kind": "text_to_image", "text": "a dog", "image": "b.png"}
    a = build(builder(processor, config, codes=cache), rec, images)
    b = build(builder(processor, config, codes=fly), rec, images)
    assert torch.equal(a.gen_codes, b.gen_codes) and torch.equal(a.image_targets, b.image_targets)
    # a run directory copied with its data and cache finds the copy's images, also once the original is gone
    copy = tmp_path.parent / f"{tmp_path.name}-moved"
    shutil.copytree(tmp_path, copy, symlinks=True)
    moved = CodeCache(copy / "cache", fingerprint=fp)
    new_images = copy / images.relative_to(tmp_path)
    for name in ("b.png", "sub/b.png"):
        assert torch.equal(moved.codes_for(ImageRef(new_images / name)), cache.codes_for(ImageRef(images / name)))
    with pytest.raises(BrokenRecord, match="missing.png"):
        moved.codes_for(ImageRef(new_images / "missing.png"))
    want = fly.codes_for(ImageRef(images / "sub/b.png"))
    shutil.rmtree(images)
    assert torch.equal(moved.codes_for(ImageRef(new_images / "sub/b.png")), want)


def test_prepare_codes_command_line(processor, tiny_model, images, tmp_path):
    from januskit.api import Janus

    checkpoint = Janus(tiny_model, processor).save_pretrained(tmp_path / "ckpt")
    manifest = images / "m.jsonl"
    manifest.write_text(json.dumps({"kind": "text_to_image", "text": "a dog", "image": "b.png"}) + "\n")
    sub = argparse.ArgumentParser().add_subparsers()
    add_cli(sub)
    args = sub.choices["prepare-codes"].parse_args([str(manifest), "--model", str(checkpoint), "--out",
                                                     str(tmp_path / "c"), "--batch-size", "4"])
    assert args.func(args) == 0
    vq = tiny_model.gen_vision_model
    cache = CodeCache(tmp_path / "c", fingerprint=vq_fingerprint(vq, 64))
    assert torch.equal(cache.codes_for(ImageRef(images / "b.png")),
                       OnTheFlyCodes(vq, processor, 64).codes_for(ImageRef(images / "b.png")))


def test_webdataset_records_build(processor, config, images, tmp_path):
    rec = {"kind": "caption", "image": "0001.png", "text": "A cat."}
    with tarfile.open(tmp_path / "shard.tar", "w") as tf:
        for name, data in (("0001.json", json.dumps(rec).encode()), ("0001.png", (images / "a.png").read_bytes())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    record, base = WebDatasetSource(str(tmp_path / "shard.tar")).record(0)
    s = build(builder(processor, config), record, base)
    plain = build(builder(processor, config), rec | {"image": "a.png"}, images)
    assert torch.equal(s.input_ids, plain.input_ids) and torch.equal(s.pixel_values, plain.pixel_values)
    assert image_ref(base, "png").path == tmp_path / "shard.tar" / "0001.png"


def test_code_cache_of_webdataset_shards(processor, config, vq, images, tmp_path):
    rec = {"kind": "text_to_image", "text": "a dog", "image": "0007.png"}
    with tarfile.open(tmp_path / "shard.tar", "w") as tf:
        for name, data in (("0007.json", json.dumps(rec).encode()), ("0007.png", (images / "b.png").read_bytes())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    prepare_codes([], vq, processor, tmp_path / "cache", image_size=64, shards=[str(tmp_path / "*.tar")])
    cache = CodeCache(tmp_path / "cache", fingerprint=vq_fingerprint(vq, 64))
    record, base = WebDatasetSource(str(tmp_path / "shard.tar")).record(0)
    fly = OnTheFlyCodes(vq, processor, 64)
    assert torch.equal(cache.codes_for(image_ref(base, "png")), fly.codes_for(ImageRef(images / "b.png")))
    a = build(builder(processor, config, codes=cache), record, base)
    assert a.gen_codes[a.gen_codes >= 0].tolist() == fly.codes_for(image_ref(base, "png")).tolist()


def test_mixture_of_real_records_packs_into_a_model_batch(processor, config, tiny_model, images):
    from januskit.data.mixture import Mixture, MixtureSpec
    from januskit.data.packing import pack

    und = [{"kind": "caption", "image": "a.png", "text": "A cat."},
           {"kind": "vqa", "image": "c.jpg", "question": "What?", "answer": "Red."},
           {"kind": "interleaved", "segments": [{"text": "Hi"}, {"image": "a.png"}, {"image": "b.png"}]}]
    gen = [{"kind": "text_to_image", "text": "a dog", "image": "b.png"},
           {"kind": "class_to_image", "text": "cat", "image": "c.jpg"}]
    for name, records in (("und", und), ("gen", gen)):
        (images / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    spec = MixtureSpec.from_dict({"ratio": {"understanding": 1, "generation": 1}, "sources": [
        {"name": "und", "path": "und.jsonl", "group": "understanding"},
        {"name": "gen", "path": "gen.jsonl", "group": "generation"}]}, base_dir=images)
    m = Mixture(spec, builder(processor, config, codes=OnTheFlyCodes(tiny_model.gen_vision_model, processor, 64)))
    for step in range(2):
        samples = m.next_step(step, 6)
        assert [s.group for s in samples].count("generation") == 3
        batch = pack(samples, max_len=128, pad_id=processor.pad_id)
        with torch.no_grad():
            embeds = tiny_model.embed(batch.input_ids, batch.und_mask, batch.pixel_values, gen_codes=batch.gen_codes)
        assert embeds.shape == (*batch.input_ids.shape, config.llm.hidden_size)
    m.close()
