"""Seeds per image, not per batch (as EDM's StackedRandomGenerator): the unit of work is the
image index, so no number depends on the batch size, the number of processes or how a job was
split.

`image_seed(seed, *keys)` is a fixed 63-bit hash (SplitMix64's mixer) of the run's seed and the
keys: image i of a sampler uses (seed, i), the q(x_t | x_0) noise of test image i at original
index τ in the bound (seed, i, τ), Γ's draw of training image m at τ (seed, m, τ), the ODE's
dequantization noise and probes of image i (seed, i).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_MASK = 2**64 - 1


# Steele, Lea & Flood 2014 (SplitMix64): its finalizer, a bijection of 64-bit integers
def _mix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def image_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends on (seed, *keys) only (integers in 0..2⁶⁴−1)."""
    h = _mix(_mix(int(seed)) ^ len(keys))  # the length: (0,) and (0, 0) differ
    for k in keys:
        h = _mix(h ^ int(k))
    return h >> 1


def keyed_randn(seed: int, keys: Sequence[Sequence[int]], shape: Sequence[int], *,
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64
                ) -> Tensor:
    """[len(keys), *shape] standard normal draws, row r from a generator seeded (seed, *keys[r])."""
    g = torch.Generator(device)
    out = torch.empty((len(keys), *shape), device=device, dtype=dtype)
    for row, k in zip(out, keys, strict=True):
        torch.randn(row.shape, generator=g.manual_seed(image_seed(seed, *k)), out=row)
    return out


class ImageNoise:
    """One random stream per image: row b of every draw is the next draw of image
    indices[b]'s own generator, seeded (seed, indices[b]). A sampler draws x_T first, then each
    step's noise in chain order, so image i depends only on (seed, i) and the settings."""

    def __init__(self, seed: int, indices: Sequence[int],
                 device: str | torch.device = "cpu") -> None:
        self.indices = [int(i) for i in indices]
        self.generators = [torch.Generator(device).manual_seed(image_seed(seed, i))
                           for i in self.indices]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """[B, ...] standard normal, row b from image indices[b]'s stream (B = len(indices))."""
        assert shape[0] == len(self.generators), \
            f"draw of {shape[0]} rows for {len(self.generators)} images"
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device,
                                        dtype=dtype) for g in self.generators])
