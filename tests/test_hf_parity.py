"""Parity with transformers' JanusForConditionalGeneration (a test-only dependency), in both directions."""

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import JanusConfig as HFJanusConfig  # noqa: E402
from transformers import JanusForConditionalGeneration  # noqa: E402

from januskit import Janus  # noqa: E402
from januskit.config import JanusConfig, preset  # noqa: E402
from januskit.hf_layout import hf_config_dict, hf_to_official, official_to_hf  # noqa: E402

from conftest import FIXTURES, OFFICIAL_TINY  # noqa: E402

IMAGE = OFFICIAL_TINY / "image_1.png"


def _write_processor_files(d, image_size, num_image_tokens):
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(OFFICIAL_TINY / f, d / f)
    pc = json.loads((OFFICIAL_TINY / "processor_config.json").read_text())
    pc["num_image_tokens"] = num_image_tokens
    (d / "processor_config.json").write_text(json.dumps(pc))
    ic = json.loads((OFFICIAL_TINY / "preprocessor_config.json").read_text())
    ic["image_size"] = image_size
    (d / "preprocessor_config.json").write_text(json.dumps(ic))


def _hf_model(cfg: JanusConfig, image_token_id: int):
    d = hf_config_dict(cfg)
    d["image_token_id"] = image_token_id
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(HFJanusConfig(**d)).eval()
    with torch.no_grad():  # move every tensor off its default so a skipped or swapped weight shows up
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    cfg = preset("tiny")
    model = _hf_model(cfg, image_token_id=487)
    model.save_pretrained(d)
    _write_processor_files(d, cfg.vision.image_size, cfg.num_image_tokens)
    return d


def _conversation():
    return [{"role": "<|User|>", "content": "<image_placeholder>\nWhat is this?", "images": [str(IMAGE)]},
            {"role": "<|Assistant|>", "content": ""}]


def _hf_text_logits(hf, janus):
    enc = janus.processor.encode_conversation(_conversation())
    with torch.no_grad():
        out = hf(input_ids=enc.input_ids[None], pixel_values=enc.images,
                 attention_mask=torch.ones_like(enc.input_ids)[None])
    return enc, out.logits[0]


def _ours_text_logits(janus, enc):
    with torch.no_grad():
        m = janus.model
        return m.language_model.lm_head(m.decoder(m.embed(enc.input_ids[None], enc.image_mask[None], enc.images)))[0]


def _hf_greedy_image(hf, janus, prompt):
    cond, _ = janus.processor.generation_ids(prompt)
    p = janus.processor
    gc = transformers.GenerationConfig(do_sample=False, guidance_scale=5.0, bos_token_id=p.bos_id,
                                       pad_token_id=p.pad_id, eos_token_id=p.eos_id,
                                       generation_kwargs={"boi_token_id": p.boi_id},
                                       max_new_tokens=janus.config.image_tokens_per_image)
    out = hf.generate(cond[None], attention_mask=torch.ones_like(cond)[None], generation_mode="image",
                      generation_config=gc)
    return out.sequences if hasattr(out, "sequences") else out


def test_transformers_checkpoint_loads_with_equal_outputs(hf_dir):
    janus = Janus.from_pretrained(hf_dir)
    hf = JanusForConditionalGeneration.from_pretrained(hf_dir).eval()
    enc, hf_logits = _hf_text_logits(hf, janus)
    torch.testing.assert_close(_ours_text_logits(janus, enc), hf_logits, atol=1e-4, rtol=1e-4)
    ours = janus.generate_images("a red circle", n=1, cfg_weight=5.0, temperature=0).tokens
    theirs = _hf_greedy_image(hf, janus, "a red circle")
    assert ours[0].tolist() == theirs[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(janus.model.gen_vision_model.decode_codes(ours),
                                   hf.decode_image_tokens(theirs).permute(0, 3, 1, 2), atol=1e-4, rtol=1e-4)


def test_exported_transformers_layout_loads_in_transformers(tmp_path, official_janus):
    out = official_janus.save_pretrained(tmp_path / "exported", layout="hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "janus"
    hf = JanusForConditionalGeneration.from_pretrained(out).eval()
    enc, hf_logits = _hf_text_logits(hf, official_janus)
    torch.testing.assert_close(_ours_text_logits(official_janus, enc), hf_logits, atol=1e-4, rtol=1e-4)
    ours = official_janus.generate_images("a blue square", n=1, temperature=0).tokens
    assert ours[0].tolist() == _hf_greedy_image(hf, official_janus, "a blue square")[0].tolist()
    # ... and januskit reads its own transformers-layout export back to the same weights.
    back = Janus.from_pretrained(out)
    for k, v in official_janus.model.state_dict().items():
        if "attn_pool" not in k and "codebook_used" not in k:
            assert torch.equal(back.model.state_dict()[k], v), k


@pytest.mark.parametrize("name", ["janus-pro-1b", "janus-pro-7b"])
def test_transformers_meta_build_maps_to_the_official_manifest(name):
    manifest = json.loads((FIXTURES / "official-key-manifest.json").read_text())[name]["tensors"]
    with torch.device("meta"):
        hf = JanusForConditionalGeneration(HFJanusConfig(**hf_config_dict(preset(name))))
    ours = {k: list(v.shape) for k, v in hf_to_official(hf.state_dict()).items()}
    want = {k: v for k, v in manifest.items() if "attn_pool" not in k and "codebook_used" not in k}
    assert ours == want


def test_layout_round_trip_and_config_round_trip():
    cfg = preset("tiny")
    hf = _hf_model(cfg, image_token_id=487)
    sd = hf.state_dict()
    back = official_to_hf(hf_to_official(sd))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    for c in (cfg, preset("janus-pro-1b"), preset("janus-pro-7b"), JanusConfig.from_file(OFFICIAL_TINY / "config.json")):
        again = JanusConfig.from_hf_dict(hf_config_dict(c))
        again.vq.model_name = c.vq.model_name  # transformers' schema has no preset names
        assert (again.llm, again.vision.width, again.vq, again.aligner, again.gen_aligner, again.gen_head) == (
            c.llm, c.vision.width, c.vq, c.aligner, c.gen_aligner, c.gen_head)


def test_transformers_config_as_transformers_writes_it():
    """transformers' own config.json for the same model reads back to the same architecture (rope theta under
    `rope_parameters` in transformers 5)."""
    cfg = preset("tiny")
    cfg.llm.rope_theta = 12345.0
    written = HFJanusConfig(**hf_config_dict(cfg)).to_dict()
    back = JanusConfig.from_hf_dict(written)
    assert back.llm == cfg.llm and back.vq.codebook_size == cfg.vq.codebook_size
    with pytest.raises(ValueError, match="32 GroupNorm groups"):
        hf_config_dict(preset("januskit-shapes"))
