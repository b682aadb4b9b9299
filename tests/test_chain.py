"""A short version of the bundled model's chain: every component and stage runs, losses fall, the model
exports and loads, and the evaluation writes a well-formed report."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from januskit import Janus
from januskit.config import preset
from januskit.pretrain.chain import FAST, run_chain
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
    for stage in ("stage1", "stage2", "stage3", "describe"):
        assert (chain_dir / stage / "final" / "model.safetensors").exists()
    timings = json.loads((chain_dir / "timings.json").read_text())
    assert set(timings) >= {"data", "tokenizer", "vq", "siglip", "llm", "stage1", "stage2", "stage3", "describe"}


def test_describe_stage_follows_stage_three_and_makes_the_model(chain_dir):
    """The last stage: stage III's mixture with the caption and list chats beside the other chats, from stage III's
    weights; its weights are the exported model's. A world written before describe_chat.jsonl existed gets it."""
    import shutil

    from safetensors.torch import load_file

    recipe = json.loads((chain_dir / "describe" / "recipe.json").read_text())
    assert recipe["model"]["checkpoint"] == str(chain_dir / "stage3" / "final")
    assert recipe["train"]["steps"] == FAST.describe_steps and recipe["train"]["max_len"] == 256
    sources = {s["name"]: s for s in recipe["data"]["sources"]}
    assert list(sources) == ["chat", "describe_chat", "text", "text_to_image", "chat_image"]
    assert sources["chat"]["weight"] == 3 * sources["describe_chat"].get("weight", 1.0)
    assert all(Path(s["path"]).parent == chain_dir / "data" for s in sources.values())
    model, describe = (load_file(str(chain_dir / d / "model.safetensors")) for d in ("model", "describe/final"))
    assert model.keys() == describe.keys() and all(torch.equal(model[k], describe[k]) for k in model)

    chats = chain_dir / "data" / "describe_chat.jsonl"
    before = chats.read_bytes()
    chats.unlink()
    shutil.rmtree(chain_dir / "describe")
    shutil.rmtree(chain_dir / "model")
    stage3_steps = (chain_dir / "stage3" / "metrics.jsonl").read_text().count('"step"')
    run_chain(chain_dir, fast=True)
    assert chats.read_bytes() == before
    assert (chain_dir / "describe" / "final" / "model.safetensors").exists()
    assert (chain_dir / "stage3" / "metrics.jsonl").read_text().count('"step"') == stage3_steps  # not retrained


def test_sincos_table_is_distinct_per_cell_and_unit_scale():
    from januskit.pretrain.siglip import sincos_2d

    t = sincos_2d(4, 128)
    assert t.shape == (16, 128)
    assert torch.cdist(t, t).add(torch.eye(16) * 1e9).min() > 1.0  # no two cells alike
    assert abs(float(t.pow(2).mean().sqrt()) - 1.0) < 0.05
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d(4, 130)


def test_interrupted_stage_resumes_from_its_checkpoint(chain_dir):
    import shutil

    # Take stage 3 back to "interrupted after its checkpoint": final weights gone, checkpoints kept. Started afresh,
    # the stage's process would refuse the run directory ("already holds checkpoints") and the chain would raise.
    shutil.rmtree(chain_dir / "stage3" / "final")
    shutil.rmtree(chain_dir / "model")
    steps_logged = (chain_dir / "stage3" / "metrics.jsonl").read_text().count('"step"')
    before = json.loads((chain_dir / "timings.json").read_text())
    run_chain(chain_dir, fast=True)
    assert (chain_dir / "model" / "model.safetensors").exists()
    assert (chain_dir / "stage3" / "metrics.jsonl").read_text().count('"step"') == steps_logged  # nothing retrained
    # The resumed call times only what it ran; the earlier steps' times stay in timings.json.
    after = json.loads((chain_dir / "timings.json").read_text())
    assert {k: v for k, v in after.items() if k != "stage3"} == {k: v for k, v in before.items() if k != "stage3"}


def test_a_failing_stage_names_itself(tmp_path):
    from januskit.pretrain.chain import _train_in_own_process

    with pytest.raises(RuntimeError, match="shapes-stage3: training stopped with exit code 1"):
        _train_in_own_process("shapes-stage3", [f"model.checkpoint={tmp_path / 'missing'}",
                                                f"output_dir={tmp_path / 'run'}"], None)


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
    from januskit.eval.bench import markdown, run_eval

    janus = Janus.from_pretrained(chain_dir / "model")
    r = run_eval(janus, chain_dir / "data", tmp_path, n=1, max_prompts=12, max_questions=20)
    assert 0.0 <= r["geneval"]["all"]["overall"] <= 1.0
    assert set(r["cfg_ablation"]) == {1.0, 3.0, 5.0, 7.0}
    # The chain's model carries its guidance cutoff; the report adds the official decoding for comparison.
    assert r["cfg_cutoff"] == janus.generation.cfg_cutoff > 0
    assert set(r["cfg_ablation_no_cutoff"]) == {1.0, 3.0, 5.0, 7.0}
    assert r["scorer"]["ground_truth"] >= 0.99
    report = (tmp_path / "report.md").read_text()
    assert "POPE" in report and "Without the cutoff" in report and (tmp_path / "samples.png").exists()
    pc = r["places_and_captions"]
    assert pc["where"]["questions"] > 0 and pc["caption"]["images"] > 0 and "Where is the" in report
    # A model that gives reasons gets their breakdown in the report (this one answers bare, so none).
    assert "given with their reason" not in report
    r["understanding"]["seen"]["reasons"] = {"answers": 7, "places_right": 0.5, "follows": 1.0}
    assert "(seen): 7; both rows or columns named right in 0.50 of them" in markdown(r)


def test_chain_records_the_component_gates(chain_dir):
    vq = json.loads((chain_dir / "vq" / ".done").read_text())
    assert 0.0 <= vq["reconstruction"]["objects"] <= 1.0 and "semantic" in vq
    probe = json.loads((chain_dir / "siglip" / ".done").read_text())["probe"]
    assert set(probe) == {"shape", "color", "size", "position"}


def test_cell_labels_follow_the_grid():
    from januskit.data.world import Obj, Scene
    from januskit.pretrain.cells import HEADS, cell_labels, content_index

    y = cell_labels(Scene([Obj("triangle", "blue", "large", 8, 8), Obj("circle", "red", "small", 40, 56)]))
    assert y.shape == (3, 4, 4) and int((y[0] > 0).sum()) == 2
    assert y[:, 0, 0].tolist() == [3, 3, 2]  # triangle (3rd shape), blue (3rd colour), large (2nd size)
    assert y[0, 3, 2] == 1 and y[2, 3, 2] == 1  # the small circle in row 3, column 2
    assert all(int(y[i].max()) < k for i, k in enumerate(HEADS))
    idx = content_index(y)  # one index per content, 0 for an empty cell, distinct for the two shapes
    assert idx.shape == (4, 4) and int((idx > 0).sum()) == 2 and idx[0, 0] != idx[3, 2]


def test_semantic_loss_separates_latents_and_checks_its_labels():
    import random

    from januskit.data.world import random_scene
    from januskit.pretrain import vq as vqmod
    from januskit.pretrain.cells import cell_labels

    vqmod.log.setLevel("WARNING")
    cfg = preset("januskit-shapes").vq
    rng = random.Random(0)
    scenes = [random_scene(rng, n=8) for _ in range(16)]
    imgs = vqmod.pil_to_tensor([s.render(64) for s in scenes])
    labels = torch.stack([cell_labels(s) for s in scenes])
    _, first = train_vq(imgs, cfg, steps=1, batch=8, log_every=1, labels=labels, ae_warmup=1.0)
    vq, last = train_vq(imgs, cfg, steps=30, batch=8, log_every=30, labels=labels, ae_warmup=1.0)
    assert last["semantic"] < first["semantic"] and last["compact"] < first["compact"]
    assert not vq.quant_conv._forward_hooks  # the training hook is gone from the returned model
    acc = vqmod.reconstruction_accuracy(vq, scenes[:4])
    assert 0.0 <= acc["objects"] <= 1.0 and 0.0 <= acc["scenes"] <= 1.0
    with pytest.raises(ValueError, match="labels"):
        train_vq(imgs, cfg, steps=1, batch=8, labels=labels[:3])


def test_probe_reads_what_the_features_carry():
    import random

    from januskit.data.world import random_scene
    from januskit.pretrain.cells import cell_labels
    from januskit.pretrain.siglip import probe_accuracy, sincos_2d
    from januskit.pretrain.vq import pil_to_tensor
    from januskit.siglip import VisionTower

    cfg = preset("januskit-shapes").vision
    rng = random.Random(1)

    def data(n):
        scenes = [random_scene(rng) for _ in range(n)]
        return pil_to_tensor([s.render(64) for s in scenes]), torch.stack([cell_labels(s) for s in scenes])

    torch.manual_seed(0)
    acc = probe_accuracy(VisionTower(cfg).eval(), data(96), data(32), steps=150)
    # Even a random tower's patch embedding is a linear map of the patch pixels: colour is linearly readable.
    assert acc["color"] > 0.8 and set(acc) == {"shape", "color", "size", "position"}
    # A tower with no position table and no attention mixing cannot tell its patches apart by place ...
    blank = VisionTower(cfg).eval()
    with torch.no_grad():
        blank.vision_tower.pos_embed.zero_()
        for block in blank.vision_tower.blocks:
            block.attn.proj.weight.zero_()
            block.attn.proj.bias.zero_()
    px, lab = data(96)
    px[:] = px[:1]  # one scene only: the features of equal patches are equal
    assert probe_accuracy(blank, (px, lab), (px[:32], lab[:32]), steps=100)["position"] < 0.5
    # ... and the sine-cosine table the chain seeds it with makes every cell readable.
    with torch.no_grad():
        blank.vision_tower.pos_embed.copy_(sincos_2d(4, cfg.width)[None])
    assert probe_accuracy(blank, (px, lab), (px[:32], lab[:32]), steps=100)["position"] == 1.0
    x, y = data(4)
    with pytest.raises(ValueError, match="cells"):
        probe_accuracy(VisionTower(cfg).eval(), (x, y[:, :, :2]), (x, y), steps=1)


def test_code_entropy_is_zero_for_one_code_per_content_and_counts_noise(monkeypatch):
    import random

    from januskit.data.world import random_scene
    from januskit.pretrain import vq as vqmod
    from januskit.pretrain.cells import cell_labels, content_index
    from januskit.vq import VQModel

    rng = random.Random(2)
    scenes = [random_scene(rng) for _ in range(40)]
    vq = VQModel(preset("januskit-shapes").vq).eval()
    content = content_index(torch.stack([cell_labels(s) for s in scenes])).flatten(1)  # one code per content

    def encode_as(codes):
        it = iter(codes.split(64))
        return lambda x: next(it)

    monkeypatch.setattr(vq, "encode", encode_as(content))
    exact = vqmod.code_entropy(vq, scenes)
    assert exact["bits_per_cell"] == 0.0 and exact["empty_codes"] == 1
    # Empty cells spread over 4 codes at random: up to 2 bits each, weighted by how many cells are empty.
    noisy = content.clone()
    empty = content == 0
    noisy[empty] = torch.randint(0, 4, (int(empty.sum()),), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(vq, "encode", encode_as(noisy))
    got = vqmod.code_entropy(vq, scenes)
    share = float(empty.float().mean())
    assert got["empty_codes"] == 4 and 0.9 * 2 * share < got["bits_per_cell"] <= 2 * share


def test_merge_codes_leaves_one_code_per_content_group():
    import random

    from januskit.data.world import random_scene
    from januskit.pretrain import vq as vqmod
    from januskit.pretrain.cells import cell_labels
    from januskit.vq import VQModel

    torch.manual_seed(0)
    rng = random.Random(3)
    scenes = [random_scene(rng, n=rng.randint(1, 8)) for _ in range(24)]
    imgs = vqmod.pil_to_tensor([s.render(64) for s in scenes])
    labels = torch.stack([cell_labels(s) for s in scenes])
    vq = VQModel(preset("januskit-shapes").vq).eval()
    before = {k: v.clone() for k, v in vq.decoder.state_dict().items()}
    info = vqmod.merge_codes(vq, imgs, labels, steps=2, batch=4)
    assert info["contents"] <= info["codes_before"] and info["finetune_loss"] > 0
    used = vq.encode(imgs).unique()
    vectors = vq.quantize.embedding.weight[used]
    assert len(torch.unique(vectors, dim=0)) == len(used) <= info["contents"]  # merged codes share one vector
    assert any(not torch.equal(before[k], v) for k, v in vq.decoder.state_dict().items())  # decoder fine-tuned
    with pytest.raises(ValueError, match="labelled cells"):
        vqmod.merge_codes(vq, imgs, labels[:, :, :2], steps=0)


def test_factored_head_scores_a_code_by_the_sum_of_its_attributes():
    from januskit.pretrain.cells import HEADS, code_contents, factored_head

    def content(shape, color, size):
        return (shape * HEADS[1] + color) * HEADS[2] + size

    # Codes 0-4 hold: empty, (triangle, purple, small), (square, purple, small), (triangle, red, small),
    # (square, red, small); code 5 is what the majority of its cells hold; code 6 is never chosen.
    held = {0: content(0, 0, 0), 1: content(3, 5, 1), 2: content(2, 5, 1), 3: content(3, 1, 1), 4: content(2, 1, 1)}
    codes = torch.tensor([0, 1, 2, 3, 4, 5, 5, 5] * 2).view(1, 16)
    labels = torch.zeros(1, 3, 4, 4, dtype=torch.long)
    cells = list(held.values()) + [content(1, 2, 2), content(1, 2, 2), content(1, 3, 2)]
    for i, c in enumerate(cells * 2):
        labels[0, :, i // 4, i % 4] = torch.tensor([c // (HEADS[1] * HEADS[2]), c // HEADS[2] % HEADS[1], c % HEADS[2]])
    contents = code_contents(codes, labels, 7)
    assert contents.tolist() == list(held.values()) + [content(1, 2, 2), -1]
    weight, bias = factored_head(contents, 32, seed=0)
    assert bias.tolist() == [0.0] * 6 + [-30.0] and weight[6].abs().sum() == 0
    h = torch.randn(5, 32)
    logits = h @ weight.t() + bias
    # Changing the shape moves the logit by the same amount whatever the colour: purple triangle - purple square ==
    # red triangle - red square, so the first is learnt from the other three.
    torch.testing.assert_close(logits[:, 1] - logits[:, 2], logits[:, 3] - logits[:, 4])
    with pytest.raises(ValueError, match="width 8"):
        factored_head(contents, 8)


def test_chain_with_the_factored_head_keeps_it_frozen(tmp_path):
    from safetensors.torch import load_file

    from januskit.pretrain.chain import FACTORED_HEAD

    run_chain(tmp_path, fast=True, factored_head=True)
    info = json.loads((tmp_path / "stage0" / ".done").read_text())
    assert info["factored_head"] and info["codes_with_content"] >= 2
    key = FACTORED_HEAD.replace("*", "weight")
    start, end = (load_file(str(tmp_path / d / "model.safetensors"))[key] for d in ("stage0", "model"))
    assert torch.equal(start.float(), end.float()) and start.abs().sum() > 0
    with pytest.raises(ValueError, match="factored image head"):
        run_chain(tmp_path, fast=True)


def test_a_chain_keeps_its_where_and_caption_turns(chain_dir):
    # Started without them, a run directory refuses to resume with them (its chats were written without).
    for kw, what in (({"where_turns": True}, "where turns"), ({"caption_turns": True}, "caption turns"),
                     ({"where_stage": True}, "the where stage"), ({"position_scan": True}, "scanned position answers")):
        with pytest.raises(ValueError, match=f"started without {what}"):
            run_chain(chain_dir, fast=True, **kw)


def test_chain_with_where_and_caption_turns_trains_on_longer_rows(tmp_path):
    run_chain(tmp_path, fast=True, where_turns=True, caption_turns=True)
    chats = (tmp_path / "data" / "chat.jsonl").read_text()
    assert "Where is the" in chats and "Describe the image in detail." in chats
    rows = {s: json.loads((tmp_path / s / "recipe.json").read_text())["train"]["max_len"] for s in ("stage2", "stage3")}
    assert rows == {"stage2": 192, "stage3": 256}  # only stage III reads the chats
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_chain_with_the_where_stage_runs_it_between_stages_two_and_three(tmp_path):
    run_chain(tmp_path, fast=True, where_stage=True)
    chats = (tmp_path / "data" / "where_chat.jsonl").read_text().splitlines()
    assert chats and all("Where is the" in line for line in chats)
    recipes = {s: json.loads((tmp_path / s / "recipe.json").read_text()) for s in ("where", "stage3")}
    assert recipes["where"]["model"]["checkpoint"] == str(tmp_path / "stage2" / "final")
    assert recipes["stage3"]["model"]["checkpoint"] == str(tmp_path / "where" / "final")
    assert [s["name"] for s in recipes["where"]["data"]["sources"]] == ["where_chat"]
    assert "where" in json.loads((tmp_path / "timings.json").read_text())
    assert (tmp_path / "model" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="started with the where stage"):
        run_chain(tmp_path, fast=True)


def test_chain_with_position_reasons_trains_on_reasoned_answers(tmp_path):
    from januskit.data.world import final_answer

    run_chain(tmp_path, fast=True, position_reasons=True)
    rows = [json.loads(line) for line in open(tmp_path / "data" / "vqa.jsonl")]
    position = [r["answer"] for r in rows if r["qtype"] == "position"]
    assert position and all(", so " in a and final_answer(a) in ("yes", "no") for a in position)
    assert all(", so " not in r["answer"] for r in rows if r["qtype"] != "position")
    assert (tmp_path / "model" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="position reasons"):
        run_chain(tmp_path, fast=True)


def test_chain_with_the_image_position_table_trains_it_from_stage_one(tmp_path):
    from safetensors.torch import load_file

    from januskit.train.stages import stage_plan

    assert stage_plan(1).is_trainable("image_pos_embed") and not stage_plan(1).is_trainable("language_model.x")
    run_chain(tmp_path, fast=True, image_pos_embed=True)
    assert json.loads((tmp_path / "stage0" / ".done").read_text())["image_pos_embed"]
    start, s1 = (load_file(str(tmp_path / d / "model.safetensors"))["image_pos_embed"]
                 for d in ("stage0", "stage1/final"))
    torch.testing.assert_close(start.norm(dim=-1), torch.ones(16))  # unit-norm sine-cosine seed, one row a patch
    assert not torch.equal(start, s1)  # an adaptor: it trains in stage I
    janus = Janus.from_pretrained(tmp_path / "model")
    assert janus.config.image_pos_embed
    with pytest.raises(ValueError, match="image position table"):
        run_chain(tmp_path, fast=True)


def test_chain_with_position_scan_runs_the_scan_stage_after_the_where_stage(tmp_path):
    run_chain(tmp_path, fast=True, size=dataclasses.replace(FAST, scan_stage3_steps=3), where_stage=True,
              position_scan=True)
    chats = (tmp_path / "data" / "scan_chat.jsonl").read_text().splitlines()
    assert chats and any("List the shapes." in line for line in chats)
    recipes = {s: json.loads((tmp_path / s / "recipe.json").read_text()) for s in ("where", "scan", "stage3")}
    assert recipes["scan"]["model"]["checkpoint"] == str(tmp_path / "where" / "final")
    assert recipes["stage3"]["model"]["checkpoint"] == str(tmp_path / "scan" / "final")
    assert [s["name"] for s in recipes["scan"]["data"]["sources"]] == ["scan_chat"]
    assert recipes["scan"]["train"]["max_len"] == recipes["stage3"]["train"]["max_len"] == 256
    assert recipes["scan"]["train"]["steps"] == FAST.scan_steps and recipes["stage3"]["train"]["steps"] == 3
    assert "scan" in json.loads((tmp_path / "timings.json").read_text())
    assert (tmp_path / "model" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="started with scanned position answers"):
        run_chain(tmp_path, fast=True, where_stage=True)
    with pytest.raises(ValueError, match="either reasoned .* or scanned"):
        run_chain(tmp_path / "both", fast=True, position_reasons=True, position_scan=True)
    assert not (tmp_path / "both").exists()


def test_chain_with_scan_weight_mixes_the_scan_chats_into_stage_three(tmp_path):
    size = dataclasses.replace(FAST, scan_weight=2.0, scan_steps=3)
    run_chain(tmp_path, fast=True, size=size, position_scan=True)
    assert not (tmp_path / "scan").exists()
    recipe = json.loads((tmp_path / "stage3" / "recipe.json").read_text())
    assert recipe["model"]["checkpoint"] == str(tmp_path / "stage2" / "final")
    assert recipe["train"]["steps"] == FAST.stage_steps[2] + 3 and recipe["train"]["max_len"] == 256
    sources = {s["name"]: s for s in recipe["data"]["sources"]}
    assert list(sources) == ["chat", "text", "text_to_image", "chat_image", "scan_chat"]
    assert sources["scan_chat"]["weight"] == 2.0 and sources["scan_chat"]["group"] == "understanding"
    assert all(Path(s["path"]).parent == tmp_path / "data" and Path(s["path"]).exists() for s in sources.values())
    assert (tmp_path / "model" / "model.safetensors").exists()
