"""Timestep samplers for training: which t each example gets, and its importance weight.

A sampler draws t [n] with weights w = 1 / (T · p_t), so that E_t[w · L_t] = (1/T) Σ_t L_t for
any p (the weights undo the non-uniform draw), and may learn p from the losses it is shown
(`update`). Its state (`state_dict`) is part of every training checkpoint. The same split as
improved-diffusion's resample.py: the loss (losses.py) does not know how t was drawn.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor

from ddpm_core.modes import TSampling

HISTORY_PER_T = 10  # improved-diffusion LossSecondMomentResampler
UNIFORM_PROB = 1e-3  # mixed into p_t so no step is starved


class UniformSampler:
    """t ~ Uniform{0..T−1} with unit weights; learns nothing."""

    def __init__(self, T: int) -> None:
        self.T = T

    def probabilities(self) -> Tensor:
        """p_t [T] float64."""
        return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Timesteps [n] long and weights [n] float (all 1), on generator.device."""
        device = generator.device
        t = torch.randint(0, self.T, (n,), generator=generator, device=device)
        return t, torch.ones(n, device=device)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Nothing to learn."""

    def state_dict(self) -> dict[str, Tensor]:
        """No state."""
        return {}

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        """No state (checkpoints from before the loss/sampler split carry an unused history)."""


class ImportanceSampler:
    """p_t ∝ √E[L_t²] over the last HISTORY_PER_T losses of each t, mixed with the uniform."""

    def __init__(self, T: int) -> None:
        self.T = T
        # plain Python deques: update() runs per example on every training step
        self._history = [deque[float](maxlen=HISTORY_PER_T) for _ in range(T)]

    # Nichol & Dhariwal 2021, Sec. 3.3: p_t ∝ sqrt(E[L_t²])
    def probabilities(self) -> Tensor:
        """p_t [T] float64: uniform until every t has HISTORY_PER_T losses, then ∝ √E[L_t²]."""
        T = self.T
        if any(len(h) < HISTORY_PER_T for h in self._history):
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        w = torch.tensor(self._history, dtype=torch.float64).pow(2).mean(dim=1).sqrt()
        w = w / w.sum()
        return w * (1.0 - UNIFORM_PROB) + UNIFORM_PROB / T

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Timesteps [n] long and importance weights 1/(T p_t) [n] float, on generator.device."""
        p = self.probabilities().to(generator.device)
        t = torch.multinomial(p, n, replacement=True, generator=generator)
        return t, (1.0 / (self.T * p[t])).float()

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record the per-example losses [B] of timesteps t [B] (the newest HISTORY_PER_T kept)."""
        loss = losses.detach().to("cpu", torch.float64)
        assert loss.shape == t.shape, f"loss {tuple(loss.shape)} vs t {tuple(t.shape)}"
        for ti, li in zip(t.tolist(), loss.tolist(), strict=True):
            self._history[ti].append(li)

    def state_dict(self) -> dict[str, Tensor]:
        """The history: "history" [T, 10] float64 (oldest first), "count" [T]."""
        history = torch.zeros(self.T, HISTORY_PER_T, dtype=torch.float64)
        for ti, h in enumerate(self._history):
            history[ti, : len(h)] = torch.tensor(h, dtype=torch.float64)
        count = torch.tensor([len(h) for h in self._history], dtype=torch.int64)
        return {"history": history, "count": count}

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        """Restore the history saved by state_dict."""
        history, count = torch.as_tensor(d["history"]), torch.as_tensor(d["count"])
        if history.shape != (self.T, HISTORY_PER_T) or count.shape != (self.T,):
            raise ValueError(f"importance history {tuple(history.shape)} does not match "
                             f"T={self.T} × {HISTORY_PER_T}")
        self._history = [deque(history[ti, : int(c)].tolist(), maxlen=HISTORY_PER_T)
                         for ti, c in enumerate(count.tolist())]


TimestepSampler = UniformSampler | ImportanceSampler


def make_sampler(kind: TSampling, T: int) -> TimestepSampler:
    """The sampler named by a TSampling mode (the config checks the name)."""
    return {"uniform": UniformSampler, "importance": ImportanceSampler}[kind](T)
