"""`januskit train` end to end on the shipped tiny recipes and their data: the three stages chained through their
exports, samples and logs in the run directory, and VQ codes from a code cache equal to codes made on the fly."""

from __future__ import annotations

import json

import torch

from januskit.cli import main
from januskit.train.recipe import load_recipe


def train(recipe: str, out, processor, *extra: str) -> int:
    sets = [f"output_dir={out}", f"model.processor={processor}", "train.steps=4", "feedback.sample_every=4",
            "checkpoint.every=2", *extra]
    return main(["train", recipe, *[a for s in sets for a in ("--set", s)]])


def test_three_stages_chain_through_their_exports(tmp_path, official_tiny_dir):
    from januskit import Janus

    assert train("tiny-stage1", tmp_path / "s1", official_tiny_dir) == 0
    for stage in (2, 3):
        previous = tmp_path / f"s{stage - 1}" / "final"
        assert train(f"tiny-stage{stage}", tmp_path / f"s{stage}", official_tiny_dir, f"model.checkpoint={previous}") == 0

    s1 = Janus.from_pretrained(tmp_path / "s1" / "final")
    s3 = Janus.from_pretrained(tmp_path / "s3" / "final")
    assert s3.processor.image_size == s3.config.vision.image_size == 64
    # Stage I leaves the LLM alone; stage II/III train it; nobody trains the VQ.
    fresh = load_recipe("tiny-stage1")
    from januskit.train.checkpoint import init_model

    init, _ = init_model(fresh.model)
    sd0, sd1, sd3 = init.state_dict(), s1.model.state_dict(), s3.model.state_dict()
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    assert torch.equal(sd0[key], sd1[key]) and not torch.equal(sd1[key], sd3[key])
    assert not torch.equal(sd0["gen_head.vision_head.weight"], sd1["gen_head.vision_head.weight"])
    assert all(torch.equal(sd0[k], sd3[k]) for k in sd0 if k.startswith("gen_vision_model."))
    s3.generate_images("a red circle", n=1, seed=0)

    run = tmp_path / "s3"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert all(m["loss/understanding"] is not None and m["tokens_per_s"] > 0 for m in steps)
    data = [m["data"] for m in metrics if "data" in m][-1]
    assert data["sources"]["chat"]["skipped"] == {}
    samples = json.loads((run / "samples" / "step-00000004" / "samples.json").read_text())
    assert samples[0]["question"] and (run / "samples" / "step-00000004" / "image-0.png").exists()
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-00000002", "step-00000004"]
    assert json.loads((run / "recipe.json").read_text())["train"]["stage"] == 3


def test_code_cache_gives_the_same_run_as_codes_made_on_the_fly(tmp_path, official_tiny_dir):
    from januskit.data.codes import prepare_codes
    from januskit.train.checkpoint import init_model, load_processor

    recipe = load_recipe("tiny-stage1", [f"model.processor={official_tiny_dir}"])
    model, config = init_model(recipe.model)  # the VQ the run starts from
    manifest = recipe.data.sources[1]["path"]
    prepare_codes([manifest], model.gen_vision_model, load_processor(recipe.model, config), tmp_path / "codes",
                  image_size=config.vq.image_size)

    assert train("tiny-stage1", tmp_path / "fly", official_tiny_dir, "feedback.sample_every=0") == 0
    assert train("tiny-stage1", tmp_path / "cache", official_tiny_dir, "feedback.sample_every=0",
                 f"data.codes={tmp_path / 'codes'}") == 0

    def losses(run):
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    assert losses(tmp_path / "cache") == losses(tmp_path / "fly")


def test_cli_resume_continues_and_refuses_to_overwrite(tmp_path, official_tiny_dir, capsys):
    out = tmp_path / "run"
    assert train("tiny-stage1", out, official_tiny_dir, "feedback.sample_every=0") == 0
    assert train("tiny-stage1", out, official_tiny_dir, "feedback.sample_every=0") == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(["train", "tiny-stage1", "--resume", "--set", f"output_dir={out}", "--set",
                 f"model.processor={official_tiny_dir}", "--set", "train.steps=6", "--set",
                 "feedback.sample_every=0"]) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == [1, 2, 3, 4, 5, 6]
