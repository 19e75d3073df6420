"""Stage `train@<variant>`: one model (a DDPM Table 2 row or L_hybrid), or, for a variant with
`pretrained: path`, the import of existing weights.

Writes models/<v>.pt (raw and EMA weights plus the network and diffusion spec),
plots/loss/<v>.csv (appended at every log step, so `dvc plots show` works while training runs),
metrics/train/<v>.json (the final loss) and timings/train/<v>.json. The training state lives in
checkpoints/<v>/<key>/, deliberately not a DVC output (a persist output would keep DVC's run
cache from restoring this stage): `key` hashes every setting that changes the weights except
train.steps, so an interrupted stage resumes where it stopped and raising train.steps continues
training. With train.nproc > 1 or train.nnodes > 1 the stage relaunches itself under torchrun
(DDP; on several machines through its c10d rendezvous, pipeline.common).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from ddpm_core.checkpoint import list_checkpoints, step_of
from ddpm_core.config import weight_settings
from ddpm_core.data import load_images, to_model_tensor
from ddpm_core.diffusion import Diffusion
from ddpm_core.losses import Loss
from ddpm_core.modelfile import ModelSpec, save_model
from ddpm_core.resample import make_sampler
from ddpm_core.training import TrainingDiverged, TrainingInterrupted, train
from ddpm_core.unet import UNet
from pipeline.common import (
    StageError,
    relaunch_under_torchrun,
    run_stage,
    stable_hash,
    unet_config,
    write_json,
    write_text,
)
from pipeline.params import ConfigError, Params, TrainConfig, VariantConfig
from pipeline.records import DATA_DIR, FINAL_LOSS, VariantPaths, variant_metrics

LOSS_HEADER = "step,loss,grad_norm,lr"


def ckpt_dir_for(params: Params, v: VariantConfig, ucfg: object, cfg: TrainConfig) -> Path:
    """checkpoints/<variant>/<key>: the key hashes what the weights depend on, steps excluded."""
    variant = {k: x for k, x in dataclasses.asdict(v).items()
               if k not in ("pretrained", "format")}
    key = stable_hash({"schedule": params.schedule, "T": params.diffusion.timesteps,
                       "variant": variant, "unet": dataclasses.asdict(ucfg),
                       "data": dataclasses.asdict(params.data), "train": weight_settings(cfg)})
    d = VariantPaths(v.name).checkpoints() / key
    done = list_checkpoints(d)
    if done and step_of(done[-1]) > cfg.steps:
        d = d.with_name(f"{key}-steps{cfg.steps}")  # fewer steps than trained: start anew
    return d


def _read_history(path: Path) -> list[dict]:
    """Logged windows, one per step (a resumed run re-logs steps after its checkpoint)."""
    if not path.is_file():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[int(row["step"])] = row
    return [rows[k] for k in sorted(rows)]


def _repair_history(path: Path) -> None:
    """Cut a torn last line (a kill inside on_log's write) so appended rows stay whole."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _loss_rows(history: list[dict]) -> str:
    return "".join(f"{h['step']},{h['loss']:.6g},{h['grad_norm']:.6g},{h['lr']:.6g}\n"
                   for h in history)


def train_variant(params: Params, v: VariantConfig, is_main: bool) -> None:
    """Train (or resume, or find finished) one variant; rank 0 writes its files."""
    paths = VariantPaths(v.name)
    cfg = params.train
    data = to_model_tensor(load_images(DATA_DIR / "train.npy"))
    if cfg.batch_size > len(data):  # each batch would repeat images: not what was asked
        raise ConfigError(f"train.batch_size: {cfg.batch_size} exceeds the {len(data):,} "
                          "training images; lower it (at most the training split)")
    diff = Diffusion.from_schedule(params.schedule, params.diffusion.timesteps, v.mean_type,
                                   v.var_type)
    hwc = (data.shape[2], data.shape[3], data.shape[1])
    ucfg = unet_config(params, hwc, diff.out_channels(hwc[2]))
    ckpt_dir = ckpt_dir_for(params, v, ucfg, cfg)
    hist_file = ckpt_dir / "history.jsonl"
    torch.manual_seed(cfg.seed)  # the initial weights
    model = UNet(ucfg)
    loss, t_sampler = Loss(diff, v.loss), make_sampler(v.t_sampling, diff.T)
    spec = ModelSpec(ucfg, params.schedule, params.diffusion.timesteps, v.mean_type, v.var_type)
    if is_main:  # the loss curve so far (a resumed run), then one appended row per log step
        _repair_history(hist_file)
        write_text(LOSS_HEADER + "\n" + _loss_rows(_read_history(hist_file)), paths.loss_csv)

    def on_log(step: int, metrics: dict) -> None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        row = {"step": step, **metrics}
        with hist_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        with paths.loss_csv.open("a") as f:
            f.write(_loss_rows([row]))
        print(f"train[{v.name}] step {step}/{cfg.steps} loss {metrics['loss']:.4f} "
              f"grad_norm {metrics['grad_norm']:.3f} {metrics['images_per_s']:.0f} img/s",
              flush=True)

    t0 = time.perf_counter()
    try:
        result = train(model, loss, t_sampler, data, cfg, ckpt_dir, on_log=on_log, spec=spec)
    except TrainingDiverged as e:
        if is_main:
            from pipeline.tracking import record_failure

            record_failure(params, "train", v.name, str(e), _read_history(hist_file))
        raise
    except TrainingInterrupted as e:  # a SystemExit with code 128 + signal: one line, no more
        if is_main:
            print(f"error: {e}; run the stage again to resume", file=sys.stderr, flush=True)
        raise
    seconds = time.perf_counter() - t0
    if not is_main:
        return
    history = _read_history(hist_file)
    save_model(paths.model, spec,
               {"model": result.model.state_dict(), "ema": result.ema.state_dict()},
               {"variant": v.name, "step": result.step, "train": dataclasses.asdict(cfg),
                "loss": v.loss, "t_sampling": v.t_sampling})
    # the curve once more, deduplicated (a resumed run re-logged steps after its checkpoint)
    write_text(LOSS_HEADER + "\n" + _loss_rows(history), paths.loss_csv)
    last = history[-1] if history else {}
    write_json(variant_metrics(v.name, {FINAL_LOSS: last.get("loss")}), paths.train_metrics)
    resumed = str(result.resumed_from) if result.resumed_from else None
    write_json({"seconds": round(seconds, 2), "steps": result.step,
                "images_per_s": last.get("images_per_s"), "resumed_from": resumed,
                "checkpoints": str(ckpt_dir),
                "parameters": sum(p.numel() for p in model.parameters())}, paths.timings("train"))
    print(f"train[{v.name}]: {result.step} steps in {seconds:.1f} s"
          + (f" (resumed from {resumed})" if resumed else ""), flush=True)


def import_pretrained(params: Params, v: VariantConfig) -> None:
    """models/<v>.pt from existing weights (one of our model files, a training checkpoint or a
    diffusers DDPM folder) through the engine's door: api.load_model, then api.check_matches
    against params.yaml (T, schedule, mean and variance type; exit 2 naming the key and the
    weights' value), then the model file."""
    from ddpm_core.api import ModelMismatch, check_matches, load_model, save_model_file
    from ddpm_core.modelfile import ModelFileError

    paths = VariantPaths(v.name)
    path = Path(v.pretrained or "")
    key = f"variants.{v.name}.pretrained"
    if not path.exists():
        raise StageError(f"{key}: {path} not found; point it at one of our model files "
                         "(models/<variant>.pt), a checkpoint (checkpoints/.../ckpt_*.pt) or a "
                         "diffusers DDPM folder (format: diffusers)")
    if v.format == "ours" and path.is_dir():
        raise StageError(f"{key}: {path} is a folder; format 'ours' wants a file "
                         "(models/<variant>.pt or ckpt_*.pt), format 'diffusers' a folder")
    try:  # a bad file or folder: one line naming it (and this key)
        net, diff = load_model(path, "ema")
        raw = load_model(path, "model")[0] if v.format == "ours" else net
    except (ValueError, FileNotFoundError, ModelFileError) as e:
        raise StageError(f"{key}: {e}") from None
    try:
        check_matches(diff, schedule=params.schedule, timesteps=params.diffusion.timesteps,
                      mean_type=v.mean_type, var_type=v.var_type, source=f"{key} {path}")
    except ModelMismatch as e:
        raise ConfigError(str(e)) from None
    save_model_file(net, diff, paths.model, {"variant": v.name, "pretrained": str(path),
                                             "format": v.format}, raw=raw)
    write_text(LOSS_HEADER + "\n", paths.loss_csv)
    write_json(variant_metrics(v.name, {}), paths.train_metrics)
    write_json({"seconds": 0.0, "pretrained": str(path)}, paths.timings("train"))
    print(f"train[{v.name}]: imported {v.format} weights from {path}", flush=True)


def main(params: Params, v: VariantConfig) -> None:
    if v.pretrained is not None:
        import_pretrained(params, v)
        return
    relaunch_under_torchrun("pipeline.train", params.train.nproc, params.train.nnodes)
    train_variant(params, v, int(os.environ.get("RANK", "0")) == 0)


if __name__ == "__main__":
    run_stage(main, per_variant=True)
