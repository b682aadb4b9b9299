"""Everything the trainer reads or writes on disk: initial weights, resumable checkpoints, the final export.

Initial weights: a whole Janus checkpoint, or parts (LLM, SigLIP, VQ) over a random init, with strict name and
shape checks through a small prefix map. Training checkpoints are `checkpoints/step-XXXXXXXX/` directories,
written as `step-XXXXXXXX.tmp/` and renamed once complete (a leftover `.tmp` is never read): model and
optimizer through `torch.distributed.checkpoint` (sharded for FSDP, deduplicated for DDP, plain otherwise),
one small file per rank (RNG states, data position), and `train_state.json` (step, LR, recipe, model config).
The final export is a standard Janus checkpoint that `Janus.from_pretrained` loads, processor files included.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import weights
from ..config import JanusConfig, preset
from .parallel import DistEnv
from .recipe import ModelRecipe

STEP_DIR = re.compile(r"step-(\d+)")

# Part checkpoints: recipe key -> (prefix in the Janus state dict, source prefixes tried in order). A source
# prefix of "" takes the file's names as they are: transformers' LlamaForCausalLM for the LLM, timm's SigLIP
# ViT, LlamaGen's VQModel; the longer prefixes accept the same part taken out of a Janus checkpoint.
PARTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "llm": ("language_model.", ("language_model.", "")),
    "siglip": ("vision_model.vision_tower.", ("vision_model.vision_tower.", "vision_tower.", "")),
    "vq": ("gen_vision_model.", ("gen_vision_model.", "")),
}
# Names some part checkpoints carry that Janus recomputes (RoPE tables) or never uses (a timm classifier head).
IGNORED_PART_SUFFIXES = (".rotary_emb.inv_freq",)
IGNORED_PART_NAMES = ("head.weight", "head.bias")


# ---------------------------------------------------------------------------------------------- initial weights
def model_config(spec: ModelRecipe) -> JanusConfig:
    """The architecture the recipe trains (read without loading any weight)."""
    return JanusConfig.from_file(Path(spec.checkpoint) / "config.json") if spec.checkpoint else preset(spec.preset)


def init_model(spec: ModelRecipe) -> tuple[nn.Module, JanusConfig]:
    """The JanusModel (fp32, CPU) the recipe starts from."""
    config = model_config(spec)
    if spec.checkpoint:
        directory = Path(spec.checkpoint)
        model = weights.load_into(weights.build_on_meta(config), weights.read_state_dict(directory),
                                  source=str(directory))
        return model, config
    model = weights.init_weights(weights.build_on_meta(config), seed=spec.init_seed, std=spec.init_std)
    for part in PARTS:
        path = getattr(spec, part)
        if path:
            load_part(model, part, Path(path))
    return model, config


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint directory or a single .safetensors / .pt / .bin file, names as stored."""
    path = Path(path)
    if path.is_dir():
        return dict(weights.iter_tensors(weights.weight_files(path)))
    if not path.exists():
        raise weights.CheckpointError(f"{path}: no such file or directory")
    if path.suffix == ".safetensors":
        return dict(weights.iter_tensors([path]))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise weights.CheckpointError(f"{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})") from None
    # Training checkpoints (LlamaGen's VQ among them) wrap the weights: {"model": {...}, ...}.
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in ("model", "state_dict", "module", "ema") if k in obj), None)
        if inner is None:
            raise weights.CheckpointError(f"{path}: no tensors found (top-level keys: {', '.join(map(str, obj))})")
        obj = inner
    if not isinstance(obj, dict):
        raise weights.CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_part(model: nn.Module, part: str, path: Path) -> None:
    """Copy one part's tensors into `model` with strict name and shape checks."""
    target, sources = PARTS[part]
    sd = read_tensors(path)
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(target)}
    for src in sources:
        picked = {k[len(src):]: v for k, v in sd.items() if k.startswith(src)}
        if picked:
            break
    picked = {target + k: v for k, v in picked.items()
              if k not in IGNORED_PART_NAMES and not k.endswith(IGNORED_PART_SUFFIXES)}
    source = f"model.{part} = {path}"
    unexpected = sorted(set(picked) - set(expected))
    missing = sorted(k for k in set(expected) - set(picked) if not weights._is_optional(k))
    for what, names in (("unexpected tensor(s)", unexpected), ("tensor(s) missing", missing)):
        if names:
            shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
            raise weights.CheckpointError(f"{source}: {what} for the {target}* part: {shown}")
    with torch.no_grad():
        for name, t in picked.items():
            if tuple(t.shape) != tuple(expected[name].shape):
                raise weights.CheckpointError(f"{source}: tensor {name} has shape {tuple(t.shape)} but the config "
                                              f"expects {tuple(expected[name].shape)}")
            expected[name].copy_(t)


def processor_dir(spec: ModelRecipe) -> Path:
    from ..api import default_model_dir

    return Path(spec.processor or spec.checkpoint or spec.llm or default_model_dir())


def load_processor(spec: ModelRecipe, config: JanusConfig):
    """The tokenizer and image settings of `processor_dir`, with the image geometry of the model being trained
    (a processor taken from another checkpoint may be set up for another resolution)."""
    from ..processor import JanusProcessor

    directory = processor_dir(spec)
    if not (directory / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer in {directory}: set model.processor to a directory with the tokenizer "
                                "and processor files (a released Janus checkpoint, for instance)")
    processor = JanusProcessor.from_pretrained(directory, num_image_tokens=config.num_image_tokens)
    processor.image_size = config.vision.image_size
    return processor


# ---------------------------------------------------------------------------------------------- training checkpoints
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync(Path(dirpath) / f)
        _fsync(Path(dirpath))


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns whenever it runs without a process group, which is just what a `single` run is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; `.tmp` directories (interrupted writes) are not among them."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir()
             if d.is_dir() and STEP_DIR.fullmatch(d.name) and (d / "train_state.json").exists()]
    return sorted(found, key=lambda d: int(STEP_DIR.fullmatch(d.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def init_adamw_state(optimizer: torch.optim.AdamW) -> None:
    """Create AdamW's state for every parameter now, with the values its first step would create (step 0,
    zero moments), so the math is unchanged. A parameter that has seen no gradient yet (no image in the first
    steps, or one the forward never uses) then still has state: every checkpoint holds the same keys, and
    resuming never lets the checkpoint loader invent a state that an uninterrupted run would not have."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            if group["capturable"] or group["fused"]:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            else:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def save_checkpoint(run_dir: Path, step: int, forward: nn.Module, optimizer, env: DistEnv, rank_state: dict,
                    train_state: dict, keep: int) -> Path:
    """Collective: write `checkpoints/step-XXXXXXXX/` atomically, then drop all but the `keep` newest."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f"{final.name}.tmp"
    if env.is_main:
        for stale in root.glob("step-*.tmp"):  # left by a run killed while writing
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    env.barrier()
    model_sd, optim_sd = get_state_dict(forward, optimizer)
    with _single_process_ok():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"), no_dist=not env.distributed)
    # Our own file, read back only by `load_checkpoint` (python RNG state and data positions are not tensors).
    torch.save({"rng": rng_state(env.device), **rank_state}, tmp / f"rank-{env.rank:05d}.pt")
    env.barrier()
    if env.is_main:
        (tmp / "train_state.json").write_text(json.dumps(train_state, indent=2) + "\n")
        _fsync_tree(tmp)
        os.replace(tmp, final)
        _fsync(root)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    env.barrier()
    return final


def load_checkpoint(path: Path, forward: nn.Module, optimizer, env: DistEnv) -> tuple[dict, dict]:
    """Collective: restore model, optimizer and this rank's RNG state; return (train_state, rank_state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    train_state = json.loads((path / "train_state.json").read_text())
    if train_state["world_size"] != env.world_size:
        raise ValueError(f"{path} was written by {train_state['world_size']} ranks; resume it with as many "
                         f"(this run has {env.world_size}) so every rank finds its data position and RNG state")
    model_sd, optim_sd = get_state_dict(forward, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _single_process_ok():
        dcp.load(state, checkpoint_id=str(path / "dcp"), no_dist=not env.distributed)
    set_state_dict(forward, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank_state = torch.load(path / f"rank-{env.rank:05d}.pt", weights_only=False)
    set_rng_state(rank_state.pop("rng"), env.device)
    return train_state, rank_state


# ---------------------------------------------------------------------------------------------- export
def full_model(forward: nn.Module, model: nn.Module, config: JanusConfig, env: DistEnv) -> nn.Module | None:
    """Collective: the complete JanusModel on rank 0's CPU, gathered from the FSDP shards of `forward` (None on
    the other ranks). Single and DDP runs hand back `model` itself, complete on every rank."""
    if env.strategy != "fsdp":
        return model if env.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(forward, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not env.is_main:
        return None
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    dtype = next(iter(sd.values())).dtype
    return weights.load_into(weights.build_on_meta(config), sd, dtype=dtype, source="FSDP state")


def export(model: nn.Module, processor, directory: Path) -> Path:
    """Write a standard Janus checkpoint (config, safetensors, processor files)."""
    from ..api import Janus

    training = model.training
    Janus(model, processor).save_pretrained(directory)
    model.train(training)
    return Path(directory)
