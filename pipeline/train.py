"""Stage `train`: one model per entry of params.variants (a DDPM Table 2 row or L_hybrid).

Writes models/<variant>.pt (raw and EMA weights plus what is needed to rebuild the network and
its diffusion), plots/loss/<variant>.csv (the loss curve `dvc plots` shows) and
metrics/train.json. The training state lives in checkpoints/<variant>/<key>/ (a DVC `persist`
output): `key` hashes every setting that changes the weights except train.steps, so an
interrupted stage resumes where it stopped and raising train.steps continues training.
With train.nproc > 1 the stage relaunches itself under `torchrun --nproc_per_node=N` (DDP).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from ddpm_core.checkpoint import list_checkpoints
from ddpm_core.config import Params, TrainConfig, VariantConfig, weight_settings
from ddpm_core.data import load_images, to_model_tensor
from ddpm_core.diffusion import Diffusion
from ddpm_core.losses import Loss
from ddpm_core.modelfile import ModelSpec, save_model
from ddpm_core.resample import make_sampler
from ddpm_core.training import TrainingDiverged, train
from ddpm_core.unet import UNet
from pipeline.common import (
    CKPT_DIR,
    DATA_DIR,
    METRICS_DIR,
    MODELS_DIR,
    PLOTS_DIR,
    atomic_dir,
    device,
    relaunch_under_torchrun,
    run_stage,
    stable_hash,
    unet_config,
    write_json,
)

LOSS_DIR = PLOTS_DIR / "loss"


def train_config(params: Params) -> TrainConfig:
    """params.train, with horizontal flips off where they change the class (digits)."""
    return dataclasses.replace(params.train,
                               hflip=params.train.hflip and params.data.dataset != "digits")


def ckpt_dir_for(params: Params, v: VariantConfig, ucfg: object, cfg: TrainConfig) -> Path:
    """checkpoints/<variant>/<key>: the key hashes what the weights depend on, steps excluded."""
    key = stable_hash({"schedule": params.schedule, "T": params.diffusion.timesteps,
                       "variant": dataclasses.asdict(v), "unet": dataclasses.asdict(ucfg),
                       "data": dataclasses.asdict(params.data),
                       "train": weight_settings(cfg)})
    d = CKPT_DIR / v.name / key
    done = list_checkpoints(d)
    if done and int(done[-1].name[5:-3]) > cfg.steps:
        d = CKPT_DIR / v.name / f"{key}-steps{cfg.steps}"  # fewer steps than trained: start anew
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


def train_variant(params: Params, v: VariantConfig, data: torch.Tensor, is_main: bool) -> dict:
    """Train (or resume, or find finished) one variant; rank 0 writes its files."""
    cfg = train_config(params)
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

    def on_log(step: int, metrics: dict) -> None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        with hist_file.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        print(f"train[{v.name}] step {step}/{cfg.steps} loss {metrics['loss']:.4f} "
              f"grad_norm {metrics['grad_norm']:.3f} {metrics['images_per_s']:.0f} img/s",
              flush=True)

    t0 = time.perf_counter()
    try:
        result = train(model, loss, t_sampler, data, cfg, ckpt_dir, device=device(), on_log=on_log,
                       spec=spec)
    except TrainingDiverged as e:
        if is_main:
            from pipeline.tracking import record_failure

            record_failure(params, "train", v.name, str(e), _read_history(hist_file))
        raise
    seconds = time.perf_counter() - t0
    history = _read_history(hist_file)
    if is_main:
        save_model(MODELS_DIR / f"{v.name}.pt", spec,
                   {"ema": result.ema.state_dict(), "model": result.model.state_dict()},
                   meta={"name": v.name, "variant": dataclasses.asdict(v), "step": result.step})
    resumed = str(result.resumed_from) if result.resumed_from else None
    if is_main:
        print(f"train[{v.name}]: {result.step} steps in {seconds:.1f} s"
              + (f" (resumed from {resumed})" if resumed else ""), flush=True)
    return {"history": history, "steps": result.step, "seconds": seconds, "resumed": resumed,
            "checkpoints": str(ckpt_dir), "params": sum(p.numel() for p in model.parameters())}


def main(params: Params) -> None:
    relaunch_under_torchrun("pipeline.train", params.train.nproc)
    is_main = int(os.environ.get("RANK", "0")) == 0
    data = to_model_tensor(load_images(DATA_DIR / "train.npy"))
    MODELS_DIR.mkdir(exist_ok=True)
    summary, curves = {}, {}
    for v in params.variants:
        r = train_variant(params, v, data, is_main)
        last = r["history"][-1] if r["history"] else {}
        summary[v.name] = {"final_loss": last.get("loss"), "steps": r["steps"],
                           "seconds": round(r["seconds"], 2),
                           "images_per_s": last.get("images_per_s"), "parameters": r["params"]}
        curves[v.name] = r["history"]
    if not is_main:
        return
    stale = [p for p in MODELS_DIR.glob("*.pt") if p.stem not in summary]
    for p in stale:  # variants no longer in params.yaml
        p.unlink()
    with atomic_dir(LOSS_DIR) as tmp:
        for name, hist in curves.items():
            lines = ["step,loss,grad_norm,lr"] + [
                f"{h['step']},{h['loss']:.6g},{h['grad_norm']:.6g},{h['lr']:.6g}" for h in hist]
            (tmp / f"{name}.csv").write_text("\n".join(lines) + "\n")
    write_json(summary, METRICS_DIR / "train.json")


if __name__ == "__main__":
    run_stage(main)
