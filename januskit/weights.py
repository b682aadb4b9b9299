"""Checkpoint files: finding, reading (lazily), strict loading into a meta-built model, and writing.

Reads `model.safetensors`, sharded safetensors with `model.safetensors.index.json`, and `pytorch_model*.bin`
(with or without an index; `weights_only=True`, memory-mapped), in the official layout or in transformers'
layout (converted by `hf_layout`). Loading assigns tensors into a model built on the meta device, so a 7B model
never exists twice in memory. Every name and shape is checked; the only keys allowed to be absent are the ones
Janus never uses (`OPTIONAL_KEYS`), which are then initialised.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import hf_layout


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file, the tensor and the shapes."""


# Present in released checkpoints, never used by the Janus forward: accepted when present, initialised when absent.
OPTIONAL_KEYS = ("vision_model.vision_tower.attn_pool.", "gen_vision_model.quantize.codebook_used")


def _is_optional(name: str) -> bool:
    return any(name.startswith(p) for p in OPTIONAL_KEYS)


# ---------------------------------------------------------------------------------------------- reading
def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, in a fixed order; error if there are none."""
    directory = Path(directory)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
            files = [directory / f for f in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{index}: shard file(s) missing: {', '.join(missing)}")
            return files
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    shards = sorted(directory.glob("model-*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if shards:
        return shards
    raise CheckpointError(
        f"{directory}: no weights found (expected model.safetensors, a sharded safetensors index, or pytorch_model*.bin)"
    )


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every file without loading whole files into memory."""
    for f in files:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for name in sf.keys():
                        yield name, sf.get_tensor(name)
            except Exception as e:  # safetensors' SafetensorError derives from Exception only
                if isinstance(e, (OSError, RuntimeError, ValueError)) or type(e).__name__ == "SafetensorError":
                    raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
                raise
        else:
            try:
                sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(f"{f}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})") from None
            if not isinstance(sd, dict):
                raise CheckpointError(f"{f}: expected a state dict, found {type(sd).__name__}")
            yield from sd.items()


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory in the official layout (transformers layout converted)."""
    files = weight_files(directory)
    sd = dict(iter_tensors(files))
    if hf_layout.is_hf_layout(sd):
        sd = hf_layout.hf_to_official(sd)
    return sd


# ---------------------------------------------------------------------------------------------- loading
def build_on_meta(config) -> nn.Module:
    from .janus import JanusModel

    with torch.device("meta"):
        return JanusModel(config)


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], device="cpu", dtype=torch.float32, source="checkpoint"):
    """Assign `sd` into a meta-built model with strict name and shape checks; cast floats to `dtype`.

    `device` may be a function of the tensor name, to place parts of the model on different devices.
    """
    place = device if callable(device) else (lambda name: device)
    expected = model.state_dict()
    unexpected = sorted(k for k in sd if k not in expected)
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else "")
        raise CheckpointError(f"{source}: unexpected tensor(s) not in the model: {shown}")
    missing = sorted(k for k in expected if k not in sd and not _is_optional(k))
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise CheckpointError(f"{source}: tensor(s) missing from the checkpoint: {shown}")
    for name, t in sd.items():
        want = tuple(expected[name].shape)
        if tuple(t.shape) != want:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(t.shape)} in the checkpoint but the config expects {want}"
            )
    converted = {}
    for name, t in sd.items():
        if t.is_floating_point():
            t = t.to(device=place(name), dtype=dtype)
        else:
            t = t.to(device=place(name), dtype=expected[name].dtype)
        converted[name] = t
    model.load_state_dict(converted, strict=False, assign=True)
    absent = [k for k in expected if k not in sd]
    for name in absent:
        _materialise(model, [name], place(name), dtype)
    return model


def _materialise(model: nn.Module, names: list[str], device, dtype) -> None:
    """Initialise tensors that the checkpoint did not carry (only OPTIONAL_KEYS reach here)."""
    modules = dict(model.named_modules())
    for name in names:
        mod_name, _, attr = name.rpartition(".")
        mod = modules[mod_name]
        old = getattr(mod, attr)
        fresh = torch.zeros(old.shape, device=device, dtype=dtype if old.is_floating_point() else old.dtype)
        if isinstance(old, nn.Parameter):
            if fresh.dim() > 1:
                nn.init.normal_(fresh, std=0.02)
            elif attr == "weight":
                fresh.fill_(1.0)
            setattr(mod, attr, nn.Parameter(fresh, requires_grad=old.requires_grad))
        else:
            mod._buffers[attr] = fresh


def init_weights(model: nn.Module, device="cpu", dtype=torch.float32, seed: int | None = 0, std: float = 0.02) -> nn.Module:
    """Random initialisation of a (possibly meta-built) model: normal(std) linears/embeddings, unit norms."""
    model.to_empty(device=device)
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)

    def normal(t):
        t.copy_(torch.randn(t.shape, generator=gen) * std)

    with torch.no_grad():
        for mod in model.modules():
            for pname, p in mod.named_parameters(recurse=False):
                if pname == "bias" or (p.dim() == 1 and pname != "weight"):
                    p.zero_()
                elif p.dim() == 1:
                    p.fill_(1.0)
                else:
                    normal(p)
            for bname, b in mod.named_buffers(recurse=False):
                b.zero_()
    return model.to(dtype=dtype)


# ---------------------------------------------------------------------------------------------- writing
def atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same directory and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n"))


def save_state_dict(sd: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write safetensors, sharded with an index when larger than `max_shard_bytes`."""
    directory = Path(directory)
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    for stale in list(directory.glob("model*.safetensors")) + list(directory.glob("model.safetensors.index.json")):
        stale.unlink()
    if len(shards) == 1:
        atomic_write(directory / "model.safetensors", lambda tmp: save_file(shards[0], tmp, metadata={"format": "pt"}))
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        atomic_write(directory / fname, lambda tmp, s=shard: save_file(s, tmp, metadata={"format": "pt"}))
        weight_map.update({k: fname for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    write_json(directory / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
