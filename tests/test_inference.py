"""bf16 for the network call of sampling and bits/dim: the metric moves by less than its noise."""

import dataclasses

import pytest
import torch
from analytic import ddim, full_bound

from ddpm_core.chains import timestep_spacing
from ddpm_core.diffusion import Diffusion
from ddpm_core.inference import inference_model
from ddpm_core.unet import PRESETS, UNet

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(PRESETS["digits"], base_channels=32, dropout=0.0)
    net = UNet(cfg).eval()
    for m in net.modules():  # DDPM inits output layers ~0; give every layer weights that matter
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
    return net


def _digits_like(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 1, 8, 8), generator=g).float() / 127.5 - 1.0)


def test_inference_model_fp32_is_the_model_itself():
    net = _net()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 5, 9])
    fast = inference_model(net, "fp32", channels_last=True)
    assert torch.equal(fast(x, t), net(x, t))


def test_bf16_bits_per_dim_differs_from_fp32_by_less_than_its_standard_error():
    # The metric's own noise is the spread of per-image bounds / sqrt(B); bf16 must stay inside.
    diff = Diffusion.from_schedule("linear", 100)
    net, x0 = _net(), _digits_like(64, 1)
    ref = full_bound(diff, inference_model(net, "fp32"), x0, t_batch=25)["fixed_large"]
    low = full_bound(diff, inference_model(net, "bf16"), x0, t_batch=25)["fixed_large"]
    sem = float(ref.total.std() / len(x0) ** 0.5)
    shift = abs(float(low.total.mean() - ref.total.mean()))
    assert shift < sem, f"bf16 moved bits/dim by {shift:.4g}, its standard error is {sem:.4g}"
    assert not torch.equal(low.total, ref.total)  # bf16 really ran


def test_bf16_ddim_samples_stay_close_to_fp32():
    diff = Diffusion.from_schedule("linear", 100)
    net, ts = _net(), timestep_spacing(100, 10, "leading")
    shape = (16, 1, 8, 8)
    a, b = (ddim(diff, inference_model(net, p), shape, ts, 0.0, torch.Generator().manual_seed(3))
            for p in ("fp32", "bf16"))
    # The same noise and a deterministic sampler: with this untrained (arbitrary) network bf16
    # moves pixels by about one grey level on average (measured 0.9); a wrong cast would not.
    err = float((a - b).abs().mean()) * 127.5
    assert 0.0 < err < 2.0, f"bf16 moved DDIM samples by {err:.3g} grey levels"


def test_every_door_runs_on_the_one_default_device(monkeypatch) -> None:
    """One chooser (inference.default_device): the CLI, the stages, the process group and the
    feature network take the device it gives when none is named."""
    from pathlib import Path

    from ddpm_core import distributed, fid, inference
    from pipeline import common

    root = Path(__file__).resolve().parents[1]
    choosers = [p.relative_to(root).as_posix() for p in [*root.glob("ddpm_core/*.py"),
                                                         *root.glob("pipeline/*.py")]
                if "if torch.cuda.is_available() else" in p.read_text()]
    assert choosers == ["ddpm_core/inference.py"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference.default_device() == torch.device("cpu") == common.device()
    assert distributed.init_distributed().device == torch.device("cpu")
    assert fid.feature_network.__globals__["default_device"] is inference.default_device
