"""The network call used by sampling and bits/dim: where it runs (`default_device`), bf16
autocast, channels_last, compile.

Sampling and the likelihood call one fixed-shape network thousands of times, so the call is
what to make fast. The mathematics around it (samplers.py, likelihood.py) always runs in
float32/float64: only the network sees bf16, and its output is returned as float32.
On CUDA, `compile=True` uses mode "reduce-overhead", i.e. CUDA graphs for the fixed shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddpm_core.modes import Precision


def default_device() -> torch.device:
    """The device of every door when none is given: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Autocast(nn.Module):
    """Runs `net(x [B,C,H,W], t [B])` under bf16 autocast when precision is bf16 (weights stay
    fp32); fp32 output."""

    def __init__(self, net: nn.Module, precision: Precision) -> None:
        super().__init__()
        self.net, self.bf16 = net, precision == "bf16"

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.net(x, t)
        return out.float()


def inference_model(model: nn.Module, precision: Precision = "fp32", channels_last: bool = False,
                    compile: bool = False) -> nn.Module:
    """The model in eval mode wrapped for fast repeated calls; same `(x_t, t) -> out` interface."""
    model = model.eval().requires_grad_(False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    wrapped: nn.Module = Autocast(model, precision)
    if compile:
        mode = "reduce-overhead" if next(model.parameters()).is_cuda else None
        wrapped = torch.compile(wrapped, mode=mode, dynamic=False)
    return wrapped
