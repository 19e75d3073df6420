"""Which training settings change the weights: one classification, on TrainConfig's fields."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest

from ddpm_core.config import TrainConfig, weight_settings


def test_every_train_setting_is_classified() -> None:
    for f in dataclasses.fields(TrainConfig):
        assert isinstance(f.metadata.get("weights"), bool), \
            f"TrainConfig.{f.name}: say whether it changes the weights (metadata 'weights')"


def test_weight_settings_follow_the_classification() -> None:
    cfg = TrainConfig()
    ws = weight_settings(cfg)
    assert set(ws) == {"batch_size", "lr", "warmup_steps", "grad_clip", "ema_decay", "hflip",
                       "precision", "channels_last", "seed"}
    assert ws["lr"] == cfg.lr
    # bookkeeping settings leave them alone, a learning rate does not
    quiet = dataclasses.replace(cfg, steps=7, checkpoint_every=3, keep_checkpoints=9,
                                log_every=2, resume_fallback=True, nproc=2, nnodes=2, compile=True,
                                batch_size=128)
    assert weight_settings(quiet) == ws
    assert weight_settings(dataclasses.replace(cfg, lr=1e-3)) != ws


def test_resuming_with_a_changed_weight_setting_warns(tmp_path: Path) -> None:
    from helpers import FakeLoss, FakeSampler, tiny_cfg, tiny_data, tiny_model

    from ddpm_core.training import train

    train(tiny_model(), FakeLoss(), FakeSampler(), tiny_data(), tiny_cfg(steps=5), tmp_path,
          device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # more steps and other bookkeeping: silent
        train(tiny_model(), FakeLoss(), FakeSampler(), tiny_data(), tiny_cfg(steps=6, log_every=1),
              tmp_path, device="cpu")
    with pytest.warns(UserWarning, match=r"changed settings \['channels_last'\]"):
        train(tiny_model(), FakeLoss(), FakeSampler(), tiny_data(),
              tiny_cfg(steps=7, channels_last=True), tmp_path, device="cpu")
