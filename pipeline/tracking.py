"""MLflow experiment tracking: one run handle per training run / Tune trial / evaluation.

Every call goes through an explicit ``MlflowClient(tracking_uri)`` rather than MLflow's global
"active run" state, so that several Ray Tune trials in one process never log into each other's
runs. Credentials never reach the store: params, tags and the logged ``config.yaml`` are redacted
(secret-looking keys → ``***``, ``user:password@`` stripped from URLs, values of secret env vars
masked). When ``cfg.tracking.enabled`` is false every method is a no-op.

Which store and experiment a run goes to is :mod:`pipeline.tracking_store`.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import yaml

from pipeline.redact import MAX_TAG_VAL_LENGTH, redact, safe_params, safe_tags, strip_credentials, truncate
from pipeline.tracking_store import bound_http_retries, ensure_experiment, experiment_name, resolve_tracking_uri

log = logging.getLogger(__name__)

_BATCH_PARAMS = 100  # MAX_PARAMS_TAGS_PER_BATCH
_BATCH_METRICS = 1000  # MAX_METRICS_PER_BATCH
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
OUTAGE_BACKOFF_S = 60.0  # after a failed send, skip sends this long (metrics are kept and sent later)
MAX_PENDING_METRICS = 100_000


# --------------------------------------------------------------------------- metric names

# Epoch metrics by group, for the MLflow UI's sections (it groups on the part before the first "/").
# Bookkeeping (epoch, global_step, batches, num_nodes) is not a metric: the step is the x-axis,
# and the node count is a tag.
SYSTEM_METRICS = ("clips_per_s", "frames_per_s", "epoch_time_s", "data_wait_s")
TRAIN_METRICS = ("lr", "reg_share", "skipped_samples")
BOOKKEEPING = ("epoch", "global_step", "batches", "num_nodes", "mlflow_run_id")


def metric_group(key: str) -> Optional[str]:
    """MLflow name of an epoch metric (``loss_ce`` -> ``train/loss_ce``, ``mAP`` -> ``eval/mAP``);
    None for bookkeeping. Names that already carry a group (``step/lr``) are kept."""
    if key in BOOKKEEPING:
        return None
    if "/" in key:
        return key
    if key.startswith("loss_") or key in TRAIN_METRICS:
        return f"train/{key}"
    if key in SYSTEM_METRICS:
        return f"system/{key}"
    return f"eval/{key}"


def grouped_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Numeric epoch metrics renamed by :func:`metric_group`, bookkeeping dropped."""
    out = {}
    for key, value in metrics.items():
        name = metric_group(str(key))
        if name is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def is_path_value(value: Any) -> bool:
    """A local path or URL: logged as a tag, not a param (params are what runs are compared on)."""
    return isinstance(value, str) and (os.path.isabs(value) or "://" in value)


# --------------------------------------------------------------------------- tags

def _git(*args: str) -> Optional[str]:
    try:
        res = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=os.getcwd())
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _ray_job_id() -> Optional[str]:
    # Only look at Ray if something already imported it: importing Ray just to find it idle costs seconds.
    ray = sys.modules.get("ray")
    if ray is not None:
        try:
            if ray.is_initialized():
                return str(ray.get_runtime_context().get_job_id())
        except Exception:  # noqa: BLE001 - an odd Ray state must not break tracking
            pass
    return os.environ.get("RAY_JOB_ID") or None


def run_tags(cfg, extra: Optional[Mapping[str, Any]] = None) -> dict[str, str]:
    """Provenance tags: git commit + dirty flag, dataset, shard URL, Ray job, host, user tags."""
    commit = _git("rev-parse", "HEAD")
    tags: dict[str, Any] = {
        "mlflow.source.git.commit": commit or "unknown",
        "git.dirty": "unknown" if commit is None else
        str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "dataset": cfg.data.dataset,
        "data.shards": cfg.data.shards,
        "host": socket.gethostname(),
        "model.kind": cfg.model.kind,
    }
    job = _ray_job_id()
    if job:
        tags["ray.job_id"] = job
    tags.update(cfg.tracking.tags or {})
    tags.update(extra or {})
    return safe_tags(tags)


# --------------------------------------------------------------------------- values

def metric_value(key: str, value: Any) -> float:
    """Python/numpy/torch scalar → float (one-element tensors/arrays only)."""
    if hasattr(value, "detach"):  # torch tensor
        if value.numel() != 1:
            raise ValueError(f"metric {key}: expected a scalar tensor, got shape {tuple(value.shape)}")
        return float(value.detach().cpu().item())
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:  # numpy scalar / 0-d array
        return float(value.item())
    if isinstance(value, (int, float)):
        return float(value)
    raise TypeError(f"metric {key}: expected a number, got {type(value).__name__}")


# --------------------------------------------------------------------------- run handle

class Tracker:
    """Handle on one MLflow run. ``start`` first; everything is a no-op when tracking is disabled.

    Usable as a context manager: the run ends FINISHED, FAILED on an exception, KILLED on Ctrl-C.
    """

    def __init__(self, cfg=None) -> None:
        self.cfg = cfg  # default for start(); the worker builds Tracker(cfg) then start(cfg, ...)
        self.enabled = False
        self.uri: Optional[str] = None
        self.run_id: Optional[str] = None
        self.experiment_id: Optional[str] = None
        self._client = None
        self._started = False
        self._down_until = 0.0  # tracking outage: no sends before this time
        self._pending: list = []  # metrics kept during an outage, sent with the next successful batch

    # -- lifecycle
    def start(self, cfg=None, *, run_id: Optional[str] = None, parent_run_id: Optional[str] = None,
              extra_tags: Optional[Mapping[str, Any]] = None, resumed: bool = True) -> Optional[str]:
        """Create a run (nested under ``parent_run_id`` if given) or resume ``run_id``; returns the id.

        Resuming (after a Ray Train restore the id comes from the checkpoint) reopens the same run
        as RUNNING and counts the resumes in tag ``resume_count``; ``resumed=False`` attaches to a run
        the driver created for this worker (no count). Returns None when disabled.
        """
        from mlflow import MlflowClient

        cfg = cfg if cfg is not None else self.cfg
        if cfg is None:
            raise ValueError("Tracker.start needs a config (here or in Tracker(cfg))")
        self.cfg = cfg
        if self._started and self.enabled:
            raise RuntimeError(f"Tracker already started (run {self.run_id}); call end() first")
        self._started = True
        self.enabled = bool(cfg.tracking.enabled)
        if not self.enabled:
            return None
        self.uri = resolve_tracking_uri(cfg.tracking.uri)
        bound_http_retries()
        self._client = client = MlflowClient(self.uri)
        if run_id:
            run = client.get_run(run_id)  # raises if the id is unknown to this store
            self.run_id, self.experiment_id = run_id, run.info.experiment_id
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            tags = safe_tags(dict(extra_tags or {}))
            if resumed:
                tags["resume_count"] = str(int(run.data.tags.get("resume_count", "0")) + 1)
            self._set_tags(tags)
            return run_id
        tags = run_tags(cfg, extra_tags)
        if parent_run_id:
            # Children live in the parent's experiment: the UI only nests runs within one experiment.
            self.experiment_id = client.get_run(parent_run_id).info.experiment_id
            tags["mlflow.parentRunId"] = parent_run_id
        else:
            self.experiment_id = ensure_experiment(self.uri, experiment_name(cfg))
        run = client.create_run(self.experiment_id, run_name=cfg.tracking.run_name, tags=tags)
        self.run_id = run.info.run_id
        return self.run_id

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED, FAILED or KILLED; a second ``end`` (or one before ``start``) does nothing."""
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
        if self._started and self.enabled:
            if self._pending:
                self._down_until = 0.0  # one last try for what an outage kept back
                self._flush()
            if self._pending:
                log.warning("run %s: %d metric values could not be sent to MLflow", self.run_id, len(self._pending))
            self._down_until = 0.0
            # The driver closes the run too (pipeline.driver.close_run) if this fails.
            self.send("end run", self._client.set_terminated, self.run_id, status=status)
        self._started = False

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._started:
            return
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    @property
    def client(self):
        """The run's ``MlflowClient`` (bound to this tracker's URI, not the process-global one); None
        before :meth:`start` or when tracking is disabled."""
        return self._client

    def _active(self) -> bool:
        if not self._started:
            raise RuntimeError("Tracker.start() has not been called")
        return self.enabled

    # -- params / tags / metrics
    def send(self, what: str, fn, *args, **kwargs) -> bool:
        """Call the store; an outage is a warning, never an exception, and blocks the caller at most one
        bounded attempt per :data:`OUTAGE_BACKOFF_S` (training must not stall on tracking)."""
        now = time.monotonic()
        if now < self._down_until:
            return False
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any transport/store failure
            if self._down_until == 0.0 or now >= self._down_until:
                log.warning("MLflow %s failed (%s); training goes on, retrying in %.0f s",
                            what, strip_credentials(str(exc)).splitlines()[0][:200] if str(exc) else
                            type(exc).__name__, OUTAGE_BACKOFF_S)
            self._down_until = time.monotonic() + OUTAGE_BACKOFF_S
            return False
        if self._down_until:
            log.warning("MLflow reachable again; sending %d kept metric values", len(self._pending))
            self._down_until = 0.0
        return True

    def _set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), _BATCH_PARAMS):
            self.send("set tags", self._client.log_batch, self.run_id, tags=items[i:i + _BATCH_PARAMS])

    def log_params(self, cfg) -> None:
        """Log ``cfg.flat()`` redacted. On a resumed run, params already stored are not re-sent, and a
        changed value (MLflow forbids overwriting params) is kept as tag ``param_changed.<key>``."""
        if not self._active():
            return
        from mlflow.entities import Param

        flat = cfg.flat()
        # model.pretrained stays a param as well: where the trunk started is a hyper-parameter runs are compared on
        paths = {k: v for k, v in flat.items() if is_path_value(v) and k != "model.pretrained"}
        if paths:  # where things are differs between every run: keep it out of the compare view's diff
            self._set_tags(safe_tags({f"config.{k}": v for k, v in paths.items()}))
        params = safe_params({k: v for k, v in flat.items() if k not in paths})
        existing = self._client.get_run(self.run_id).data.params
        changed = {k: v for k, v in params.items() if k in existing and existing[k] != v}
        if changed:
            log.warning("run %s: config changed on resume for %s; logged as param_changed.* tags",
                        self.run_id, sorted(changed))
            self._set_tags({f"param_changed.{k}": truncate(v, MAX_TAG_VAL_LENGTH) for k, v in changed.items()})
        items = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), _BATCH_PARAMS):
            self.send("log params", self._client.log_batch, self.run_id, params=items[i:i + _BATCH_PARAMS])

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> dict[str, float]:
        """Log scalar metrics at ``step`` in one batch; non-finite values are skipped with a warning.

        Returns what was logged (as floats).
        """
        if not self._active():
            return {}
        logged = self._stage(metrics, step)
        self._flush()
        return logged

    def log_metric_rows(self, rows) -> None:
        """Log ``(metrics, step)`` rows in as few batches as the store takes (one round trip for a
        checkpoint's worth of held per-step and per-epoch metrics, not one per row)."""
        if not self._active():
            return
        for metrics, step in rows:
            self._stage(metrics, step)
        self._flush()

    def _stage(self, metrics: Mapping[str, Any], step: int) -> dict[str, float]:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        logged: dict[str, float] = {}
        for key, value in metrics.items():
            v = metric_value(key, value)
            if not math.isfinite(v):
                log.warning("run %s step %d: metric %s is %s, not logged", self.run_id, step, key, v)
                continue
            logged[str(key)] = v
        self._pending.extend(Metric(k, v, now, int(step)) for k, v in logged.items())
        return logged

    def _flush(self) -> None:
        if len(self._pending) > MAX_PENDING_METRICS:  # a very long outage: keep the newest
            del self._pending[:len(self._pending) - MAX_PENDING_METRICS]
        while self._pending:
            batch = self._pending[:_BATCH_METRICS]
            if not self.send("log metrics", self._client.log_batch, self.run_id, metrics=batch):
                break
            del self._pending[:len(batch)]

    # -- artifacts
    def log_artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        """Upload a local file or directory (directory contents go under ``artifact_path``)."""
        if not self._active():
            return
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(p)
        if p.is_dir():
            self.send("log artifacts", self._client.log_artifacts, self.run_id, str(p), artifact_path)
        else:
            self.send("log artifact", self._client.log_artifact, self.run_id, str(p), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self._active():
            self.send("log text", self._client.log_text, self.run_id, text, artifact_file)

    def log_config(self, cfg) -> None:
        """The merged config as ``config.yaml`` (credentials redacted; loads with ``load_config``)."""
        if self._active():
            self.log_text(yaml.safe_dump(redact(cfg.to_dict()), sort_keys=False), "config.yaml")

    def log_model(self, model, cfg, name: str = "model", registered_model: Optional[str] = None,
                  input_example: Any = None, metrics: Optional[Mapping[str, Any]] = None):
        """Log ``model`` into this run, loadable without this checkout; see :func:`pipeline.mlflow_model.log_model`."""
        if not self._active() or not cfg.tracking.log_model:
            return None
        from pipeline.mlflow_model import log_model  # imports sta_model/torch; and mlflow_model imports this module

        return log_model(self, model, cfg, name=name, registered_model=registered_model,
                         input_example=input_example, metrics=metrics)
