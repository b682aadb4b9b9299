"""A short version of the bundled model's chain: every component and stage runs, losses fall, the model
exports and loads, and the evaluation writes a well-formed report."""

import json

import pytest
import torch

from januskit import Janus
from januskit.config import preset
from januskit.pretrain.chain import run_chain
from januskit.pretrain.llm import train_llm
from januskit.pretrain.vq import train_vq


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("chain")
    run_chain(out, fast=True)
    return out


def test_chain_exports_a_loadable_model(chain_dir):
    janus = Janus.from_pretrained(chain_dir / "model")
    assert janus.config.num_image_tokens == 16 and janus.config.image_tokens_per_image == 16
    out = janus.generate_images("a red circle", n=2, seed=0)
    assert len(out.images) == 2 and out.images[0].size == (64, 64)
    assert janus.chat("How many shapes are there?", images=[out.images[0]], max_new_tokens=3).token_ids
    for stage in ("stage1", "stage2", "stage3"):
        assert (chain_dir / stage / "final" / "model.safetensors").exists()
    timings = json.loads((chain_dir / "timings.json").read_text())
    assert set(timings) >= {"data", "tokenizer", "vq", "siglip", "llm", "stage1", "stage2", "stage3"}


def test_chain_resumes_by_skipping_finished_steps(chain_dir):
    before = (chain_dir / "model" / "model.safetensors").stat().st_mtime
    run_chain(chain_dir, fast=True)
    assert (chain_dir / "model" / "model.safetensors").stat().st_mtime == before


def test_component_losses_fall():
    torch.manual_seed(0)
    cfg = preset("januskit-shapes")
    imgs = torch.rand(16, 3, 64, 64) * 2 - 1
    imgs[:, :, :32] = 1.0  # some structure to learn
    from januskit.pretrain import vq as vqmod

    vqmod.log.setLevel("WARNING")
    _, first = train_vq(imgs, cfg.vq, steps=1, batch=8, log_every=1)
    _, last = train_vq(imgs, cfg.vq, steps=25, batch=8, log_every=25)
    assert last["recon"] < first["recon"]
    cfg.llm.vocab_size = 50
    docs = [[1, 2, 3, 4, 5, 6, 7, 8] * 4 for _ in range(20)]
    _, a = train_llm(docs, cfg.llm, steps=1, batch=4, block=16, log_every=1)
    _, b = train_llm(docs, cfg.llm, steps=30, batch=4, block=16, log_every=30)
    assert b["loss"] < 0.5 * a["loss"]


def test_eval_report(chain_dir, tmp_path):
    from januskit.eval.bench import run_eval

    janus = Janus.from_pretrained(chain_dir / "model")
    r = run_eval(janus, chain_dir / "data", tmp_path, n=1, max_prompts=12, max_questions=20)
    assert 0.0 <= r["geneval"]["all"]["overall"] <= 1.0
    assert set(r["cfg_ablation"]) == {1.0, 3.0, 5.0, 7.0}
    assert r["scorer"]["ground_truth"] >= 0.99
    assert "POPE" in (tmp_path / "report.md").read_text() and (tmp_path / "samples.png").exists()
