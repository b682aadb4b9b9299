"""The training loop: set a run up from a recipe, then optimizer steps until the recipe's last one.

One step: this rank's share of the mixture's global batch, packed into rows, split into micro-batches of at most
`train.micro_batch` rows, gradients accumulated over them, every micro-batch's summed loss divided by the loss-token
count of the whole step on all ranks (so any number of ranks and micro-batches gives the gradient of one big
batch), clipped, AdamW with linear warm-up then a constant LR. Every rank runs the same number of forward/backward
passes (a rank with fewer micro-batches runs empty ones), as DDP and FSDP require.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.sample import GROUPS, IGNORE, Batch
from . import checkpoint, parallel, stages
from .feedback import Feedback, StepStats
from .loss import TrainForward, loss_sums
from .parallel import DistEnv
from .recipe import OptimRecipe, Recipe


def lr_at(step: int, optim: OptimRecipe, total_steps: int) -> float:
    """LR of optimizer step `step` (0-based): linear warm-up over `warmup_steps`, then constant or cosine to 0."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "cosine":
        done = (step - optim.warmup_steps) / max(total_steps - optim.warmup_steps, 1)
        return optim.lr * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
    return optim.lr


# ---------------------------------------------------------------------------------------------- batches
def split_rows(batch: Batch, rows: int, num_image_tokens: int) -> list[Batch]:
    """Split a packed batch into micro-batches of at most `rows` rows, each with its own images and cut to the
    length of its longest row."""
    B = batch.input_ids.shape[0]
    images_per_row = (batch.und_mask.sum(1) // num_image_tokens).tolist()  # (B,)
    out, first_image = [], 0
    for start in range(0, B, rows):
        stop = min(start + rows, B)
        n_images = int(sum(images_per_row[start:stop]))
        T = int((batch.doc_ids[start:stop] >= 0).sum(1).max())
        fields = {k: v[start:stop, :T] for k, v in batch.__dict__.items()
                  if isinstance(v, torch.Tensor) and k != "pixel_values"}
        pixels = batch.pixel_values[first_image:first_image + n_images]
        first_image += n_images
        out.append(Batch(**fields, pixel_values=pixels, kinds=batch.kinds))
    return out


def filler_batch(image_size: int, pad_id: int, length: int = 2) -> Batch:
    """A one-row batch with no loss token, run by a rank that has fewer micro-batches than the others."""
    ids = torch.full((1, length), pad_id, dtype=torch.long)
    return Batch(input_ids=ids, text_targets=torch.full_like(ids, IGNORE), image_targets=torch.full_like(ids, IGNORE),
                 und_mask=torch.zeros_like(ids, dtype=torch.bool), gen_codes=torch.full_like(ids, -1),
                 pixel_values=torch.zeros(0, 3, image_size, image_size), doc_ids=torch.full_like(ids, -1),
                 positions=torch.zeros_like(ids), group_ids=torch.full_like(ids, -1))


# ---------------------------------------------------------------------------------------------- set-up
@dataclass
class Run:
    recipe: Recipe
    env: DistEnv
    config: Any  # JanusConfig
    model: nn.Module  # the plain JanusModel (inside `forward`)
    forward: nn.Module  # TrainForward, wrapped by the strategy
    optimizer: torch.optim.Optimizer
    data: Any  # Mixture: next_step / state_dict / load_state_dict / stats
    processor: Any  # JanusProcessor, or None for engine-only runs (no samples, no export)
    pad_id: int
    feedback: Feedback

    @property
    def run_dir(self) -> Path:
        return Path(self.recipe.output_dir)


def prepare_model(model: nn.Module, recipe: Recipe, env: DistEnv) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Stage, precision, device, then the parallel transform and the optimizer: (wrapped TrainForward, AdamW)."""
    t, o = recipe.train, recipe.optim
    stages.apply_stage(model, stages.stage_plan(t.stage, t.trainable, t.frozen))
    if t.dtype == "bf16" and t.precision == "pure":
        model.to(torch.bfloat16)
    model.to(env.device)
    forward = parallel.parallelize(TrainForward(model), env, t.dtype, t.precision, t.activation_checkpointing)
    groups = param_groups(parallel.unwrap(forward).model, o.lr_scale)
    # foreach: one kernel per op over all parameters (torch's default on GPUs only); on the CPU the same numbers,
    # bit for bit, a quarter faster (14 -> 10.5 ms a step for the bundled model's 6M trainable parameters).
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                                  foreach=True)
    checkpoint.init_adamw_state(optimizer)
    return forward, optimizer


def compile_decoder(model: nn.Module, device: torch.device) -> str:
    """`train.compile`: torch.compile the decoder blocks for training steps, where the backend has what it needs
    (a C++ compiler on the CPU, Triton on a GPU); returns the line to log."""
    from ..generate import compile_unavailable

    why = compile_unavailable(device)
    if why is not None:
        return f"train.compile: {why}; training stays eager"
    model.decoder.compile_for_training()
    return f"train.compile: {len(model.decoder.layers)} decoder blocks compiled for training (the first steps compile)"


def param_groups(model: nn.Module, lr_scale: dict[str, float]) -> list[dict]:
    """The trainable parameters as AdamW groups: one per `lr_scale` pattern (the first match wins, in the recipe's
    order) carrying its `lr_scale`, then the rest at scale 1. A pattern that names no parameter is an error."""
    patterns = list(lr_scale)
    named = list(model.named_parameters())
    for pat in patterns:
        if not any(fnmatchcase(name, pat) for name, _ in named):
            raise ValueError(f"optim.lr_scale: pattern {pat!r} matches no parameter of the model "
                             f"(names look like {named[0][0]!r})")
    buckets: dict[str | None, list] = {pat: [] for pat in patterns} | {None: []}
    for name, p in named:
        if p.requires_grad:
            buckets[next((pat for pat in patterns if fnmatchcase(name, pat)), None)].append(p)
    return [{"params": ps, "lr_scale": lr_scale.get(pat, 1.0)} for pat, ps in buckets.items() if ps]


def build_data(recipe: Recipe, processor, config, vq: nn.Module, env: DistEnv):
    """The mixture feeding this rank: sources -> sample builder (VQ codes from the cache, or encoded on the fly
    by a private fp32 copy of `vq`, the model's own being sharded or cast later) -> this rank's shares."""
    from ..data.builders import SampleBuilder
    from ..data.codes import CodeCache, OnTheFlyCodes, vq_fingerprint
    from ..data.mixture import Mixture, MixtureSpec

    d = recipe.data
    size = config.vq.image_size
    if d.codes:  # the fingerprint makes codes of another VQ or resolution an error
        codes = CodeCache(d.codes, fingerprint=vq_fingerprint(vq, size))
    else:
        encoder = copy.deepcopy(vq).float().eval().to(env.device)
        codes = OnTheFlyCodes(encoder, processor, size, device=env.device)
    builder = SampleBuilder(processor, config, codes, cfg_dropout=d.cfg_dropout,
                            first_sentence_prob=d.first_sentence_prob, max_len=recipe.train.max_len)
    spec = MixtureSpec.from_dict(d.mixture_dict())
    return Mixture(spec, builder, base_seed=recipe.train.seed, rank=env.rank, world_size=env.world_size,
                   total_steps=recipe.train.steps)


def setup(recipe: Recipe, env: DistEnv, data=None, processor=None) -> Run:
    """Everything a run needs; `data` (and `processor`) may be given to run the engine on other samples."""
    random.seed(recipe.train.seed + env.rank)
    torch.manual_seed(recipe.train.seed + env.rank)
    if data is None:  # the tokenizer is checked before a large model is loaded
        processor = processor or checkpoint.load_processor(recipe.model, checkpoint.model_config(recipe.model))
    model, config = checkpoint.init_model(recipe.model)
    if data is None:
        data = build_data(recipe, processor, config, model.gen_vision_model, env)
    forward, optimizer = prepare_model(model, recipe, env)
    pad_id = processor.pad_id if processor is not None else 0
    feedback = Feedback(Path(recipe.output_dir), env.is_main, recipe.train.steps, recipe.feedback.log_every,
                        recipe.feedback.tensorboard)
    if recipe.train.compile:
        feedback.info(compile_decoder(model, env.device))
    return Run(recipe, env, config, model, forward, optimizer, data, processor, pad_id, feedback)


# ---------------------------------------------------------------------------------------------- one step
def train_step(run: Run, step: int) -> StepStats:
    """Optimizer step `step` (0-based); returns its statistics reduced over all ranks."""
    from ..data.packing import pack

    t, env = run.recipe.train, run.env
    t0 = time.perf_counter()
    lr = lr_at(step, run.recipe.optim, t.steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]

    samples = run.data.next_step(step, t.global_batch)
    micro = split_rows(pack(samples, t.max_len, run.pad_id, packing=t.packing), t.micro_batch,
                       run.config.num_image_tokens) if samples else []
    local = torch.tensor([sum(b.num_loss_tokens for b in micro), sum(int((b.doc_ids >= 0).sum()) for b in micro),
                          len(samples)], dtype=torch.float64)
    loss_tokens, tokens, n_samples = (int(x) for x in env.all_reduce(local).tolist())
    n_micro = int(env.all_reduce(torch.tensor([len(micro)]), "max").item())
    filler = filler_batch(run.config.vision.image_size, run.pad_id)
    # DDP and FSDP average gradients over ranks; scaling by world / global count makes that a global token mean.
    scale = env.world_size / max(loss_tokens, 1)

    group_loss = torch.zeros(len(GROUPS), dtype=torch.float64, device=env.device)
    group_tokens = torch.zeros(len(GROUPS), dtype=torch.float64, device=env.device)
    for i in range(n_micro):
        batch = (micro[i] if i < len(micro) else filler).to(env.device)
        with parallel.accumulation(run.forward, sync=i == n_micro - 1):
            with parallel.autocast(env, t.dtype, t.precision):
                out = loss_sums(run.forward, batch)
            (out.loss * scale).backward()
        group_loss += out.group_loss.double()
        group_tokens += out.group_tokens.double()

    params = [p for p in run.forward.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, run.recipe.optim.clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)

    sums = env.all_reduce(torch.cat([group_loss, group_tokens])).cpu()
    group_loss, group_tokens = sums[: len(GROUPS)], sums[len(GROUPS):]
    return StepStats(
        step=step + 1,
        loss=float(group_loss.sum() / max(loss_tokens, 1)),
        group_loss={g: (float(group_loss[i] / group_tokens[i]) if group_tokens[i] else None)
                    for i, g in enumerate(GROUPS)},
        group_tokens={g: int(group_tokens[i]) for i, g in enumerate(GROUPS)},
        lr=lr, grad_norm=float(grad_norm), tokens=tokens, loss_tokens=loss_tokens, samples=n_samples,
        seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------------------------- the run
# Data statistics that count this rank's own work (summed over ranks); everything else (the global plan, source
# sizes) is the same on every rank and is taken from rank 0.
PER_RANK_STATS = ("groups", "samples", "skipped")


def merge_rank_stats(per_rank: list, summed: bool = False) -> Any:
    first = per_rank[0]
    if isinstance(first, dict):
        keys = dict.fromkeys(k for r in per_rank if isinstance(r, dict) for k in r)
        return {k: merge_rank_stats([r.get(k) for r in per_rank if isinstance(r, dict) and k in r],
                                    summed or k in PER_RANK_STATS) for k in keys}
    if summed and all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in per_rank):
        return sum(per_rank)
    return first


def _data_report(run: Run, step: int) -> None:
    stats = run.data.stats() if hasattr(run.data, "stats") else {}
    run.feedback.data_report(step, merge_rank_stats(run.env.gather_objects(stats)))


def _save(run: Run, step: int) -> None:
    r = run.recipe
    train_state = {"step": step, "lr": lr_at(max(step - 1, 0), r.optim, r.train.steps),
                   "world_size": run.env.world_size, "strategy": r.train.strategy, "recipe": r.to_dict(),
                   "config": run.config.to_dict()}
    path = checkpoint.save_checkpoint(run.run_dir, step, run.forward, run.optimizer, run.env,
                                      {"data": run.data.state_dict()}, train_state, r.checkpoint.keep)
    run.feedback.info(f"checkpoint {path}")


def _resume(run: Run, resume: str | None) -> int:
    """The step to start from: 0, or the step of the checkpoint named by `resume` ("latest" or a path)."""
    if resume is None:
        if checkpoint.checkpoint_dirs(run.run_dir):
            raise ValueError(f"{run.run_dir} already holds checkpoints: pass --resume to continue that run, "
                             "or choose another output_dir")
        return 0
    path = checkpoint.latest_checkpoint(run.run_dir) if resume == "latest" else Path(resume)
    if path is None:
        run.feedback.info(f"no checkpoint in {run.run_dir}/checkpoints: starting from step 0")
        return 0
    train_state, rank_state = checkpoint.load_checkpoint(path, run.forward, run.optimizer, run.env)
    run.data.load_state_dict(rank_state["data"])
    run.feedback.info(f"resumed from {path} at step {train_state['step']}")
    return int(train_state["step"])


def _samples(run: Run, step: int) -> None:
    from ..api import Janus

    f, t = run.recipe.feedback, run.recipe.train
    model = checkpoint.full_model(run.forward, run.model, run.config, run.env)
    if model is not None:
        dtype = next(model.parameters()).dtype
        if run.env.strategy == "fsdp":
            dtype = torch.bfloat16 if t.dtype == "bf16" and run.env.device.type == "cuda" else torch.float32
            model = model.to(run.env.device, dtype)
        with torch.no_grad():
            run.feedback.samples(step, Janus(model, run.processor, run.env.device, dtype), f.sample_prompts,
                                 f.sample_images, f.sample_question, f.sample_max_new_tokens)
    stages.set_train_mode(run.model)
    run.env.barrier()


def _export(run: Run) -> Path | None:
    model = checkpoint.full_model(run.forward, run.model, run.config, run.env)
    out = run.run_dir / "final"
    if model is not None:
        checkpoint.export(model, run.processor, out)
        run.feedback.info(f"final weights written to {out}")
    stages.set_train_mode(run.model)
    run.env.barrier()
    return out


def run_training(run: Run, resume: str | None = None) -> list[StepStats]:
    """Steps from the resumed position to `train.steps`, with checkpoints, samples and the final export."""
    r = run.recipe
    start = _resume(run, resume)
    if run.env.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "recipe.json").write_text(json.dumps(r.to_dict(), indent=2) + "\n")
    n_train = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    run.feedback.info(f"{r.name}: stage {r.train.stage}, {n_train:,} trainable parameters, strategy "
                      f"{r.train.strategy} x{run.env.world_size} on {run.env.device}, steps {start}..{r.train.steps}")
    history = []
    for step in range(start, r.train.steps):
        stats = train_step(run, step)
        history.append(stats)
        run.feedback.step(stats)
        done = stats.step
        if (r.checkpoint.every and done % r.checkpoint.every == 0) or done == r.train.steps:
            _data_report(run, done)
            _save(run, done)
        if run.processor is not None and r.feedback.sample_every and done % r.feedback.sample_every == 0:
            _samples(run, done)
    # Export after training, and also when a run resumed at its last checkpoint had stopped before exporting.
    if run.processor is not None and (start < r.train.steps or not (run.run_dir / "final" / "config.json").exists()):
        _export(run)
    return history


def train(recipe: Recipe, resume: str | None = None, data=None, processor=None) -> list[StepStats]:
    """Run a recipe in this process (one rank of a torchrun job, or alone). Returns this run's step statistics."""
    env = parallel.init_distributed(recipe.train.strategy, recipe.train.device)
    run = None
    try:
        run = setup(recipe, env, data, processor)
        history = run_training(run, resume)
        env.barrier()
        return history
    finally:
        if run is not None:
            run.feedback.close()
            if hasattr(run.data, "close"):
                run.data.close()
        parallel.shutdown(env)
