"""Stage `prepare`: the train and test splits as uint8 arrays [N, H, W, C] in data/prepared/."""

from __future__ import annotations

from ddpm_core.config import Params
from ddpm_core.data import prepare_splits, save_splits
from pipeline.common import atomic_dir, run_stage, write_json
from pipeline.records import DATA_DIR


def main(params: Params) -> None:
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
