"""torch.distributed for distillation, kept apart from the model and the loop.

Strategy: DDP. Every rank holds the whole student and a whole frozen teacher; each stage module (whose forward
returns the loss) is wrapped in DDP, which averages gradients across ranks overlapped with the backward pass.
Why not FSDP2: stages 1 and 2 call parts of each block (the mixer's mixing matrix, the input norm) outside the
block's forward, which FSDP's per-module unsharding does not see; and up to 3B the replicated student with fp32
AdamW state fits one 80 GB GPU. The 8B recipe stays in reach by freezing the student's MLPs and embeddings in
stage 3 and keeping frozen weights in bf16 (see ``recipes/llama-3.1-8b.yaml``).
Under ``torchrun`` the environment (RANK, WORLD_SIZE, LOCAL_RANK) says everything; without it we are one process.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str | None = None) -> Dist:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank, world, local, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: torch.nn.Module, d: Dist) -> torch.nn.Module:
    if not d.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [d.local_rank] if d.device.type == "cuda" else None
    # broadcast_buffers off: the student has no buffers that change; parameters start equal on every rank
    return DDP(module, device_ids=ids, broadcast_buffers=False)


def no_sync(module: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if sync or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def all_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        value = value.clone()
        dist.all_reduce(value)
        value /= d.world
    return value


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def broadcast_object(obj, d: Dist):
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
