"""common.variant_model: a variant's model file, or one line saying what is wrong with it."""

from __future__ import annotations

import pytest

from ddpm_core.modelfile import ModelFileError
from pipeline.common import StageError, _runtime_errors, variant_model


def test_a_missing_model_file_names_the_train_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError, match=r"^models/simple\.pt: not found; run the train stage "
                                         r"first \(dvc repro\)$"):
        variant_model("simple", use_ema=True)


def test_a_file_that_is_no_model_file_is_a_one_line_error_of_the_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "simple.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelFileError, match=r"models/simple\.pt") as e:
        variant_model("simple", use_ema=False)
    assert isinstance(e.value, _runtime_errors())  # run_stage prints it as one line, exit 1
