"""Mode names have one source, and loading the configuration does not import torch."""

from __future__ import annotations

import subprocess
import sys
import typing

from ddpm_core import modes


def test_each_literal_equals_its_tuple_of_names() -> None:
    pairs = {"ScheduleKind": "SCHEDULE_KINDS", "MeanType": "MEAN_TYPES", "VarType": "VAR_TYPES",
             "LossType": "LOSS_TYPES", "TSampling": "T_SAMPLINGS", "Spacing": "SPACINGS",
             "Precision": "PRECISIONS", "Features": "FEATURES"}
    for lit, names in pairs.items():
        assert typing.get_args(getattr(modes, lit)) == getattr(modes, names), lit
    assert set(modes.FIXED_VAR_TYPES) | set(modes.LEARNED_VAR_TYPES) == set(modes.VAR_TYPES)
    assert not set(modes.FIXED_VAR_TYPES) & set(modes.LEARNED_VAR_TYPES)


def test_library_and_config_use_the_same_literals() -> None:
    from ddpm_core import diffusion, fid, inference, losses, resample, schedules
    from pipeline.params import Params, VariantConfig

    config = typing.get_type_hints(VariantConfig)
    assert config["mean_type"] is modes.MeanType and diffusion.MeanType is modes.MeanType
    assert config["var_type"] is modes.VarType and diffusion.VarType is modes.VarType
    assert typing.get_type_hints(Params)["schedule"] is modes.ScheduleKind
    assert schedules.ScheduleKind is modes.ScheduleKind
    assert config["loss"] is modes.LossType and losses.LossType is modes.LossType
    assert config["t_sampling"] is modes.TSampling and resample.TSampling is modes.TSampling
    assert inference.Precision is modes.Precision and fid.Features is modes.Features
    assert diffusion.LEARNED_VAR_TYPES is modes.LEARNED_VAR_TYPES


def test_importing_the_configuration_does_not_import_torch() -> None:
    code = ("import sys, ddpm_core.config, ddpm_core.modes, pipeline.params; "
            "print([m for m in sys.modules if m == 'torch' or m.startswith('torch.')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
