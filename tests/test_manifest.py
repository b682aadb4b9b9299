"""The real presets, built on the meta device, have exactly the official tensor names and shapes."""

import json

import pytest

from januskit.config import ConfigError, JanusConfig, preset
from januskit.weights import build_on_meta

from conftest import FIXTURES


@pytest.mark.parametrize("name", ["janus-pro-1b", "janus-pro-7b"])
def test_meta_build_matches_official_manifest(name):
    manifest = json.loads((FIXTURES / "official-key-manifest.json").read_text())[name]
    model = build_on_meta(preset(name))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert all(v.is_meta for v in model.state_dict().values())
    want = manifest["tensors"]
    assert sorted(set(ours) - set(want)) == []
    assert sorted(set(want) - set(ours)) == []
    assert {k: v for k, v in ours.items() if want[k] != v} == {}
    n_params = sum(v.numel() for v in model.state_dict().values())
    assert n_params == manifest["n_params"]


def test_janus_13b_shares_the_1b_architecture():
    a, b = preset("janus-1.3b"), preset("janus-pro-1b")
    assert a.llm == b.llm and a.vision == b.vision and a.vq == b.vq


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ConfigError, match="janus-pro-7b"):
        preset("janus-pro-3b")


@pytest.mark.parametrize("name", ["tiny", "janus-pro-1b", "janus-pro-7b"])
def test_config_round_trips_through_official_schema(name):
    cfg = preset(name)
    back = JanusConfig.from_official_dict(cfg.to_official_dict(), num_image_tokens=cfg.num_image_tokens)
    back.name = cfg.name
    back.vq.image_size = cfg.vq.image_size
    assert back == cfg


def test_official_config_omitting_llama_defaults(official_tiny_dir):
    cfg = JanusConfig.from_file(official_tiny_dir / "config.json")
    assert cfg.llm.rms_norm_eps == 1e-6 and cfg.llm.rope_theta == 10000.0
    assert cfg.vision.width == 64 and cfg.vision.layers == 2 and cfg.vq.codebook_size == 512
    assert cfg.num_image_tokens == 576 and cfg.image_tokens_per_image == 576


def test_released_style_config_uses_named_presets(tmp_path):
    d = preset("janus-pro-7b").to_official_dict()
    d["vision_config"]["params"] = {"image_size": 384, "model_name": "siglip_large_patch16_384",
                                    "select_feature": "same", "select_layer": -1}
    d["gen_vision_config"] = {"cls": "VQ-16", "model_type": "gen_vision", "params": {"image_token_size": 16384, "n_embed": 8}}
    d["language_config"] = {"hidden_size": 4096, "intermediate_size": 11008, "max_position_embeddings": 16384,
                            "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 30,
                            "num_key_value_heads": 32, "torch_dtype": "bfloat16", "vocab_size": 102400}
    d.pop("januskit")
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = JanusConfig.from_file(tmp_path / "config.json")
    assert cfg.vision == preset("janus-pro-7b").vision and cfg.vq == preset("janus-pro-7b").vq
    assert cfg.llm.num_hidden_layers == 30 and cfg.llm.head_dim == 128


def test_bad_config_files_are_named(tmp_path):
    p = tmp_path / "config.json"
    with pytest.raises(ConfigError, match="not found"):
        JanusConfig.from_file(p)
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        JanusConfig.from_file(p)
    p.write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="bert"):
        JanusConfig.from_file(p)
    d = preset("tiny").to_official_dict()
    d["vision_config"]["params"] = {"model_name": "siglip_mystery"}
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="siglip_mystery"):
        JanusConfig.from_file(p)
