"""Initial weights for a run: a whole checkpoint, or the parts (LLM, SigLIP, VQ) in their own released layouts
over a random init, with strict names and shapes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from januskit.train.checkpoint import init_model
from januskit.train.recipe import ModelRecipe
from januskit.weights import CheckpointError


def _part(model, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


def test_parts_load_from_their_own_layouts(tmp_path, tiny_model):
    # transformers LlamaForCausalLM names, a timm SigLIP file, a LlamaGen VQ training checkpoint {"model": ...}
    (tmp_path / "llm").mkdir()
    save_file(_part(tiny_model, "language_model."), str(tmp_path / "llm" / "model.safetensors"))
    save_file(_part(tiny_model, "vision_model.vision_tower."), str(tmp_path / "siglip.safetensors"))
    torch.save({"model": _part(tiny_model, "gen_vision_model."), "steps": 1}, tmp_path / "vq.pt")

    spec = ModelRecipe(preset="tiny", llm=str(tmp_path / "llm"), siglip=str(tmp_path / "siglip.safetensors"),
                       vq=str(tmp_path / "vq.pt"), init_seed=123)
    model, config = init_model(spec)
    want, got = tiny_model.state_dict(), model.state_dict()
    for k in want:
        if k.startswith(("language_model.", "vision_model.", "gen_vision_model.")):
            assert torch.equal(want[k], got[k]), k
        elif want[k].dim() == 2:  # adaptors and heads stay random (another seed)
            assert not torch.equal(want[k], got[k]), k


def test_whole_checkpoint(official_tiny_dir):
    model, config = init_model(ModelRecipe(checkpoint=str(official_tiny_dir)))
    assert config.llm.hidden_size == 96 and model.language_model.lm_head.weight.shape[0] == config.llm.vocab_size


def test_part_errors_name_the_tensor(tmp_path, tiny_model):
    sd = _part(tiny_model, "language_model.")
    del sd["lm_head.weight"]
    save_file(sd, str(tmp_path / "llm.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.llm = .*llm.safetensors: tensor\(s\) missing .*lm_head.weight"):
        init_model(ModelRecipe(preset="tiny", llm=str(tmp_path / "llm.safetensors")))
    sd = _part(tiny_model, "language_model.")
    sd["model.norm.weight"] = torch.ones(3)
    save_file(sd, str(tmp_path / "llm.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.norm.weight has shape \(3,\) but the config expects \(64,\)"):
        init_model(ModelRecipe(preset="tiny", llm=str(tmp_path / "llm.safetensors")))
