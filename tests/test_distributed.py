"""Data parallelism: shard arithmetic, and 2-process gloo training/sampling equal to 1 process.

The 2-process test launches this file twice as a script with the env vars torchrun sets
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on 127.0.0.1 and a free port), so it
exercises exactly the `init_distributed` path torchrun uses.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import FakeLoss, FakeSampler, run_ranks, tiny_cfg, tiny_data, tiny_model

from ddpm_core import distributed as D
from ddpm_core.api import FixedRows
from ddpm_core.seeds import ImageNoise
from ddpm_core.training import train

ROOT = Path(__file__).resolve().parents[1]
N_SAMPLES, SAMPLE_SEED = 7, 3
# 2-process vs 1-process weights after 6 Adam steps: only the summation order of the gradient
# mean differs (two half-batch means averaged vs one full mean): measured max |diff| 1.5e-8,
# while giving both ranks the same slice makes it 7e-3.
ATOL, RTOL = 1e-6, 1e-5


def ddp_cfg():
    """Global batch 8 = 2 ranks x 4; hflip and importance-like weights on."""
    return tiny_cfg(steps=6, batch_size=8, checkpoint_every=3, log_every=3, nproc=2)


def map_shards(fn: Callable[[range], torch.Tensor], n: int, rank: int | None = None,
               world: int | None = None) -> torch.Tensor:
    """fn on this rank's contiguous share of range(n), all shares gathered in order (the
    engine's api._shares and distributed.gather_shards)."""
    rank = D.dist.get_rank() if rank is None and D.is_initialized() else (rank or 0)
    world = D.dist.get_world_size() if world is None and D.is_initialized() else (world or 1)
    return D.gather_shards(fn(D.shard_range(n, rank, world)))


def draw(model: torch.nn.Module):
    """fn(indices) -> images: each image's own noise through a fixed net in fixed-size calls,
    as the engine's sampler would."""
    net = FixedRows(model, 8)

    def fn(indices: range) -> torch.Tensor:
        if not indices:
            return torch.zeros(0, 3, 8, 8)
        x = ImageNoise(SAMPLE_SEED, indices).randn((len(indices), 3, 8, 8))
        with torch.no_grad():
            return net(x, torch.full((len(indices),), 4, dtype=torch.long))
    return fn


@pytest.mark.parametrize("n", [0, 1, 5, 7, 8, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_range_partitions_range_n_in_order_with_sizes_within_one(n: int,
                                                                      world: int) -> None:
    shards = [D.shard_range(n, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_map_shards_of_per_image_draws_concatenate_to_the_unsharded_images() -> None:
    fn = draw(tiny_model())
    full = map_shards(fn, N_SAMPLES)
    assert full.shape == (N_SAMPLES, 3, 8, 8)
    for world in (2, 3, 8):  # without a process group each call returns its own shard
        parts = [map_shards(fn, N_SAMPLES, r, world) for r in range(world)]
        assert torch.equal(torch.cat(parts), full)
    assert not torch.equal(full[0], full[1])  # every image its own noise


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    run_ranks(lambda rank: [sys.executable, __file__, str(tmp_path)], timeout=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        obj = FakeSampler()
        single = train(tiny_model(), FakeLoss(), obj, tiny_data(),
                       dataclasses.replace(ddp_cfg(), nproc=1), tmp_path / "single", device="cpu")
    finally:
        torch.set_num_threads(n)
    for which in ("model", "ema"):
        ref = getattr(single, which).state_dict()
        moved = False
        for k, v in ref.items():
            assert torch.equal(ranks[0][which][k], ranks[1][which][k])  # DDP keeps ranks equal
            torch.testing.assert_close(ranks[0][which][k], v, atol=ATOL, rtol=RTOL)
            moved |= not torch.equal(v, tiny_model().state_dict()[k])
        assert moved
    # the importance history saw the whole global batch on every rank
    for key in ("history", "count"):
        assert torch.equal(ranks[0]["t_sampler"][key], ranks[1]["t_sampler"][key])
        torch.testing.assert_close(ranks[0]["t_sampler"][key], obj.state_dict()[key])
    assert int(obj.count.sum()) == 6 * 8
    # only rank 0 wrote checkpoints, and they are the ones a single process writes
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "ckpt_00000003.pt", "ckpt_00000006.pt"]
    # sharded sampling over two processes returns the unsharded images, on both ranks
    unsharded = map_shards(draw(single.ema), N_SAMPLES)
    for r in ranks:
        torch.testing.assert_close(r["samples"], unsharded, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ranks[0]["samples_fixed"], map_shards(
        draw(tiny_model()), N_SAMPLES), atol=0, rtol=0)


def _worker(out: str) -> None:
    """Script mode (one rank): train, sample with the EMA and a fixed net, save the results."""
    torch.set_num_threads(1)
    out_dir = Path(out)
    obj = FakeSampler()
    res = train(tiny_model(), FakeLoss(), obj, tiny_data(), ddp_cfg(), out_dir / "ckpt",
                device="cpu")
    samples = map_shards(draw(res.ema), N_SAMPLES)
    fixed = map_shards(draw(tiny_model()), N_SAMPLES)
    rank = int(os.environ["RANK"])
    torch.save({"model": res.model.state_dict(), "ema": res.ema.state_dict(),
                "t_sampler": obj.state_dict(), "samples": samples, "samples_fixed": fixed},
               out_dir / f"rank{rank}.pt")
    D.cleanup()


if __name__ == "__main__":
    _worker(sys.argv[1])
