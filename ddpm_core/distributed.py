"""Data-parallel helpers: process-group set-up from torchrun's env vars, sharding, gathering.

Everything here is a no-op in a single process (WORLD_SIZE absent or 1), so library code calls
these helpers unconditionally.

Sharded work (api): ranks take contiguous runs of image indices (`shard_range`) and the
results are gathered in rank order (`gather_shards`); every image's noise comes from
(seed, its index) (ddpm_core.seeds), so no result depends on the number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

_CPU_GROUP: dist.ProcessGroup | None = None  # gloo group for host-side flags under nccl


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files and logs."""
        return self.rank == 0


def is_initialized() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); no-op without it."""
    global _CPU_GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device is None:
        from ddpm_core.inference import default_device

        device = default_device()
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(0, 1, 0, dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    if _CPU_GROUP is None:
        gloo = dist.get_backend() == "gloo"
        _CPU_GROUP = dist.group.WORLD if gloo else dist.new_group(backend="gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def cleanup() -> None:
    """Leave the process group (call at the end of a torchrun script)."""
    global _CPU_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CPU_GROUP = None


def shard_range(n: int, rank: int, world: int) -> range:
    """Contiguous slice of 0..n-1 for `rank`; the first n % world ranks get one extra item."""
    assert 0 <= rank < world, f"rank {rank} not in 0..{world - 1}"
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def any_true(flag: bool) -> bool:
    """True if `flag` is set on any rank (a host-side collective; no device synchronisation)."""
    if not is_initialized():
        return flag
    x = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=_CPU_GROUP)
    return bool(x.item())


def all_reduce_(x: Tensor, op: str = "sum") -> Tensor:
    """In-place all-reduce of a device tensor ("sum", "min" or "max"); identity in one process."""
    if is_initialized():
        dist.all_reduce(x, op=getattr(dist.ReduceOp, op.upper()))
    return x


def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate equal-shaped per-rank tensors along dim 0 in rank order."""
    if not is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_gather_objects(obj: object) -> list:
    """Pickle-gather one object per rank, in rank order (for RNG states at checkpoints)."""
    if not is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_CPU_GROUP)
    return out


def gather_shards(part: Tensor) -> Tensor:
    """Concatenate per-rank tensors of possibly different lengths along dim 0, in rank order
    (pickled through the host-side group: results, gathered once, not a training hot path)."""
    if not is_initialized():
        return part
    return torch.cat([p.to(part.device) for p in all_gather_objects(part.cpu())])


def batch_seed(seed: int, j: int) -> int:
    """Seed of training's epoch permutation / resumed step j: a fixed function of (seed, j)."""
    return (seed * 1_000_003 + j) % (2**63 - 1)
