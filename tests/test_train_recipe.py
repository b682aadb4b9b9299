"""Recipes: the shipped files load with the published hyperparameters; `--set` overrides are type-checked."""

from __future__ import annotations

import json

import pytest

from januskit.train.recipe import Recipe, RecipeError, apply_override, load_recipe, shipped_recipes

# (lr, warm-up, global batch, steps, understanding:text:generation) per shipped recipe, from the papers.
PUBLISHED = {
    "janus-pro-1b-stage1": (1e-3, 600, 256, 20_000, (1, 0, 3)),
    "janus-pro-1b-stage2": (1e-4, 5000, 512, 360_000, (2, 3, 5)),
    "janus-pro-1b-stage3": (4e-5, 0, 128, 80_000, (5, 1, 4)),
    "janus-pro-7b-stage1": (1e-3, 600, 256, 20_000, (1, 0, 3)),
    "janus-pro-7b-stage2": (1e-4, 5000, 512, 360_000, (2, 3, 5)),
    "janus-pro-7b-stage3": (4e-5, 0, 128, 40_000, (5, 1, 4)),
    "janus-1.3b-stage3": (2e-5, 0, 256, 24_000, (7, 3, 10)),
}


def test_every_shipped_recipe_loads():
    names = shipped_recipes()
    for size in ("janus-pro-1b", "janus-pro-7b", "janus-1.3b", "tiny"):
        for stage in (1, 2, 3):
            assert f"{size}-stage{stage}" in names
    for name in names:
        r = load_recipe(name)
        assert r.name == name and r.train.stage == int(name[-1])
        assert (r.optim.beta1, r.optim.beta2, r.optim.weight_decay, r.optim.clip) == (0.9, 0.95, 0.0, 1.0)
        if not name.startswith(("tiny", "shapes")):  # toy recipes that run on a CPU
            assert r.train.max_len == 4096 and r.train.dtype == "bf16" and r.train.packing
        assert r.data.sources, name


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_hyperparameters(name):
    r = load_recipe(name)
    lr, warmup, batch, steps, ratio = PUBLISHED[name]
    assert r.optim.lr == pytest.approx(lr) and r.optim.warmup_steps == warmup and r.optim.schedule == "constant"
    assert r.train.global_batch == batch and r.train.steps == steps
    assert tuple(r.data.ratio[g] for g in ("understanding", "text", "generation")) == ratio


def test_janus_stage2_switches_from_imagenet_to_text_to_image():
    r = load_recipe("janus-1.3b-stage2")
    windows = {s["name"]: (s.get("start_step", 0), s.get("end_step")) for s in r.data.sources}
    assert windows["imagenet"] == (0, 120_000) and windows["text-to-image"] == (120_000, None)


def test_set_overrides_are_typed():
    r = load_recipe("janus-pro-1b-stage2", [
        "optim.lr=3e-5", "optim.warmup_steps=10", "train.strategy=ddp", "train.packing=false",
        "data.sources.text.path=/data/text.jsonl", "data.sources.0.weight=2", "data.ratio.text=1",
        "model.checkpoint=2024", "feedback.sample_prompts=[\"a\", \"b\"]", "train.trainable=['gen_head.*']",
    ])
    assert r.optim.lr == 3e-5 and r.optim.warmup_steps == 10 and r.train.strategy == "ddp"
    assert r.train.packing is False and r.train.trainable == ["gen_head.*"]
    assert r.data.sources[1]["path"] == "/data/text.jsonl" and r.data.sources[0]["weight"] == 2
    assert r.data.ratio["text"] == 1.0 and isinstance(r.data.ratio["text"], float)
    assert r.model.checkpoint == "2024"  # a str field keeps a value that looks like a number
    assert r.feedback.sample_prompts == ["a", "b"]
    r2 = load_recipe("tiny-stage1", ["optim.lr=1"])  # an int is a fine float
    assert r2.optim.lr == 1.0 and isinstance(r2.optim.lr, float)


@pytest.mark.parametrize("assignment, message", [
    ("optim.lrr=1e-4", "unknown key 'optim.lrr'"),
    ("optimizer.lr=1e-4", "unknown key 'optimizer'"),
    ("optim.lr=fast", "optim.lr: expected float, got str 'fast'"),
    ("train.steps=1.5", "train.steps: expected int, got float"),
    ("train.packing=1", "train.packing: expected bool, got int"),
    ("train.trainable=gen_head", "train.trainable: expected a list"),
    ("data.sources.nope.path=/x", "no item 'nope' in 'data.sources'"),
    ("data.sources.0.weight=heavy", "data.sources.0.weight: expected float, got str 'heavy'"),
    ("data.sources.text.wieght=2", "unknown key 'data.sources.text.wieght'"),
    ("data.sources.text.end_step=soon", "data.sources.text.end_step: expected int | None"),
    ("optim.lr.x=1", "'optim.lr' is a value, not a table"),
    ("optim.lr", "expected key=value"),
    ("train.strategy=tp", "train.strategy must be single, ddp, fsdp"),
    ("train.stage=4", "train.stage must be 1, 2 or 3"),
])
def test_set_errors_name_the_key(assignment, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_recipe("janus-pro-1b-stage2", [assignment])


def test_recipe_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nstage = 2\nsteps = "many"\n')
    with pytest.raises(RecipeError, match=r"bad.toml: train.steps: expected int, got str"):
        load_recipe(bad)
    bad.write_text('[[data.sources]]\nname = "a"\npath = "a.jsonl"\ngroup = "text"\nshards = 3\n')
    with pytest.raises(RecipeError, match=r"data.sources\[0\] \('a'\): unknown key\(s\) shards"):
        load_recipe(bad)
    bad.write_text('[trian]\nstage = 2\n')
    with pytest.raises(RecipeError, match=r"unknown key\(s\) trian"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="no shipped recipe of that name; shipped: .*tiny-stage1"):
        load_recipe("janus-pro-3b-stage1")


def test_relative_data_paths_follow_the_recipe_file(tmp_path):
    (tmp_path / "exp").mkdir()
    f = tmp_path / "exp" / "r.toml"
    f.write_text('[data]\nratio = { understanding = 1 }\n[[data.sources]]\nname = "a"\npath = "d/a.jsonl"\n'
                 'group = "understanding"\n')
    r = load_recipe(f, ["output_dir=out"])
    assert r.data.sources[0]["path"] == str((tmp_path / "exp" / "d" / "a.jsonl").resolve())
    assert r.output_dir == "out"
    assert Recipe.from_dict(r.to_dict()).to_dict() == r.to_dict()  # round trip (train_state.json keeps it)


def test_cli_prints_the_resolved_recipe(capsys):
    from januskit.cli import main

    assert main(["train", "janus-pro-7b-stage3", "--set", "optim.lr=1e-5", "--print-recipe"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["optim"]["lr"] == 1e-5 and out["train"]["steps"] == 40_000
    assert main(["train", "janus-pro-7b-stage3", "--set", "optim.betas=1"]) == 2
    assert "unknown key 'optim.betas'" in capsys.readouterr().err


def test_apply_override_in_place():
    r = Recipe()
    apply_override(r, "checkpoint.keep=5")
    assert r.checkpoint.keep == 5
