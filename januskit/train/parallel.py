"""Distributed set-up and the transforms that make a plain model parallel: DDP, FSDP2, activation checkpointing.

Launched by `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment); gloo on CPU, nccl on GPU. A
`ddp`/`fsdp` recipe run as a plain process gets a one-rank group, so the same code path runs everywhere.
FSDP2 (`fully_shard`) shards every decoder block, each visual encoder, then the root, as torchtitan does.
The model files never see any of this.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduced copy of `t` over all ranks (the identity on a single process)."""
        t = t.detach().to(self.device, copy=True)
        if self.distributed and self.world_size > 1:
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return t

    def barrier(self) -> None:
        if self.distributed and self.world_size > 1:
            dist.barrier()

    def broadcast_object(self, obj):
        if not (self.distributed and self.world_size > 1):
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj) -> list:
        if not (self.distributed and self.world_size > 1):
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def init_distributed(strategy: str, device: str = "auto") -> DistEnv:
    """Join the torchrun group (or make a one-rank one for ddp/fsdp) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if strategy == "single" and world > 1:
        raise ValueError(f"train.strategy is 'single' but {world} processes were launched; use ddp or fsdp")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError("train.device is 'cuda' but CUDA is not available")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if strategy != "single" and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        timeout = datetime.timedelta(minutes=30)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout,
                                    device_id=dev if use_cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
            rank, world, local_rank = 0, 1, 0
    return DistEnv(rank, world, local_rank, dev, strategy)


def shutdown(env: DistEnv) -> None:
    """Leave the process group (no barrier: after an error on one rank the others may never reach it)."""
    if env.distributed:
        dist.destroy_process_group()


def parallelize(forward: nn.Module, env: DistEnv, dtype: str, precision: str,
                activation_checkpointing: bool) -> nn.Module:
    """Apply activation checkpointing and the recipe's strategy to a TrainForward holding a JanusModel."""
    model = forward.model
    if activation_checkpointing:
        model.language_model.model.gradient_checkpointing = True
    if env.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # No unused-parameter search: TrainForward puts every trainable parameter in every micro-batch's graph.
        return DDP(forward, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if env.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        if dtype == "bf16" and precision == "autocast":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            mp = MixedPrecisionPolicy()
        for block in model.language_model.model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        for encoder in (model.vision_model, model.gen_vision_model):
            fully_shard(encoder, mesh=mesh, mp_policy=mp)
        fully_shard(forward, mesh=mesh, mp_policy=mp)
        return forward
    return forward


def unwrap(wrapped: nn.Module) -> nn.Module:
    """The TrainForward under a DDP wrapper (FSDP2 shards in place, so it is the module itself)."""
    return getattr(wrapped, "module", wrapped)


def accumulation(wrapped: nn.Module, sync: bool):
    """Context for one micro-batch's forward+backward: DDP skips the gradient all-reduce until the last one."""
    if not sync and hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    return contextlib.nullcontext()


def autocast(env: DistEnv, dtype: str, precision: str):
    """bf16 autocast for single/DDP runs with fp32 weights; FSDP's policy or pure bf16 weights need none."""
    if dtype == "bf16" and precision == "autocast" and env.strategy != "fsdp":
        return torch.autocast(env.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
