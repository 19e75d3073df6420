"""Stage `prepare`: the train and test splits as uint8 arrays [N, H, W, C] in data/prepared/."""

from __future__ import annotations

import os
from pathlib import Path

from ddpm_core.data import prepare_splits, save_splits
from pipeline.common import atomic_dir, run_stage, write_json
from pipeline.params import ConfigError, Params
from pipeline.records import DATA_DIR

RAW_DIR = Path("data/raw")  # the stage's one data dependency in dvc.yaml


def check(params: Params) -> None:
    """data.path must lie under data/raw/: data anywhere else is no DVC dependency, so replacing
    it would leave data/prepared stale. DVC hashes a symlinked file's content but does not look
    into a symlinked folder, so a symlink is fine for a file, not for a folder."""
    if params.data.path is None:
        return
    raw = Path(os.path.abspath(RAW_DIR))
    path = Path(os.path.normpath(os.path.abspath(params.data.path)))  # symlinks kept
    if not path.is_relative_to(raw):
        raise ConfigError(f"data.path: {params.data.path} lies outside data/raw/, the only data "
                          "DVC tracks for the prepare stage; put it under data/raw/ (a symlink "
                          "to a file is fine) so DVC tracks it")
    for p in [path, *path.parents]:
        if p == raw:
            break
        if p.is_symlink() and (p != path or p.is_dir()):
            raise ConfigError(f"data.path: {p.relative_to(raw.parent.parent)} is a symlinked "
                              "folder, which DVC does not look into (new images would go "
                              "unnoticed); put the folder itself under data/raw/ (symlinked "
                              "files inside it are fine)")


def main(params: Params) -> None:
    check(params)
    splits = prepare_splits(params.data, params.data.split_seed)
    with atomic_dir(DATA_DIR) as tmp:
        save_splits(splits, tmp)
        write_json({"dataset": splits.name, "train": list(splits.train.shape),
                    "test": list(splits.test.shape),
                    "labels": splits.train_labels is not None}, tmp / "info.json")
    print(f"prepare: {splits.name}: train {splits.train.shape}, test {splits.test.shape} "
          f"-> {DATA_DIR}")


if __name__ == "__main__":
    run_stage(main)
