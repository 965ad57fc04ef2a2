"""Data-parallel training through PyTorch's own stack: ``torchrun ... -m mimi train`` runs DDP, one process a rank.

Nothing here is home-made: torchrun sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and the rendezvous, this module
opens the process group (NCCL on GPUs, gloo on CPU, the same code), binds ``LOCAL_RANK``'s GPU, and offers the few
collectives the trainer needs. Outside torchrun every function is a no-op and the run is the plain single process.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mimi.core.errors import ConfigError


@dataclass(frozen=True)
class World:
    """Where this process stands: ``rank`` of ``size`` processes (size 1 outside torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the only one that writes files and prints."""
        return self.rank == 0


def from_env() -> World:
    """The world torchrun describes in the environment (a single process when it does not)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def init(device: str) -> tuple[World, torch.device | None]:
    """Open the process group when launched by torchrun; return the world and the device this rank must use.

    ``device`` ``auto``/``cuda`` binds ``cuda:LOCAL_RANK`` (NCCL); ``cpu`` uses gloo. Outside torchrun: (World(),
    None), and the caller resolves the device as usual.
    """
    world = from_env()
    if not world.enabled:
        return world, None
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} under torchrun but CUDA is not available; use --device cpu")
    if use_cuda:
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return world, torch.device(f"cuda:{world.local_rank}") if use_cuda else torch.device("cpu")


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.enabled:
        dist.barrier()


def all_reduce_sum(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place (gloo has no integer reductions on every build: done in float64)."""
    if not world.enabled:
        return tensor
    buf = tensor.to(torch.float64)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    tensor.copy_(buf.to(tensor.dtype))
    return tensor


def broadcast_object(world: World, obj):
    """Rank 0's ``obj`` on every rank."""
    if not world.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_same(world: World, what: str, state: dict[str, torch.Tensor]) -> None:
    """Raise unless every rank holds bit-identical tensors (after a prune: same sizes, same weights)."""
    if not world.enabled:
        return
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode() + str(tuple(t.shape)).encode() + t.numpy().tobytes())
    digests = [None] * world.size
    dist.all_gather_object(digests, h.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks disagree on {what} (checksums {digests}); the run cannot go on consistently")


def shard_indices(n: int, world: World) -> list[int]:
    """This rank's share of ``range(n)`` (every ``size``-th item from ``rank``): disjoint, covering, near equal."""
    return list(range(world.rank, n, world.size))
