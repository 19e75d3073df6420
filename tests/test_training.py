"""Training loop: warm-up, clipping, EMA recurrence, data order, NaN handling, precision modes.

The tiny model / fake objective live in tests/helpers.py (shared with test_resume.py and
test_distributed.py, so those tests never depend on the real U-Net or losses).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from helpers import FakeLoss, FakeSampler, cpu_info, tiny_cfg, tiny_data, tiny_model

from ddpm_core.checkpoint import list_checkpoints, load_checkpoint
from ddpm_core.training import (
    EpochSampler,
    TrainingDiverged,
    TrainStep,
    train,
    warmup_factor,
)


def test_warmup_factor_is_linear_then_constant() -> None:
    f = warmup_factor(4)
    assert [f(k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0)(0) == 1.0


def test_epoch_sampler_visits_every_image_once_per_epoch() -> None:
    s = EpochSampler(10, seed=3, device=torch.device("cpu"))
    idx = torch.cat([s.next(4)[1] for _ in range(5)])  # 20 draws = exactly two epochs
    assert sorted(idx[:10].tolist()) == list(range(10))
    assert sorted(idx[10:].tolist()) == list(range(10))
    assert not torch.equal(idx[:10], idx[10:])  # a new permutation each epoch
    # the saved position (epoch, offset) reproduces the rest of the stream
    s2 = EpochSampler(10, seed=3, device=torch.device("cpu"))
    s2.next(7)
    s3 = EpochSampler(10, seed=3, device=torch.device("cpu"))
    s3.load_state_dict(s2.state_dict())
    assert torch.equal(s2.next(9)[1], s3.next(9)[1])


def test_ema_follows_recurrence_ema_k_equals_decay_ema_plus_one_minus_decay_theta() -> None:
    cfg = tiny_cfg(ema_decay=0.7)
    model, obj = tiny_model(), FakeSampler()
    step = TrainStep(model, FakeLoss(), obj, cfg, cpu_info())
    ema = {k: v.double().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        x0 = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1
        t, w = obj.sample(8, g)
        step(x0, t, w, torch.randn(8, 3, 8, 8, generator=g), t)
        for k, v in model.state_dict().items():
            ema[k] = 0.7 * ema[k] + 0.3 * v.double()
    for k, v in step.ema.state_dict().items():
        torch.testing.assert_close(v.double(), ema[k], atol=1e-6, rtol=0)


def test_gradients_are_clipped_to_global_norm_and_lr_warms_up() -> None:
    cfg = tiny_cfg(grad_clip=1e-3, warmup_steps=4, lr=0.01)
    model, obj = tiny_model(), FakeSampler()
    step = TrainStep(model, FakeLoss(), obj, cfg, cpu_info())
    g = torch.Generator().manual_seed(1)
    lrs = []
    for _ in range(5):
        lrs.append(step.opt.param_groups[0]["lr"])
        t, w = obj.sample(8, g)
        _, gnorm = step(torch.rand(8, 3, 8, 8, generator=g), t, w,
                        torch.randn(8, 3, 8, 8, generator=g), t)
        clipped = torch.linalg.vector_norm(torch.stack(
            [p.grad.norm() for p in model.parameters()]))
        assert gnorm > 1e-3  # the raw norm is far above the threshold...
        assert clipped <= 1e-3 * (1 + 1e-4)  # ...and the applied gradient sits at it
    assert lrs == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01])


def test_train_logs_every_log_every_steps_and_ends_with_checkpoint(tmp_path: Path) -> None:
    logged: list[tuple[int, dict]] = []
    res = train(tiny_model(), FakeLoss(), FakeSampler(), tiny_data(), tiny_cfg(), tmp_path,
                device="cpu", on_log=lambda s, m: logged.append((s, m)))
    assert [s for s, _ in logged] == [5, 10, 12]
    assert [h["step"] for h in res.history] == [5, 10, 12]
    assert set(logged[0][1]) == {"loss", "grad_norm", "lr", "images_per_s"}
    assert all(math.isfinite(m["loss"]) and m["images_per_s"] > 0 for _, m in logged)
    assert logged[0][1]["lr"] == pytest.approx(1e-3)  # warm-up over 3 steps is done by step 5
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000010.pt",
                                                           "ckpt_00000012.pt"]
    ck = load_checkpoint(tmp_path / "ckpt_00000012.pt")
    assert ck["step"] == 12 and ck["data"] == {"epoch": 4, "offset": 16}  # 96 draws of 20
    for k, v in res.ema.state_dict().items():
        assert torch.equal(v, ck["ema"][k])
    assert not torch.equal(res.ema.conv_in.weight, res.model.conv_in.weight)
    assert res.resumed_from is None and res.step == 12
    # a second call finds the finished run and trains no further
    again = train(tiny_model(), FakeLoss(), FakeSampler(), tiny_data(), tiny_cfg(), tmp_path,
                  device="cpu")
    assert again.resumed_from == tmp_path / "ckpt_00000012.pt"
    assert torch.equal(again.model.conv_in.weight, res.model.conv_in.weight)


def test_nan_loss_raises_training_diverged_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    cfg = tiny_cfg(steps=20, log_every=10)
    with pytest.raises(TrainingDiverged, match=r"step 7\b.*ckpt_00000005.pt.*learning rate"):
        train(tiny_model(), FakeLoss(nan_at_call=7), FakeSampler(), tiny_data(), cfg,
              tmp_path / "a", device="cpu")
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == ["ckpt_00000005.pt"]
    kept = load_checkpoint(tmp_path / "a" / "ckpt_00000005.pt")
    # the surviving checkpoint is the good state of step 5: equal to a run that never saw a NaN
    train(tiny_model(), FakeLoss(), FakeSampler(), tiny_data(), dataclasses.replace(cfg, steps=5),
          tmp_path / "b", device="cpu")
    clean = load_checkpoint(tmp_path / "b" / "ckpt_00000005.pt")
    for which in ("model", "ema"):
        for k, v in clean[which].items():
            assert torch.equal(kept[which][k], v), (which, k)


def test_nan_before_first_checkpoint_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(TrainingDiverged, match="step 2.*no checkpoint was written"):
        train(tiny_model(), FakeLoss(nan_at_call=2), FakeSampler(), tiny_data(), tiny_cfg(),
              tmp_path, device="cpu")
    assert list_checkpoints(tmp_path) == []


def test_bf16_autocast_and_channels_last_keep_fp32_master_weights(tmp_path: Path) -> None:
    cfg = tiny_cfg(steps=3, precision="bf16", channels_last=True, log_every=3)
    res = train(tiny_model(), FakeLoss(), FakeSampler(), tiny_data(), cfg, tmp_path, device="cpu")
    assert math.isfinite(res.history[-1]["loss"])
    assert all(p.dtype == torch.float32 for p in res.model.parameters())
    assert all(p.dtype == torch.float32 for p in res.ema.parameters())
    assert res.model.conv_in.weight.is_contiguous()
    assert not torch.equal(res.model.conv_in.weight, tiny_model().conv_in.weight)


def test_real_unet_and_loss_digits_step(tmp_path: Path) -> None:
    unet = pytest.importorskip("ddpm_core.unet")
    from ddpm_core.diffusion import Diffusion
    from ddpm_core.losses import Loss
    from ddpm_core.resample import UniformSampler

    ucfg = dataclasses.replace(unet.PRESETS["digits"], base_channels=16, channel_mult=(1, 2),
                               num_res_blocks=1, attn_resolutions=())
    torch.manual_seed(0)
    model = unet.UNet(ucfg)
    loss = Loss(Diffusion.from_schedule("linear", 100), "simple")
    size, c = ucfg.image_size, ucfg.in_channels
    data = torch.randint(0, 256, (8, c, size, size), dtype=torch.uint8)
    res = train(model, loss, UniformSampler(100), data,
                tiny_cfg(steps=2, batch_size=4, hflip=False, log_every=1), tmp_path, device="cpu")
    assert len(res.history) == 2 and all(math.isfinite(h["loss"]) for h in res.history)
