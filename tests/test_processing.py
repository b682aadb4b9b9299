"""Processor: chat template, token ids, image transforms, batching and input errors, against the fixture."""

import pytest
import torch
from PIL import Image

from januskit import JanusError
from januskit.processor import JanusProcessor, ProcessorError, load_image

from conftest import OFFICIAL_TINY


@pytest.fixture(scope="module")
def proc():
    return JanusProcessor.from_pretrained(OFFICIAL_TINY)


def _conv(case):
    return [dict(m, images=[str(OFFICIAL_TINY / p) for p in m["images"]]) if "images" in m else m
            for m in case["conversation"]]


@pytest.mark.parametrize("case", ["single", "multi"])
def test_sft_format_and_ids(proc, reference, case):
    c = reference["json"]["cases"][case]
    assert proc.format_conversation(c["conversation"]) == c["sft_format"]
    enc = proc.encode_conversation(_conv(c))
    assert enc.input_ids.tolist() == c["input_ids"]
    assert int(enc.image_mask.sum()) == 576 * len(enc.images)
    assert (enc.input_ids[enc.image_mask] == proc.image_id).all()
    torch.testing.assert_close(enc.images, reference["tensors"][f"{case}.pixel_values"], atol=1e-5, rtol=0)


def test_special_ids_looked_up_by_string(proc):
    vocab = proc.tokenizer.get_vocab()
    assert proc.pad_id == vocab["<｜▁pad▁｜>"] and proc.bos_id == vocab["<｜begin▁of▁sentence｜>"]
    assert proc.image_id == vocab["<image_placeholder>"] and proc.boi_id == vocab["<begin_of_image>"]


def test_plain_roles_equal_official_roles(proc, reference):
    c = reference["json"]["cases"]["multi"]["conversation"]
    plain = [dict(m, role={"<|User|>": "user", "<|Assistant|>": "assistant"}[m["role"]]) for m in c]
    assert proc.format_conversation(plain) == proc.format_conversation(c)
    with_system = [{"role": "system", "content": "Be brief."}] + plain
    assert proc.format_conversation(with_system).startswith("Be brief.\n\n<|User|>:")


def test_system_prompt_is_a_processor_setting(proc, tmp_path):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]
    official = proc.format_conversation(conv)
    assert official.startswith(proc.system_prompt) and proc.system_prompt.startswith("You are a helpful")
    proc.save_pretrained(tmp_path / "same")
    assert "system_prompt" not in (tmp_path / "same" / "processor_config.json").read_text()  # official files stay as they were
    none = JanusProcessor(proc.tokenizer, system_prompt="")
    none.save_pretrained(tmp_path / "none")
    again = JanusProcessor.from_pretrained(tmp_path / "none")
    assert again.system_prompt == "" and again.format_conversation(conv) == "<|User|>: Hi\n\n<|Assistant|>:"
    assert again.format_conversation(conv, system_prompt="Be brief.").startswith("Be brief.\n\n<|User|>:")


def test_bos_once_and_tokenization_matches_transformers(proc):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(OFFICIAL_TINY / "tokenizer.json"))
    for text in ["Hello world", "<|User|>: a red circle\n\n<|Assistant|>:", "ünïcödé 123"]:
        ours = proc.encode(text)
        assert ours == hf(text)["input_ids"]
        assert ours.count(proc.bos_id) == 1 and ours[0] == proc.bos_id
        assert proc.bos_id not in proc.encode(text, add_bos=False)


def test_generation_transform(proc, reference):
    x = proc.generation_transform(load_image(OFFICIAL_TINY / "image_0.png"), size=384)
    torch.testing.assert_close(x, reference["tensors"]["vq.input"], atol=1e-5, rtol=0)
    tall = proc.generation_transform(Image.new("RGB", (50, 120), (255, 0, 0)), size=64)
    assert tall.shape == (3, 64, 64) and torch.allclose(tall[0], torch.ones(64, 64))


def test_save_and_reload(proc, tmp_path):
    proc.save_pretrained(tmp_path)
    back = JanusProcessor.from_pretrained(tmp_path)
    text = "<|User|>: hi\n\n<|Assistant|>:"
    assert back.encode(text) == proc.encode(text)
    assert (back.pad_id, back.num_image_tokens, back.image_size) == (proc.pad_id, 576, 384)


def test_left_padded_batch(proc):
    a = proc.encode_conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}])
    b = proc.encode_conversation([{"role": "user", "content": "<image_placeholder>\nA much longer question?",
                                   "images": [str(OFFICIAL_TINY / "image_1.png")]},
                                  {"role": "assistant", "content": ""}])
    batch = proc.batch([a, b])
    T = len(b.input_ids)
    assert batch.input_ids.shape == (2, T) and batch.pixel_values.shape == (1, 3, 384, 384)
    pad = T - len(a.input_ids)
    assert (batch.input_ids[0, :pad] == proc.pad_id).all() and (batch.attention_mask[0, :pad] == 0).all()
    assert batch.input_ids[0, pad:].tolist() == a.input_ids.tolist()
    assert int(batch.image_mask.sum()) == 576 and not batch.image_mask[0].any()


def test_input_errors(proc, tmp_path):
    img = str(OFFICIAL_TINY / "image_0.png")
    with pytest.raises(ProcessorError, match="1 <image_placeholder> placeholder.*2 image"):
        proc.encode_conversation([{"role": "user", "content": "<image_placeholder> x", "images": [img, img]}])
    with pytest.raises(ProcessorError, match="2 <image_placeholder> placeholder.*1 image"):
        proc.encode_conversation([{"role": "user", "content": "<image_placeholder><image_placeholder>", "images": [img]}])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(ProcessorError, match="bad.png"):
        load_image(bad)
    with pytest.raises(ProcessorError, match="tokenizer.json"):
        JanusProcessor.from_pretrained(tmp_path)
    with pytest.raises(ProcessorError, match="role"):
        proc.format_conversation([{"role": "robot", "content": "x"}])


def test_api_input_errors(tiny_janus):
    with pytest.raises(JanusError, match="n must be"):
        tiny_janus.generate_images("x", n=0)
    with pytest.raises(JanusError, match="context length"):
        tiny_janus.chat("word " * 600, max_new_tokens=4)
    with pytest.raises(JanusError, match="placeholder"):
        tiny_janus.chat(messages=[{"role": "user", "content": "no image here", "images": [str(OFFICIAL_TINY / "image_0.png")]}])
    with pytest.raises(JanusError, match="not found"):
        tiny_janus.chat("hi", images=["/nonexistent.png"])
