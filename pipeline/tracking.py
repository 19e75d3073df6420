"""MLflow bookkeeping shared by the `track` stage and the train stage's failure path.

Store: MLFLOW_TRACKING_URI if set, else params.mlflow.tracking_uri, else
`sqlite:///<DVC_ROOT or cwd>/mlflow.db` (DVC sets DVC_ROOT to the main repository even for
queued and temporary experiments, so every experiment lands in one store); file artifacts go to
`mlartifacts/` beside a sqlite store (see artifact_root).

Run layout, found-or-created by a deterministic key held in the tag `ddpm.key`:
  parent   one per pipeline result (key: hash of the params and of every stage output's hash),
           carrying every variant's headline metrics as `<variant>.<metric>`
           (`simple.bpd_sigma2_beta`, `vlb.fid_ancestral_beta`: DVC's column names), so the
           chart view compares whole pipeline results (linear vs cosine) without expanding
  variant  one per model (`ddpm.level = variant`): every param in effect (train.* as training
           used them), final loss, loss history, bits/dim per σ² × K, FID per sampler, its
           training time (train_seconds; the run's start/end span the training), the model
           file (artifact model/<v>.pt), the data set splits as MLflow dataset inputs whose
           digest is DVC's hash of data/prepared, every file its stages wrote (artifacts
           under the same paths: bpd/<v>.csv, plots/loss/<v>.csv, ...; not sample arrays)
  sampler  one per (model, sampler) under its variant (`ddpm.level = sampler`): params
           sampler/kind/steps/sigma2, metrics fid, kid and (full chains) the bits/dim of the
           same σ², so "σ² = β vs β̃" is two rows to tick and compare in the UI.
A run tree is written completely and then tagged `ddpm.complete = true`; a later call with the
same key does nothing but refresh tags, and a half-written tree (killed mid-way) is deleted and
written again, so repeating `dvc repro` or restoring stages from DVC's run cache never
duplicates a run. Writers are serialised by a lock file on a sqlite store and by a claim run
in the store itself elsewhere (a tracking server shared by clones: see log_once).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.common import StageError
from pipeline.params import Params, check_tracking_uri, to_dict
from pipeline.provenance import git_state

KEY_TAG = "ddpm.key"
LEVEL_TAG = "ddpm.level"
COMPLETE_TAG = "ddpm.complete"
PARENT_TAG = "mlflow.parentRunId"
# The UI opens an experiment of this kind on its model-training view (runs, charts), not on
# the GenAI overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
MODEL_ARTIFACT_DIR = "model"  # a variant run's models/<v>.pt, as artifact model/<v>.pt
MODEL_URI_TAG = "ddpm.model_uri"  # runs:/<run id>/model/<v>.pt, to copy from the UI
DATASET_CONTEXT_TAG = "mlflow.data.context"  # training / evaluation: the UI's dataset badge


def repo_root() -> Path:
    """DVC_ROOT when DVC runs the stage (the main repo, also for queued experiments), else cwd."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(params: Params) -> str:
    """MLFLOW_TRACKING_URI > params.mlflow.tracking_uri > sqlite:///<repo root>/mlflow.db."""
    if env := os.environ.get("MLFLOW_TRACKING_URI"):
        check_tracking_uri(env, "MLFLOW_TRACKING_URI")
        return env
    return params.mlflow.tracking_uri or f"sqlite:///{repo_root() / 'mlflow.db'}"


STORE_TIMEOUT_ENV = "DDPM_MLFLOW_TIMEOUT"  # seconds to wait for a tracking server (default 15)
DEFAULT_STORE_TIMEOUT = 15.0


class TrackingUnavailable(StageError):
    """The tracking store cannot be reached or opened; the message names the URI and the fix."""


def lock_path(uri: str) -> Path:
    """The lock file that serialises store creation and logging: beside a sqlite file, else
    in the repository root (queued experiments share DVC_ROOT, so they share the lock)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).with_name(Path(uri[len("sqlite:///"):]).name
                                                       + ".lock")
    return repo_root() / ".mlflow.lock"


def store_timeout() -> float:
    """Seconds to keep trying an unreachable tracking server ($DDPM_MLFLOW_TIMEOUT, default 15)."""
    raw = os.environ.get(STORE_TIMEOUT_ENV)
    try:
        value = float(raw) if raw else DEFAULT_STORE_TIMEOUT
    except ValueError:
        raise TrackingUnavailable(f"{STORE_TIMEOUT_ENV}={raw!r}: expected a number of seconds"
                                  ) from None
    if value <= 0:
        raise TrackingUnavailable(f"{STORE_TIMEOUT_ENV}={raw!r}: must be > 0 seconds")
    return value


def _wait_for_server(uri: str, timeout: float) -> None:
    """Poll an http(s) tracking server's /health until it answers or `timeout` s have passed."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health",
                                        timeout=min(5.0, timeout)) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        if time.monotonic() >= deadline:
            raise TrackingUnavailable(
                f"mlflow: tracking server {uri} not reachable after {timeout:g} s ({last}); "
                f"start it, or unset MLFLOW_TRACKING_URI to use the local sqlite store "
                f"({STORE_TIMEOUT_ENV} sets the wait)")
        time.sleep(0.5)


def _bound_mlflow_retries(timeout: float) -> None:
    """MLflow's own HTTP retries default to minutes; keep them within the store timeout."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(timeout))))


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its files: `mlartifacts/` beside a sqlite store (so clones
    sharing the store share it, and deleting one clone loses nothing); None elsewhere (a
    server's --default-artifact-root, a file store's own folder)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def _open(params: Params, uri: str) -> tuple[Any, str]:
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its retries: our one line says it
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name = params.mlflow.experiment
    try:
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(name)
        if exp is not None and exp.lifecycle_stage == "deleted":
            raise TrackingUnavailable(
                f"mlflow: experiment {name!r} is deleted in {uri}; restore it "
                f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or set "
                "mlflow.experiment to another name")
        if exp is not None:
            if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return client, exp.experiment_id
        return client, client.create_experiment(name, artifact_location=artifact_root(uri),
                                                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrackingUnavailable(f"mlflow: store {uri} failed: {first[:300]}") from None


def _store_errors() -> tuple[type[BaseException], ...]:
    """What MLflow raises when its store stops answering (a server gone, a database error)."""
    import requests
    from mlflow.exceptions import MlflowException

    return MlflowException, requests.exceptions.RequestException


def lost_store(uri: str, e: BaseException) -> str:
    """One line for a store that failed in the middle of logging."""
    import re

    import requests

    text = " ".join(str(e).split())
    reason = re.findall(r"\[Errno -?\d+\] [^'\")(]+", text) or [text[:200] or type(e).__name__]
    gone = isinstance(e, requests.exceptions.ConnectionError) or any(
        m in text for m in ("Max retries exceeded", "Connection refused", "Connection aborted",
                            "Connection reset", "Read timed out"))
    what = (f"the tracking server at {uri} stopped answering" if gone and uri.startswith("http")
            else f"the store {uri} failed")
    return (f"mlflow: {what} while logging ({reason[-1].strip()}); the results are safe on disk "
            "and the next `dvc repro` (or python -m pipeline.track) repairs the run tree")


@contextmanager
def store(params: Params) -> Iterator[tuple[Any, str]]:
    """(MlflowClient, experiment id), holding the store's lock for the whole block.

    The lock (a file beside the sqlite database) makes the first creation of the schema, the
    "log once" check and the logging itself safe when several `track` processes start at once
    (e.g. `dvc queue start -j 2`); a tracking server that is down is an error after
    $DDPM_MLFLOW_TIMEOUT seconds, not after MLflow's minutes of retries.
    """
    from filelock import FileLock, Timeout

    uri = tracking_uri(params)
    timeout = store_timeout()
    _bound_mlflow_retries(timeout)
    if uri.startswith(("http://", "https://")):
        _wait_for_server(uri, timeout)
    lock = lock_path(uri)
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(lock), timeout=600):
            opened = _open(params, uri)
            try:
                yield opened
            except _store_errors() as e:
                raise TrackingUnavailable(lost_store(uri, e)) from None
    except Timeout:
        raise TrackingUnavailable(f"mlflow: {lock} held by another process for 10 min; if no "
                                  "track stage is running, delete the lock file") from None


CLAIM_TAG = "ddpm.claim"  # a claim run: the key its writer is logging (shared stores only)
HEARTBEAT_TAG = "ddpm.heartbeat"  # a counter the claim's writer raises while it is alive
CLAIM_OWNER_TAG = "ddpm.claim_owner"  # host:pid (folder) of the writer, for the messages
CLAIM_WAIT_ENV = "DDPM_MLFLOW_CLAIM_WAIT"  # seconds to wait for another writer (default 600)
CLAIM_STALE_ENV = "DDPM_MLFLOW_CLAIM_STALE"  # seconds without a heartbeat: dead (default 60)
CLAIM_SETTLE = 1.5  # s between creating a claim and reading the rivals (> one request's latency)


class ClaimedElsewhere(Exception):  # noqa: N818 (not an error: the other writer logs the tree)
    """Another live writer holds the key's claim past $DDPM_MLFLOW_CLAIM_WAIT seconds."""


def uses_lock_file(uri: str) -> bool:
    """A sqlite store: its lock file (lock_path) serialises every writer of that file."""
    return uri.startswith("sqlite:")


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env)
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise TrackingUnavailable(f"{env}={raw!r}: expected a number of seconds") from None
    if value <= 0:
        raise TrackingUnavailable(f"{env}={raw!r}: must be > 0 seconds")
    return value


def log_once(client: Any, exp_id: str, key: str, write: Callable[[], str]) -> tuple[str, bool]:
    """The complete parent run of `key`, writing it with `write()` unless it exists.

    Call inside `store(...)`. On a sqlite store its lock is held, so a parent of this key that
    is not complete (or any of our runs still RUNNING) was left by a killed process: it is
    marked KILLED and deleted before the tree is written again. On a shared store (a tracking
    server, a database other clones write to) the lock file serialises only this repository's
    writers: the key is claimed in the store itself first (see _claim), and only the runs of
    this key are repaired. Returns (parent run id, newly written); raises ClaimedElsewhere when
    another live writer still holds the key after $DDPM_MLFLOW_CLAIM_WAIT seconds.
    """
    if uses_lock_file(client.tracking_uri):
        _kill_running(client, exp_id, "")
        return _write_once(client, exp_id, key, write)
    mine = _claim(client, exp_id, key)
    if mine is None:  # written by the other writer while this one waited
        return _complete_parent(client, exp_id, key), False
    with _heartbeat(client.tracking_uri, mine):
        try:
            _kill_running(client, exp_id, key)
            out = _write_once(client, exp_id, key, write)
        except BaseException:
            _release(client, mine, "FAILED")
            raise
    _release(client, mine, "FINISHED")
    return out


def _write_once(client: Any, exp_id: str, key: str, write: Callable[[], str]
                ) -> tuple[str, bool]:
    found = [r for r in find_runs(client, exp_id, key) if r.data.tags.get(LEVEL_TAG) == "parent"]
    done = [r for r in found if r.data.tags.get(COMPLETE_TAG) == "true"]
    if done:
        return done[0].info.run_id, False
    for r in found:
        delete_tree(client, exp_id, r.info.run_id)
    return write(), True


def _kill_running(client: Any, exp_id: str, key: str) -> None:
    """Mark KILLED our runs still RUNNING (of `key`'s tree; "": every key): nobody else is
    writing them, so a killed process left them."""
    from mlflow.entities import RunStatus

    for r in client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'",
                                max_results=1000):
        run_key = r.data.tags.get(KEY_TAG)
        if run_key is not None and (not key or run_key == key or run_key.startswith(key + "/")):
            client.set_terminated(r.info.run_id, RunStatus.to_string(RunStatus.KILLED))


def _complete_parent(client: Any, exp_id: str, key: str) -> str | None:
    for r in find_runs(client, exp_id, key):
        if r.data.tags.get(LEVEL_TAG) == "parent" and r.data.tags.get(COMPLETE_TAG) == "true":
            return r.info.run_id
    return None


def _claims(client: Any, exp_id: str, key: str) -> list[Any]:
    """The active claim runs of `key`."""
    return client.search_runs([exp_id], filter_string=f"tags.`{CLAIM_TAG}` = '{key}'",
                              max_results=1000)


def _release(client: Any, run_id: str, status: str) -> None:
    """End and delete a claim run (best effort: a claim left behind goes stale)."""
    try:
        client.set_terminated(run_id, status)
        client.delete_run(run_id)
    except Exception:  # noqa: BLE001, S110 (the store is failing; the next writer takes over)
        pass


def _claim(client: Any, exp_id: str, key: str) -> str | None:
    """Claim `key` in the store: the id of this writer's claim run, or None once a complete
    parent of the key exists (another writer logged it while this one waited).

    MLflow has no create-if-absent, so: with no live claim in sight, create one, wait
    CLAIM_SETTLE s (a rival's claim made at the same moment is then visible) and keep it only
    if its run id is the smallest of the live claims; the others delete theirs and wait. A
    claim is dead when it is no longer RUNNING (killed, failed), its heartbeat has not moved
    for $DDPM_MLFLOW_CLAIM_STALE s (its writer was killed elsewhere) or its writer's process on
    this machine is gone: it is marked KILLED and taken over.
    """
    import socket
    import time

    wait, stale = _seconds(CLAIM_WAIT_ENV, 600.0), _seconds(CLAIM_STALE_ENV, 60.0)
    deadline = time.monotonic() + wait
    seen: dict[str, tuple[str, float]] = {}  # claim run id -> (heartbeat, when it last moved)
    owner = f"{socket.gethostname()}:{os.getpid()} ({Path.cwd()})"
    waiting = False
    while True:
        if _complete_parent(client, exp_id, key) is not None:
            return None
        now = time.monotonic()
        live = []
        for c in _claims(client, exp_id, key):
            beat = c.data.tags.get(HEARTBEAT_TAG, "")
            if seen.get(c.info.run_id, ("",))[0] != beat or c.info.run_id not in seen:
                seen[c.info.run_id] = (beat, now)
            if (c.info.status != "RUNNING" or now - seen[c.info.run_id][1] > stale
                    or _writer_gone(c.data.tags.get(CLAIM_OWNER_TAG, ""))):
                _release(client, c.info.run_id, "KILLED")
            else:
                live.append(c)
        if not live:
            mine = client.create_run(exp_id, run_name=f"claim {key}", tags={
                CLAIM_TAG: key, LEVEL_TAG: "claim", HEARTBEAT_TAG: "0",
                CLAIM_OWNER_TAG: owner}).info.run_id
            time.sleep(CLAIM_SETTLE)
            rivals = [c.info.run_id for c in _claims(client, exp_id, key)
                      if c.info.status == "RUNNING"]
            if min(rivals, default=mine) == mine:
                return mine
            _release(client, mine, "KILLED")
            continue
        holder = live[0].data.tags.get(CLAIM_OWNER_TAG, live[0].info.run_id)
        if now >= deadline:
            raise ClaimedElsewhere(
                f"results {key} are being logged by another process ({holder}, claim run "
                f"{live[0].info.run_id}) for more than {wait:g} s; skipped (the next dvc repro "
                f"logs them if it does not finish; {CLAIM_WAIT_ENV} sets the wait)")
        if not waiting:
            print(f"track: results {key} are being logged by another process ({holder}); "
                  f"waiting up to {wait:g} s", flush=True)
            waiting = True
        time.sleep(min(1.0, max(0.0, deadline - now)))


def _writer_gone(owner: str) -> bool:
    """True when a claim's writer (CLAIM_OWNER_TAG "host:pid (folder)") ran on this machine
    and its process is gone: no need to wait for its heartbeat to go stale."""
    import socket

    host, _, rest = owner.partition(":")
    pid = rest.split(" ", 1)[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


@contextmanager
def _heartbeat(uri: str, run_id: str) -> Iterator[None]:
    """Raise the claim's heartbeat tag every few seconds (a thread) while the block runs."""
    import threading

    from mlflow.tracking import MlflowClient

    stop = threading.Event()
    every = min(5.0, _seconds(CLAIM_STALE_ENV, 60.0) / 4)

    def beat() -> None:
        client, n = MlflowClient(tracking_uri=uri), 0
        while not stop.wait(every):
            n += 1
            try:
                client.set_tag(run_id, HEARTBEAT_TAG, str(n))
            except Exception:  # noqa: BLE001, S110 (a lost store shows in the main thread)
                pass

    thread = threading.Thread(target=beat, name="mlflow-claim-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


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
               parent: str | None = None, tags: dict | None = None,
               start_time: int | None = None) -> str:
    """A new run carrying its deterministic key (and its parent, when nested); `start_time`
    (ms since the epoch) places it when its work ran (default: now)."""
    all_tags = {KEY_TAG: key, LEVEL_TAG: level, **(tags or {})}
    if parent is not None:
        all_tags[PARENT_TAG] = parent
    return client.create_run(exp_id, run_name=name, tags=all_tags,
                             start_time=start_time).info.run_id


def model_artifact(run_id: str, model_file: Path) -> str:
    """`runs:/<run id>/model/<v>.pt`: where a variant run keeps its model file, for
    `ddpm_core.load_model(mlflow.artifacts.download_artifacts(uri))`."""
    return f"runs:/{run_id}/{MODEL_ARTIFACT_DIR}/{Path(model_file).name}"


def dataset_input(path: Path, name: str, digest: str, context: str) -> Any:
    """An MLflow dataset input of the uint8 array at `path` [N, H, W, C] (labels beside it as
    targets, when present), named `name`, with `digest` (the DVC hash) as its identity; the
    array is memory-mapped, as MLflow reads only its shape and dtype."""
    import numpy as np
    from mlflow.data import from_numpy
    from mlflow.entities import DatasetInput, InputTag

    path = Path(path)
    labels = path.with_name(f"{path.stem}_labels.npy")
    ds = from_numpy(np.load(path, mmap_mode="r"), source=str(path), name=name, digest=digest,
                    targets=np.load(labels, mmap_mode="r") if labels.is_file() else None)
    return DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(DATASET_CONTEXT_TAG, context)])


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
    """Tags every run gets: DVC experiment name (or 'workspace'), the commit in MLflow's
    standard source tags (the UI's Source column), schedule."""
    rev = git_state().commit
    return {"dvc.exp_name": os.environ.get("DVC_EXP_NAME", "workspace"),
            "git.revision": rev, "mlflow.source.git.commit": rev,
            "mlflow.source.name": "dvc repro (pipeline/track.py)",
            "mlflow.source.type": "PROJECT", "schedule": params.schedule}


def record_failure(params: Params, stage: str, variant: str, message: str,
                   history: list[dict]) -> None:
    """A FAILED parent and variant run for a stage that stopped (e.g. a NaN loss)."""
    try:
        with store(params) as (client, exp_id):
            parent = _record_failure(client, exp_id, params, stage, variant, message, history)
        print(f"mlflow: run {parent} marked FAILED ({tracking_uri(params)})")
    except Exception as e:  # the stage's own error matters more than the bookkeeping
        print(f"mlflow: could not record the failure: {' '.join(str(e).split())[:300]}")


def _record_failure(client: Any, exp_id: str, params: Params, stage: str, variant: str,
                    message: str, history: list[dict]) -> str:
    from pipeline.common import stable_hash

    key = "failed-" + stable_hash({"params": to_dict(params), "stage": stage,
                                   "variant": variant, "message": message})
    for r in find_runs(client, exp_id, key):
        if r.data.tags.get(LEVEL_TAG) == "parent":
            delete_tree(client, exp_id, r.info.run_id)
    tags = {**run_tags(params), "ddpm.error": message[:5000], "ddpm.failed_stage": stage}
    parent = create_run(client, exp_id, f"FAILED {stage} {variant}", key, "parent", tags=tags)
    log_batch(client, parent, params=flatten(to_dict(params)))
    child = create_run(client, exp_id, variant, f"{key}/{variant}", "variant", parent,
                       tags={**tags, "variant": variant})
    log_batch(client, child, steps=[(k, h[k], h["step"]) for h in history
                                    for k in ("loss", "grad_norm") if k in h])
    client.set_terminated(child, "FAILED")
    client.set_terminated(parent, "FAILED")
    return parent
