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

import contextlib
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ddpm_core.files import pid_alive
from pipeline.common import StageError, stable_hash
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
# runs:/<run id>/model/<v>.pt, to copy from the UI into
# ddpm_core.load_model(mlflow.artifacts.download_artifacts(uri))
MODEL_URI_TAG = "ddpm.model_uri"
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


class TrackingUnavailable(StageError):
    """The tracking store cannot be reached or opened; the message names the URI and the fix."""


def env_seconds(env: str, default: float) -> float:
    """A wait in seconds from the environment variable `env` (unset or empty: `default`)."""
    raw = os.environ.get(env)
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise TrackingUnavailable(f"{env}={raw!r}: expected a number of seconds") from None
    if value <= 0:
        raise TrackingUnavailable(f"{env}={raw!r}: must be > 0 seconds")
    return value


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///<path>` store, else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def lock_path(uri: str) -> Path:
    """The lock file that serialises store creation and logging: beside a sqlite file, else
    in the repository root (queued experiments share DVC_ROOT, so they share the lock)."""
    db = sqlite_file(uri)
    return repo_root() / ".mlflow.lock" if db is None else db.with_name(db.name + ".lock")


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's text on one line (whitespace collapsed), or its type's name."""
    return " ".join(str(e).split())[:limit] or type(e).__name__


def reason(e: BaseException) -> str:
    """Why a request failed, in a few words: the last `[Errno N] ...` in its text (a refused
    or reset connection, deep inside requests' and MLflow's wrapping), else its first line."""
    text = first_line(e, 100_000)
    return (re.findall(r"\[Errno -?\d+\] [^'\")(]+", text) or [text[:200]])[-1].strip()


def _wait_for_server(uri: str, timeout: float) -> None:
    """Poll an http(s) tracking server's /health until it answers or `timeout` s have passed."""
    import requests

    deadline = time.monotonic() + timeout
    while True:
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=min(5.0, timeout)).raise_for_status()
            return
        except requests.RequestException as e:
            last = reason(e)
        if time.monotonic() >= deadline:
            raise TrackingUnavailable(
                f"mlflow: tracking server {uri} not reachable after {timeout:g} s ({last}); "
                f"start it, or unset MLFLOW_TRACKING_URI to use the local sqlite store "
                f"({STORE_TIMEOUT_ENV} sets the wait)")
        time.sleep(0.5)


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its files: `mlartifacts/` beside a sqlite store (so clones
    sharing the store share it, and deleting one clone loses nothing); None elsewhere (a
    server's --default-artifact-root, a file store's own folder)."""
    db = sqlite_file(uri)
    return None if db is None else (db.resolve().parent / "mlartifacts").as_uri()


def _open(params: Params, uri: str) -> tuple[Any, str]:
    """(client, id of the experiment params.mlflow.experiment), created on first use with its
    artifact root and the UI's model-training view; one line for a deleted one."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its retries: our one line says it
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name = params.mlflow.experiment
    try:
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            return client, client.create_experiment(name, artifact_location=artifact_root(uri),
                                                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        if exp.lifecycle_stage == "deleted":
            raise TrackingUnavailable(
                f"mlflow: experiment {name!r} is deleted in {uri}; restore it "
                f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or set "
                "mlflow.experiment to another name")
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return client, exp.experiment_id
    except MlflowException as e:
        raise TrackingUnavailable(f"mlflow: store {uri} failed: {first_line(e)}") from None


def lost_store(uri: str, e: BaseException) -> str:
    """One line for a store that failed in the middle of logging."""
    import requests

    text = str(e)
    gone = isinstance(e, requests.exceptions.ConnectionError) or any(
        m in text for m in ("Max retries exceeded", "Connection refused", "Connection aborted",
                            "Connection reset", "Read timed out"))
    what = (f"the tracking server at {uri} stopped answering" if gone and uri.startswith("http")
            else f"the store {uri} failed")
    return (f"mlflow: {what} while logging ({reason(e)}); the results are safe on disk "
            "and the next `dvc repro` (or python -m pipeline.track) repairs the run tree")


@contextmanager
def store(params: Params) -> Iterator[tuple[Any, str]]:
    """(MlflowClient, experiment id), holding the store's lock for the whole block.

    The lock (a file beside the sqlite database) makes the first creation of the schema, the
    "log once" check and the logging itself safe when several `track` processes start at once
    (e.g. `dvc queue start -j 2`); a tracking server that is down is an error after
    $DDPM_MLFLOW_TIMEOUT seconds, not after MLflow's minutes of retries.
    """
    import requests
    from filelock import FileLock, Timeout
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(params)
    timeout = env_seconds(STORE_TIMEOUT_ENV, 15.0)
    # MLflow's own HTTP retries default to minutes; keep them within the store timeout
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(timeout))))
    if uri.startswith(("http://", "https://")):
        _wait_for_server(uri, timeout)
    lock = lock_path(uri)
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(lock), timeout=600):
            opened = _open(params, uri)
            try:
                yield opened
            except (MlflowException, requests.RequestException) as e:  # store stopped answering
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
    if client.tracking_uri.startswith("sqlite:"):  # its lock file serialises every writer
        _kill_running(client, exp_id, "")
        return _write_once(client, exp_id, key, write)
    mine = _claim(client, exp_id, key)
    if mine is None:  # written by the other writer while this one waited
        return _complete_parent(client, exp_id, key), False
    status = "FAILED"
    try:
        with _heartbeat(client.tracking_uri, mine):
            _kill_running(client, exp_id, key)
            out = _write_once(client, exp_id, key, write)
        status = "FINISHED"
    finally:
        _release(client, mine, status)
    return out


def _write_once(client: Any, exp_id: str, key: str, write: Callable[[], str]
                ) -> tuple[str, bool]:
    """(the complete parent of `key`, False), else (write(), True) once the half-written
    parents of `key` are deleted."""
    done = _complete_parent(client, exp_id, key)
    if done is not None:
        return done, False
    delete_parents(client, exp_id, key)
    return write(), True


def _kill_running(client: Any, exp_id: str, key: str) -> None:
    """Mark KILLED our runs still RUNNING (of `key`'s tree; "": every key): nobody else is
    writing them, so a killed process left them."""
    for r in client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'",
                                max_results=1000):
        run_key = r.data.tags.get(KEY_TAG)
        if run_key is not None and (not key or run_key == key or run_key.startswith(key + "/")):
            client.set_terminated(r.info.run_id, "KILLED")


def _parents(client: Any, exp_id: str, key: str) -> list[Any]:
    """The active parent runs of `key`."""
    return [r for r in tagged(client, exp_id, KEY_TAG, key)
            if r.data.tags.get(LEVEL_TAG) == "parent"]


def _complete_parent(client: Any, exp_id: str, key: str) -> str | None:
    """The id of `key`'s complete parent run, or None."""
    done = [r for r in _parents(client, exp_id, key) if r.data.tags.get(COMPLETE_TAG) == "true"]
    return done[0].info.run_id if done else None


def delete_parents(client: Any, exp_id: str, key: str) -> None:
    """Delete every parent run of `key` with its nested runs."""
    for r in _parents(client, exp_id, key):
        delete_tree(client, exp_id, r.info.run_id)


def _release(client: Any, run_id: str, status: str) -> None:
    """End and delete a claim run (best effort: a claim left behind goes stale)."""
    with contextlib.suppress(Exception):  # the store is failing; the next writer takes over
        client.set_terminated(run_id, status)
        client.delete_run(run_id)


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
    wait, stale = env_seconds(CLAIM_WAIT_ENV, 600.0), env_seconds(CLAIM_STALE_ENV, 60.0)
    deadline = time.monotonic() + wait
    seen: dict[str, tuple[str, float]] = {}  # claim run id -> (heartbeat, when it last moved)
    owner = f"{socket.gethostname()}:{os.getpid()} ({Path.cwd()})"
    waiting = False
    while True:
        if _complete_parent(client, exp_id, key) is not None:
            return None
        now = time.monotonic()
        live = []
        for c in tagged(client, exp_id, CLAIM_TAG, key):
            beat = c.data.tags.get(HEARTBEAT_TAG, "")
            if seen.get(c.info.run_id, (None,))[0] != beat:  # new, or it moved
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
            rivals = [c.info.run_id for c in tagged(client, exp_id, CLAIM_TAG, key)
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
    host, _, rest = owner.partition(":")
    pid = rest.split(" ", 1)[0]
    return host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))


@contextmanager
def _heartbeat(uri: str, run_id: str) -> Iterator[None]:
    """Raise the claim's heartbeat tag every few seconds (a thread) while the block runs."""
    from mlflow.tracking import MlflowClient

    stop = threading.Event()
    every = min(5.0, env_seconds(CLAIM_STALE_ENV, 60.0) / 4)

    def beat() -> None:
        client, n = MlflowClient(tracking_uri=uri), 0
        while not stop.wait(every):
            n += 1
            with contextlib.suppress(Exception):  # a lost store shows in the main thread
                client.set_tag(run_id, HEARTBEAT_TAG, str(n))

    threading.Thread(target=beat, name="mlflow-claim-heartbeat", daemon=True).start()
    try:
        yield
    finally:
        stop.set()


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested dicts -> {"a.b": "value"}: None as "null", a list as "[a, b]", at most MLflow's
    6000 characters of a param value."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            text = "null" if v is None else (
                "[" + ", ".join(map(str, v)) + "]" if isinstance(v, (list, tuple)) else str(v))
            out[prefix + str(k)] = text[:6000]
    return out


def tagged(client: Any, exp_id: str, tag: str, value: str) -> list[Any]:
    """The active runs whose tag `tag` is `value` (a key's runs, its claims, a run's children)."""
    return client.search_runs([exp_id], filter_string=f"tags.`{tag}` = '{value}'", max_results=1000)


def delete_tree(client: Any, exp_id: str, run_id: str) -> None:
    """Delete a run and (recursively) its nested runs."""
    for child in tagged(client, exp_id, PARENT_TAG, run_id):
        delete_tree(client, exp_id, child.info.run_id)
    client.delete_run(run_id)


def create_run(client: Any, exp_id: str, name: str, key: str, level: str,
               parent: str | None = None, tags: dict | None = None,
               start_time: int | None = None) -> str:
    """A new run carrying its deterministic key (and its parent, when nested); `start_time`
    (ms since the epoch) places it when its work ran (default: now)."""
    tags = {KEY_TAG: key, LEVEL_TAG: level, **(tags or {}),
            **({} if parent is None else {PARENT_TAG: parent})}
    return client.create_run(exp_id, run_name=name, tags=tags, start_time=start_time).info.run_id


def log_batch(client: Any, run_id: str, params: dict | None = None,
              metrics: dict | None = None, steps: list[tuple[str, float, int]] | None = None
              ) -> None:
    """Params, scalar metrics (None left out) and per-step metric histories in one
    MlflowClient.log_batch (which splits them into MLflow's per-request limits)."""
    from mlflow.entities import Metric, Param
    from mlflow.utils.time import get_current_time_millis

    now = get_current_time_millis()
    m = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items() if v is not None]
    m += [Metric(k, float(v), now, int(s)) for k, v, s in (steps or [])]
    client.log_batch(run_id, metrics=m,
                     params=[Param(k, str(v)) for k, v in (params or {}).items()])


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
    """A FAILED parent and variant run for a stage that stopped (e.g. a NaN loss); a repeat of
    the same failure replaces them."""
    key = "failed-" + stable_hash({"params": to_dict(params), "stage": stage,
                                   "variant": variant, "message": message})
    tags = {**run_tags(params), "ddpm.error": message[:5000], "ddpm.failed_stage": stage}
    try:
        with store(params) as (client, exp_id):
            delete_parents(client, exp_id, key)
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
        print(f"mlflow: could not record the failure: {first_line(e)}")
