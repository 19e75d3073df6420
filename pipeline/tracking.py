"""MLflow bookkeeping shared by the `track` stage and the train stage's failure path.

Store: MLFLOW_TRACKING_URI if set, else params.mlflow.tracking_uri, else
`sqlite:///<DVC_ROOT or cwd>/mlflow.db` (DVC sets DVC_ROOT to the main repository even for
queued and temporary experiments, so every experiment lands in one store); file artifacts go to
`<root>/mlartifacts/`.

Run layout, found-or-created by a deterministic key held in the tag `ddpm.key`:
  parent   one per pipeline result (key: hash of the params and of every stage output's hash)
  variant  one per model (`ddpm.level = variant`): its params, final loss, loss history,
           bits/dim per σ², FID per sampler, sample grids, the per-term bits/dim table
  sampler  one per (model, sampler) under its variant (`ddpm.level = sampler`): params
           sampler/kind/steps/sigma2, metrics fid, kid and (full chains) the bits/dim of the
           same σ², so "σ² = β vs β̃" is two rows to tick and compare in the UI.
A run tree is written completely and then tagged `ddpm.complete = true`; a later call with the
same key does nothing but refresh tags, and a half-written tree (killed mid-way) is deleted and
written again, so repeating `dvc repro` or restoring stages from DVC's run cache never
duplicates a run.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from ddpm_core.config import Params, to_dict

KEY_TAG = "ddpm.key"
LEVEL_TAG = "ddpm.level"
COMPLETE_TAG = "ddpm.complete"
PARENT_TAG = "mlflow.parentRunId"


def repo_root() -> Path:
    """DVC_ROOT when DVC runs the stage (the main repo, also for queued experiments), else cwd."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(params: Params) -> str:
    """MLFLOW_TRACKING_URI > params.mlflow.tracking_uri > sqlite:///<repo root>/mlflow.db."""
    return (os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri
            or f"sqlite:///{repo_root() / 'mlflow.db'}")


def client_and_experiment(params: Params) -> tuple[Any, str]:
    """An MlflowClient on the store and the id of params.mlflow.experiment (created if new)."""
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(params)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(params.mlflow.experiment)
    if exp is not None:
        return client, exp.experiment_id
    location = None
    if uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri:
        location = (repo_root() / "mlartifacts").as_uri()
    try:
        return client, client.create_experiment(params.mlflow.experiment,
                                                artifact_location=location)
    except Exception:  # created meanwhile by a concurrent experiment
        exp = client.get_experiment_by_name(params.mlflow.experiment)
        if exp is None:
            raise
        return client, exp.experiment_id


def git_revision() -> str:
    """HEAD of the repository the stage runs in ('unknown' outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts -> {"a.b": "value"}; lists of dicts are indexed (variants.0.name)."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)) and obj and all(isinstance(v, dict) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        text = "null" if obj is None else (
            "[" + ", ".join(map(str, obj)) + "]" if isinstance(obj, (list, tuple)) else str(obj))
        out[prefix[:-1]] = text[:6000]
    return out


def find_runs(client: Any, exp_id: str, key: str) -> list[Any]:
    """Active runs whose ddpm.key tag equals `key`."""
    return client.search_runs([exp_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'",
                              max_results=1000)


def delete_tree(client: Any, exp_id: str, run_id: str) -> None:
    """Delete a run and (recursively) its nested runs."""
    for child in client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{run_id}'",
                                    max_results=1000):
        delete_tree(client, exp_id, child.info.run_id)
    client.delete_run(run_id)


def create_run(client: Any, exp_id: str, name: str, key: str, level: str,
               parent: str | None = None, tags: dict | None = None) -> str:
    """A new run carrying its deterministic key (and its parent, when nested)."""
    all_tags = {KEY_TAG: key, LEVEL_TAG: level, **(tags or {})}
    if parent is not None:
        all_tags[PARENT_TAG] = parent
    return client.create_run(exp_id, run_name=name, tags=all_tags).info.run_id


def log_batch(client: Any, run_id: str, params: dict | None = None,
              metrics: dict | None = None, steps: list[tuple[str, float, int]] | None = None,
              tags: dict | None = None) -> None:
    """Params, scalar metrics, per-step metric histories and tags in a few batched calls."""
    import time

    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    p = [Param(k, str(v)) for k, v in (params or {}).items()]
    m = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items() if v is not None]
    m += [Metric(k, float(v), now, int(s)) for k, v, s in (steps or [])]
    t = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for i in range(0, len(p), 100):  # MLflow's per-call limits: 100 params/tags, 1000 metrics
        client.log_batch(run_id, params=p[i:i + 100])
    for i in range(0, len(t), 100):
        client.log_batch(run_id, tags=t[i:i + 100])
    for i in range(0, len(m), 1000):
        client.log_batch(run_id, metrics=m[i:i + 1000])


def run_tags(params: Params) -> dict[str, str]:
    """Tags every run gets: DVC experiment name (or 'workspace'), git revision, schedule."""
    return {"dvc.exp_name": os.environ.get("DVC_EXP_NAME", "workspace"),
            "git.revision": git_revision(), "schedule": params.schedule}


def record_failure(params: Params, stage: str, variant: str, message: str,
                   history: list[dict]) -> None:
    """A FAILED parent and variant run for a stage that stopped (e.g. a NaN loss)."""
    from pipeline.common import stable_hash

    try:
        client, exp_id = client_and_experiment(params)
        key = "failed-" + stable_hash({"params": to_dict(params), "stage": stage,
                                       "variant": variant, "message": message})
        for r in find_runs(client, exp_id, key):
            if r.data.tags.get(LEVEL_TAG) == "parent":
                delete_tree(client, exp_id, r.info.run_id)
        tags = {**run_tags(params), "ddpm.error": message[:5000], "ddpm.failed_stage": stage}
        parent = create_run(client, exp_id, f"FAILED {stage} {variant}", key, "parent",
                            tags=tags)
        log_batch(client, parent, params=flatten(to_dict(params)))
        child = create_run(client, exp_id, variant, f"{key}/{variant}", "variant", parent,
                           tags={**tags, "variant": variant})
        log_batch(client, child, steps=[(k, h[k], h["step"]) for h in history
                                        for k in ("loss", "grad_norm") if k in h])
        client.set_terminated(child, "FAILED")
        client.set_terminated(parent, "FAILED")
        print(f"mlflow: run {parent} marked FAILED ({tracking_uri(params)})")
    except Exception as e:  # the stage's own error matters more than the bookkeeping
        print(f"mlflow: could not record the failure: {e}")
