"""The training engine in isolation (tiny preset, CPU): stages, packed vs unpacked loss, accumulation vs one big
batch, kill-and-resume, atomic checkpoints, and a tiny model overfitting a small mixed dataset.

Samples are built directly (the `Sample` contract), so these tests need no tokenizer, images or data files.
"""

from __future__ import annotations


import pytest
import torch

from januskit.config import preset
from januskit.data.packing import pack
from januskit.data.sample import IGNORE, Sample
from januskit.train import checkpoint, stages
from januskit.train.loop import lr_at, setup, run_training, train, train_step
from januskit.train.loss import TrainForward, loss_sums
from januskit.train.parallel import DistEnv
from januskit.train.recipe import OptimRecipe, Recipe

CFG = preset("tiny")
BOI = 4


# ---------------------------------------------------------------------------------------------- synthetic samples
def und_sample(g: torch.Generator, n_answer: int = 6) -> Sample:
    """[bos, image x16, question x3, answer]: the text head learns the answer."""
    n_img, S = CFG.num_image_tokens, CFG.vision.image_size
    q, a = torch.randint(5, 400, (3,), generator=g), torch.randint(5, 400, (n_answer,), generator=g)
    ids = torch.cat([torch.tensor([1]), torch.full((n_img,), 3), q, a])
    T = len(ids)
    text = torch.full((T,), IGNORE)
    text[T - n_answer - 1:T - 1] = a
    und = torch.zeros(T, dtype=torch.bool)
    und[1:1 + n_img] = True
    return Sample(ids, text, torch.full((T,), IGNORE), und, torch.full((T,), -1),
                  torch.randn(1, 3, S, S, generator=g), "understanding", "caption")


def text_sample(g: torch.Generator, n: int = 10) -> Sample:
    ids = torch.randint(5, 400, (n,), generator=g)
    text = torch.full((n,), IGNORE)
    text[:-1] = ids[1:]
    S = CFG.vision.image_size
    return Sample(ids, text, torch.full((n,), IGNORE), torch.zeros(n, dtype=torch.bool), torch.full((n,), -1),
                  torch.zeros(0, 3, S, S), "text", "text")


def gen_sample(g: torch.Generator, n_prompt: int = 4) -> Sample:
    """[prompt, <boi>, code x16]: the image head predicts each next code from <boi> on."""
    K, S = CFG.image_tokens_per_image, CFG.vision.image_size
    prompt = torch.randint(5, 400, (n_prompt,), generator=g)
    codes = torch.randint(0, CFG.vq.codebook_size, (K,), generator=g)
    ids = torch.cat([prompt, torch.tensor([BOI]), torch.zeros(K, dtype=torch.long)])
    T = len(ids)
    image = torch.full((T,), IGNORE)
    image[n_prompt:n_prompt + K] = codes
    gen_codes = torch.full((T,), -1)
    gen_codes[n_prompt + 1:] = codes
    return Sample(ids, torch.full((T,), IGNORE), image, torch.zeros(T, dtype=torch.bool), gen_codes,
                  torch.zeros(0, 3, S, S), "generation", "t2i")


def mixed_samples(seed: int, n: int) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    makers = (und_sample, text_sample, gen_sample)
    return [makers[i % 3](g) for i in range(n)]


class SyntheticData:
    """A stand-in for the mixture: step `s` has a fixed global batch, each rank takes a strided share."""

    def __init__(self, rank: int = 0, world_size: int = 1, fixed: bool = False, fail_at: int | None = None):
        self.rank, self.world_size, self.fixed, self.fail_at = rank, world_size, fixed, fail_at
        self.served = 0

    def next_step(self, step: int, global_samples: int) -> list[Sample]:
        if step == self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        samples = mixed_samples(0 if self.fixed else step, global_samples)[self.rank::self.world_size]
        self.served += len(samples)
        return samples

    def state_dict(self) -> dict:
        return {"served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.served = state["served"]

    def stats(self) -> dict:
        return {"served": self.served, "skipped": {}}


def recipe(tmp_path, **overrides) -> Recipe:
    r = Recipe(name="test", output_dir=str(tmp_path / "run"))
    r.train.steps, r.train.global_batch, r.train.micro_batch, r.train.max_len = 3, 6, 2, 128
    r.checkpoint.every = 0
    r.feedback.tensorboard = False
    for key, value in overrides.items():
        section, field = key.split("__")
        setattr(getattr(r, section), field, value)
    return r.validate()


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ---------------------------------------------------------------------------------------------- stages
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_one_step_changes_only_the_stage_parameters(tmp_path, stage):
    run = setup(recipe(tmp_path, train__stage=stage), DistEnv(), data=SyntheticData())
    before = params(run.model)
    train_step(run, 0)
    changed = {k for k, v in run.model.named_parameters() if not torch.equal(v.detach(), before[k])}
    trainable = {k for k, v in run.model.named_parameters() if v.requires_grad}
    plan = stages.stage_plan(stage)
    assert trainable == {k for k in before if plan.is_trainable(k)}
    assert changed and changed <= trainable
    top = {k.split(".")[0] for k in changed}
    expected = {1: {"aligner", "gen_aligner", "gen_head", "gen_embed"},
                2: {"aligner", "gen_aligner", "gen_head", "gen_embed", "language_model"},
                3: {"aligner", "gen_aligner", "gen_head", "gen_embed", "language_model", "vision_model"}}[stage]
    assert top == expected
    # Frozen parts sit in eval mode, trained ones in train mode.
    assert run.model.gen_vision_model.training is False
    assert run.model.vision_model.training is (stage == 3)
    assert run.model.aligner.training is True


def test_stage_overrides_by_pattern():
    plan = stages.stage_plan(2, frozen=["language_model.model.layers.0.*"])
    assert not plan.is_trainable("language_model.model.layers.0.mlp.up_proj.weight")
    assert plan.is_trainable("language_model.model.layers.1.mlp.up_proj.weight")
    assert not plan.is_trainable("vision_model.vision_tower.pos_embed")
    plan = stages.stage_plan(1, trainable=["gen_head.*"])
    assert plan.is_trainable("gen_head.vision_head.weight") and not plan.is_trainable("aligner.layers.0.weight")
    with pytest.raises(ValueError, match="unknown stage"):
        stages.stage_plan(4)


# ---------------------------------------------------------------------------------------------- loss
def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = loss_sums(TrainForward(model), batch)
    out.loss.backward()
    return out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_packed_loss_equals_unpacked(tiny_model):
    stages.apply_stage(tiny_model, stages.stage_plan(3))
    samples = mixed_samples(1, 7)
    packed = pack(samples, 128, pad_id=0, packing=True)
    single = pack(samples, 128, pad_id=0, packing=False)
    assert packed.input_ids.shape[0] < single.input_ids.shape[0]
    a, ga = _loss_and_grads(tiny_model, packed)
    b, gb = _loss_and_grads(tiny_model, single)
    n = packed.num_loss_tokens
    assert n == single.num_loss_tokens
    assert abs(a.loss.item() / n - b.loss.item() / n) < 1e-5
    torch.testing.assert_close(a.group_loss, b.group_loss, atol=1e-4, rtol=1e-5)
    assert torch.equal(a.group_tokens, b.group_tokens)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=1e-6, rtol=1e-4, msg=k)


def test_heads_only_see_loss_positions(tiny_model):
    """A batch without any loss token still runs (empty head inputs) and gives a zero loss."""
    batch = pack([text_sample(torch.Generator().manual_seed(0))], 64, pad_id=0)
    batch.text_targets = torch.full_like(batch.text_targets, IGNORE)
    stages.apply_stage(tiny_model, stages.stage_plan(1))
    out = loss_sums(TrainForward(tiny_model), batch)
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()


# ---------------------------------------------------------------------------------------------- accumulation
def _step_capturing_grads(run) -> tuple:
    """One train_step; the clipped gradients are read just before AdamW uses them (comparing the updated weights
    instead would amplify rounding: Adam's first update is about lr * sign(grad), even for grads near zero)."""
    grads, adam_step = {}, run.optimizer.step

    def capture(*args, **kwargs):
        grads.update({k: p.grad.clone() for k, p in run.model.named_parameters() if p.grad is not None})
        return adam_step(*args, **kwargs)

    run.optimizer.step = capture
    return train_step(run, 0), grads


def test_accumulation_equals_one_big_batch(tmp_path):
    runs = []
    for micro in (1, 100):
        r = recipe(tmp_path / str(micro), train__stage=3, train__micro_batch=micro, train__packing=False)
        runs.append(_step_capturing_grads(setup(r, DistEnv(), data=SyntheticData())))
    (s1, g1), (s2, g2) = runs
    assert s1.loss_tokens == s2.loss_tokens
    assert abs(s1.loss - s2.loss) < 1e-6
    assert abs(s1.grad_norm - s2.grad_norm) < 1e-5
    assert g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], atol=1e-7, rtol=1e-4, msg=k)


def test_lr_schedule():
    o = OptimRecipe(lr=1e-3, warmup_steps=4)
    assert [lr_at(s, o, 10) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    c = OptimRecipe(lr=1e-3, warmup_steps=0, schedule="cosine")
    assert lr_at(0, c, 10) == pytest.approx(1e-3) and lr_at(5, c, 10) == pytest.approx(5e-4)
    assert lr_at(10, c, 10) == pytest.approx(0.0, abs=1e-12)


def test_lr_scale_by_pattern(tmp_path):
    """The aligner at a tenth of the LR: with Adam (step size ~ lr) its first update is ~10x smaller."""
    moved = {}
    for scale in (1.0, 0.1):
        run = setup(recipe(tmp_path / str(scale), train__stage=2, optim__lr_scale={"aligner.*": scale}), DistEnv(),
                    data=SyntheticData())
        before = params(run.model)
        train_step(run, 0)
        moved[scale] = {k: (v.detach() - before[k]).abs().max().item() for k, v in run.model.named_parameters()}
        lrs = sorted(g["lr"] for g in run.optimizer.param_groups)
        assert lrs == pytest.approx([1e-3 * scale, 1e-3] if scale != 1 else [1e-3, 1e-3])
    w = "aligner.layers.0.weight"
    assert moved[0.1][w] == pytest.approx(0.1 * moved[1.0][w], rel=0.05)
    emb = "language_model.model.embed_tokens.weight"
    assert moved[0.1][emb] == pytest.approx(moved[1.0][emb], rel=1e-4)


def test_lr_scale_errors(tmp_path):
    with pytest.raises(ValueError, match="'alinger.\\*' matches no parameter"):
        setup(recipe(tmp_path, optim__lr_scale={"alinger.*": 0.1}), DistEnv(), data=SyntheticData())
    with pytest.raises(ValueError, match="optim.lr_scale must be > 0"):
        recipe(tmp_path, optim__lr_scale={"aligner.*": 0.0})


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("lr_scale", [{}, {"aligner.*": 0.1, "language_model.model.layers.0.*": 0.5}])
def test_kill_and_resume_matches_uninterrupted(tmp_path, lr_scale):
    kw = dict(train__stage=3, train__steps=5, checkpoint__every=2, optim__warmup_steps=3, optim__lr_scale=lr_scale)
    full = [s.loss for s in train(recipe(tmp_path / "a", **kw), data=SyntheticData())]

    r = recipe(tmp_path / "b", **kw)
    with pytest.raises(KeyboardInterrupt):
        train(r, data=SyntheticData(fail_at=3))  # killed while building step 4; step-2 checkpoint on disk
    assert [d.name for d in checkpoint.checkpoint_dirs(r.output_dir)] == ["step-00000002"]
    with pytest.raises(ValueError, match="--resume"):
        train(r, data=SyntheticData())
    data = SyntheticData()
    resumed = train(r, resume="latest", data=data)
    assert [s.step for s in resumed] == [3, 4, 5]
    assert [s.loss for s in resumed] == full[2:]  # exact in fp32
    assert data.served == 5 * 6  # the data position came back with the checkpoint


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    r = recipe(tmp_path, train__steps=4, checkpoint__every=1, checkpoint__keep=2)
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    (root / "step-00000099.tmp").mkdir()  # a crashed write: never picked up
    (root / "step-00000099.tmp" / "train_state.json").write_text("{")
    run = setup(r, DistEnv(), data=SyntheticData())
    run_training(run, resume="latest")  # nothing complete yet: starts from 0
    names = sorted(d.name for d in root.iterdir())
    assert names == ["step-00000003", "step-00000004"]  # pruned to 2; the stale .tmp removed by the next save
    assert checkpoint.latest_checkpoint(r.output_dir).name == "step-00000004"
    # A leftover .tmp of a newer step than the latest complete one is still ignored.
    (root / "step-00000005.tmp").mkdir()
    assert checkpoint.latest_checkpoint(r.output_dir).name == "step-00000004"
    saved = checkpoint.checkpoint_dirs(r.output_dir)[-1]
    assert {p.name for p in saved.iterdir()} >= {"dcp", "rank-00000.pt", "train_state.json"}


# ---------------------------------------------------------------------------------------------- learning
def test_tiny_model_overfits_a_small_mixed_dataset(tmp_path):
    r = recipe(tmp_path, train__stage=3, train__steps=60, train__global_batch=6, train__micro_batch=8,
               optim__lr=5e-3, optim__warmup_steps=2)
    history = train(r, data=SyntheticData(fixed=True))
    first, last = history[0].group_loss, history[-1].group_loss
    for group in ("understanding", "text", "generation"):
        assert last[group] < 0.3 * first[group], (group, first[group], last[group])


def test_data_stats_merge_over_ranks():
    from januskit.train.loop import merge_rank_stats

    a = {"step": 3, "groups": {"text": 1}, "sources": {"s": {"records": 8, "samples": 2, "skipped": {"bad image": 1}}}}
    b = {"step": 3, "groups": {"text": 2},
         "sources": {"s": {"records": 8, "samples": 3, "skipped": {"bad image": 2, "too long": 1}}}}
    assert merge_rank_stats([a, b]) == {"step": 3, "groups": {"text": 3}, "sources": {"s": {
        "records": 8, "samples": 5, "skipped": {"bad image": 3, "too long": 1}}}}


def test_compiled_training_matches_eager_and_inference_stays_eager(tmp_path):
    eager = setup(recipe(tmp_path / "eager", train__stage=3), DistEnv(), data=SyntheticData())
    compiled = setup(recipe(tmp_path / "compiled", train__stage=3, train__compile=True), DistEnv(),
                     data=SyntheticData())
    assert compiled.model.decoder._compiled is not None and eager.model.decoder._compiled is None
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())  # names untouched
    batch = pack(mixed_samples(5, 6), 128, 0)
    for run in (eager, compiled):
        loss_sums(run.forward, batch).loss.backward()
    for (name, p), q in zip(eager.model.named_parameters(), compiled.model.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-6, msg=name)
    for run in (eager, compiled):
        run.optimizer.zero_grad(set_to_none=True)
    for step in range(3):
        assert train_step(compiled, step).loss == pytest.approx(train_step(eager, step).loss, rel=1e-5)

    frames = dict(torch._dynamo.utils.counters["frames"])
    with torch.no_grad():
        x = torch.randn(1, 5, CFG.llm.hidden_size)
        out = compiled.model.eval().decoder(x)
        torch.testing.assert_close(out, eager.model.eval().decoder(x), rtol=1e-4, atol=1e-5)
    assert dict(torch._dynamo.utils.counters["frames"]) == frames  # no compilation outside training steps


def test_compile_without_a_compiler_says_so_and_stays_eager(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("januskit.generate.shutil.which", lambda name: None)
    with caplog.at_level("INFO"):
        run = setup(recipe(tmp_path, train__compile=True), DistEnv(), data=SyntheticData())
    assert run.model.decoder._compiled is None
    assert "train.compile: no C++ compiler" in caplog.text
    with pytest.raises(ValueError, match="train.compile must be false with train.strategy = fsdp"):
        recipe(tmp_path, train__compile=True, train__strategy="fsdp")
