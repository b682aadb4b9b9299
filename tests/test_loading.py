"""Checkpoint formats, dtypes and the errors that bad checkpoints produce."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from januskit import Janus, JanusError
from januskit.weights import save_state_dict

from conftest import OFFICIAL_TINY

META_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "processor_config.json", "preprocessor_config.json"]


def _copy_meta(dst):
    dst.mkdir(parents=True, exist_ok=True)
    for f in META_FILES:
        shutil.copy(OFFICIAL_TINY / f, dst / f)
    return dst


def _same_weights(a: Janus, b: Janus):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k


@pytest.fixture(scope="module")
def official_sd():
    return load_file(str(OFFICIAL_TINY / "model.safetensors"))


def test_sharded_safetensors(tmp_path, official_sd, official_janus):
    d = _copy_meta(tmp_path / "sharded")
    save_state_dict(official_sd, d, max_shard_bytes=4 * 2**20)
    assert (d / "model.safetensors.index.json").exists() and len(list(d.glob("model-*.safetensors"))) > 1
    _same_weights(Janus.from_pretrained(d), official_janus)


@pytest.mark.parametrize("sharded", [False, True])
def test_pytorch_bin_checkpoints(tmp_path, official_sd, official_janus, sharded):
    d = _copy_meta(tmp_path / "bin")
    if sharded:
        keys = sorted(official_sd)
        half = len(keys) // 2
        parts = {"pytorch_model-00001-of-00002.bin": keys[:half], "pytorch_model-00002-of-00002.bin": keys[half:]}
        for name, ks in parts.items():
            torch.save({k: official_sd[k] for k in ks}, d / name)
        index = {"weight_map": {k: name for name, ks in parts.items() for k in ks}}
        (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:
        torch.save(official_sd, d / "pytorch_model.bin")
    _same_weights(Janus.from_pretrained(d), official_janus)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_and_runs(official_tiny_dir, dtype):
    janus = Janus.from_pretrained(official_tiny_dir, dtype=dtype)
    assert all(p.dtype == dtype for p in janus.model.parameters())
    reply = janus.chat("Hello", max_new_tokens=3)
    assert len(reply.token_ids) >= 1


def test_checkpoint_without_unused_keys_loads(tmp_path, official_sd):
    d = _copy_meta(tmp_path / "slim")
    slim = {k: v for k, v in official_sd.items() if "attn_pool" not in k and "codebook_used" not in k}
    save_file(slim, str(d / "model.safetensors"))
    janus = Janus.from_pretrained(d)
    assert not any(p.is_meta for p in janus.model.parameters())
    assert janus.chat("Hi", max_new_tokens=2).token_ids


def test_shape_mismatch_names_tensor_and_shapes(tmp_path, official_sd):
    d = _copy_meta(tmp_path / "bad")
    sd = dict(official_sd)
    sd["gen_head.vision_head.bias"] = torch.zeros(7)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(JanusError, match=r"gen_head\.vision_head\.bias.*\(7,\).*\(512,\)"):
        Janus.from_pretrained(d)


def test_missing_and_unexpected_tensors_are_named(tmp_path, official_sd):
    d = _copy_meta(tmp_path / "missing")
    sd = {k: v for k, v in official_sd.items() if k != "aligner.layers.2.weight"}
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(JanusError, match=r"missing.*aligner\.layers\.2\.weight"):
        Janus.from_pretrained(d)
    sd = dict(official_sd, **{"extra.weight": torch.zeros(1)})
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(JanusError, match=r"unexpected.*extra\.weight"):
        Janus.from_pretrained(d)


def test_missing_files(tmp_path):
    with pytest.raises(JanusError, match="no such model directory"):
        Janus.from_pretrained(tmp_path / "nope")
    d = _copy_meta(tmp_path / "noweights")
    with pytest.raises(JanusError, match="no weights found"):
        Janus.from_pretrained(d)
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(JanusError, match="model.safetensors"):
        Janus.from_pretrained(d)


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(JanusError, match="deepseek-ai/Janus-Pro-1B"):
        Janus.from_pretrained("deepseek-ai/Janus-Pro-1B")


def test_official_layout_round_trip(tmp_path, official_janus):
    out = official_janus.save_pretrained(tmp_path / "rt", layout="official")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "multi_modality"
    back = Janus.from_pretrained(out)
    _same_weights(back, official_janus)
    assert back.config == official_janus.config


def test_generation_defaults_round_trip_and_apply(tmp_path, official_janus):
    from dataclasses import replace

    assert not (OFFICIAL_TINY / "generation.json").exists()
    assert (official_janus.generation.cfg_weight, official_janus.generation.cfg_cutoff) == (5.0, 0.0)
    saved = Janus.from_pretrained(OFFICIAL_TINY)
    saved.generation = replace(saved.generation, cfg_weight=2.0, cfg_cutoff=0.2)
    out = saved.save_pretrained(tmp_path / "gen")
    back = Janus.from_pretrained(out)
    assert (back.generation.cfg_weight, back.generation.cfg_cutoff) == (2.0, 0.2)
    # The defaults are what a call without arguments decodes with; explicit arguments override them.
    by_default = back.generate_images("a red circle", temperature=0).tokens
    assert torch.equal(by_default, back.generate_images("a red circle", temperature=0, cfg_weight=2.0,
                                                        cfg_cutoff=0.2).tokens)
    assert torch.equal(official_janus.generate_images("a red circle", temperature=0).tokens,
                       back.generate_images("a red circle", temperature=0, cfg_weight=5.0, cfg_cutoff=0.0).tokens)


@pytest.mark.parametrize("text,needle", [("{", "not readable JSON"), ('{"cfg_scale": 3}', "unknown key(s) cfg_scale"),
                                         ('{"cfg_cutoff": "high"}', "'cfg_cutoff' must be a number"),
                                         ('{"cfg_cutoff": 1.5}', "0 <= cfg_cutoff < 1"), ("[1]", "expected an object")])
def test_bad_generation_defaults_are_named(tmp_path, official_sd, text, needle):
    d = tmp_path / "ckpt"
    _copy_meta(d)
    save_file(official_sd, str(d / "model.safetensors"))
    (d / "generation.json").write_text(text)
    with pytest.raises(JanusError, match="generation.json") as e:
        Janus.from_pretrained(d)
    assert needle in str(e.value)


def test_image_position_table_round_trips_and_shifts_each_token(tmp_path, official_janus):
    import dataclasses

    from januskit.janus import JanusModel

    cfg = dataclasses.replace(official_janus.config, image_pos_embed=True)
    model = JanusModel(cfg)
    missing, unexpected = model.load_state_dict(official_janus.model.state_dict(), strict=False)
    assert missing == ["image_pos_embed"] and not unexpected
    with torch.no_grad():
        model.image_pos_embed.copy_(torch.randn(model.image_pos_embed.shape))
    janus = Janus(model.eval(), official_janus.processor)
    pixels = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    with torch.no_grad():
        torch.testing.assert_close(model.image_features(pixels),
                                   official_janus.model.image_features(pixels) + model.image_pos_embed)

    out = janus.save_pretrained(tmp_path / "pos")
    assert json.loads((out / "config.json").read_text())["januskit"]["image_pos_embed"] is True
    back = Janus.from_pretrained(out)
    assert back.config.image_pos_embed and back.config == cfg
    _same_weights(back, janus)
    # A checkpoint that says it has the table but lacks the tensor is named, not half-loaded.
    sd = load_file(str(out / "model.safetensors"))
    del sd["image_pos_embed"]
    save_file(sd, str(out / "model.safetensors"))
    with pytest.raises(JanusError, match="image_pos_embed"):
        Janus.from_pretrained(out)
    # transformers' Janus has no such table: the export refuses instead of dropping it.
    with pytest.raises(ValueError, match="image_pos_embed"):
        janus.save_pretrained(tmp_path / "hf", layout="hf")
