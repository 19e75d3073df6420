"""Mode names have one source (ddpm_core/modes.py), and loading the configuration does not
import torch."""

from __future__ import annotations

import ast
import subprocess
import sys
import typing
from pathlib import Path

import yaml

from ddpm_core import modes

REPO = Path(__file__).resolve().parents[1]


def literals_in(text: str) -> list[str]:
    """The source of every `Literal[...]` subscript of a module (by the syntax tree: docstrings
    and comments do not count)."""
    return [ast.get_source_segment(text, node) for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.Subscript) and "Literal" in (
                getattr(node.value, "id", None), getattr(node.value, "attr", None))]


def literals_outside_modes() -> set[tuple[str, str]]:
    """(file, source) of every Literal in ddpm_core/ and pipeline/ but modes.py."""
    paths = [*REPO.glob("ddpm_core/*.py"), *REPO.glob("pipeline/*.py")]
    return {(p.relative_to(REPO).as_posix(), lit) for p in paths if p.name != "modes.py"
            for lit in literals_in(p.read_text())}


def test_every_literal_of_the_library_and_the_stages_is_defined_in_modes() -> None:
    found = literals_outside_modes()
    assert not found, f"define these in ddpm_core/modes.py and import them: {sorted(found)}"


def test_the_scan_sees_literals_in_annotations_and_not_in_docstrings() -> None:
    src = ('"""Literal["x"] in prose."""\n'
           'def f(a: Literal["w"], b: typing.Literal["y", "z"], c: list[int]) -> None: ...\n')
    assert sorted(literals_in(src)) == ['Literal["w"]', 'typing.Literal["y", "z"]']


def test_library_config_and_stages_use_the_same_literals() -> None:
    from ddpm_core import diffusion, fid, inference, losses, resample, schedules, unet
    from pipeline import records
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
    assert set(unet.PRESETS) == set(typing.get_args(modes.Preset))
    assert tuple(fid._LABELS) == typing.get_args(modes.Features)
    assert records.SamplerSpec.__annotations__["kind"] == "SpecKind"


def test_the_sigma2_table_is_the_one_vocabulary() -> None:
    from ddpm_core import cli

    table = modes.SIGMA2_MODES
    assert tuple(table) == typing.get_args(modes.Sigma2) == modes.SIGMA2S
    var_types = set(typing.get_args(modes.VarType))
    assert var_types < set(modes.SIGMA2S)
    assert set(modes.FIXED_VAR_TYPES) | set(modes.LEARNED_VAR_TYPES) == var_types
    for name, m in table.items():
        assert modes.sigma2_mode(name) is m and modes.sigma2_mode(m.short) is m
        assert m.key == f"sigma2_{m.short}"
    assert cli.SIGMA2 == [m.short for m in table.values()]
    assert len({m.label for m in table.values()}) == len(table)


def test_dvc_plots_name_the_columns_the_stages_write() -> None:
    """dvc.yaml cannot derive its plot columns: they must be the names the stages write."""
    from pipeline.fid import STEPS_COLUMNS

    plots = {k: v for p in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
             for k, v in p.items()}
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    keys = [modes.SIGMA2_MODES[v].key for v in params["bpd"]["variances"]]
    assert plots["bpd"]["y"] == keys and plots["plots/bpd_steps"]["y"] == keys
    assert plots["plots/fid_steps"]["y"] == list(STEPS_COLUMNS)


def test_importing_the_configuration_does_not_import_torch() -> None:
    code = ("import sys, ddpm_core.config, ddpm_core.modes, pipeline.params; "
            "print([m for m in sys.modules if m == 'torch' or m.startswith('torch.')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
