"""Driver-side run bookkeeping: what ``pipeline.train`` checks and records before and after Ray.

Everything here runs in the driver process (a shell, a Slurm batch step or a ``ray job submit``
entrypoint), never in a Ray worker, because only the driver sees the checkout (``.git``), the
user and the job's metadata, and only the driver outlives a rank that dies:

- :func:`provenance`: git commit / dirty flag / entry point / user, with the fallbacks a job without
  ``.git`` needs (``STA_GIT_COMMIT`` ... env vars, or the job's ``--metadata-json``);
- :func:`check_job_paths`: relative local paths under ``ray job submit`` are refused (they would
  resolve inside Ray's temporary ``_ray_pkg_<hash>`` working dir);
- :func:`preflight_tracking`: the MLflow store is reachable (short timeout) and created/migrated
  once, before any worker touches it;
- :func:`open_run` / :func:`close_run`: the MLflow run is created here, named after the run
  directory, and always closed (FINISHED / FAILED / KILLED) even when rank 0 died;
- :func:`cleanup_ckpt_tmp`: temporary checkpoint directories left by an interrupted run.
"""
from __future__ import annotations

import getpass
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

from pipeline import tracking_store
from pipeline.config import Config, ConfigError

REPO = Path(__file__).resolve().parent.parent
# Env vars a submit script sets when the uploaded working dir has no .git (cluster/slurm/sta-submit.sbatch).
PROVENANCE_ENV = {"commit": "STA_GIT_COMMIT", "dirty": "STA_GIT_DIRTY", "user": "STA_USER"}
PREFLIGHT_TIMEOUT_S = 5.0
CKPT_TMP_PREFIX = "sta-ckpt-"


# --------------------------------------------------------------------------- job / provenance

def job_info() -> dict[str, Any]:
    """``{"submission_id", "metadata"}`` of the Ray job this driver runs as (empty outside a job).

    The job supervisor hands the driver its config in ``RAY_JOB_CONFIG_JSON_ENV_VAR``.
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        meta = dict(json.loads(raw).get("metadata") or {})
    except (ValueError, AttributeError):
        meta = {}
    return {"submission_id": meta.get("job_submission_id"), "metadata": meta}


def _git(*args: str) -> Optional[str]:
    try:
        res = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def entry_point(argv0: Optional[str] = None) -> str:
    """``pipeline.train`` for ``python -m pipeline.train``, else the script's name."""
    argv0 = argv0 if argv0 is not None else (sys.argv[0] if sys.argv else "")
    p = Path(argv0)
    try:
        rel = p.resolve().relative_to(REPO)
        return ".".join(rel.with_suffix("").parts) if rel.suffix == ".py" else str(rel)
    except ValueError:
        return p.name or "python"


def provenance(entry: Optional[str] = None) -> dict[str, str]:
    """Commit, dirty flag, entry point and user of this run, as MLflow tags.

    Order of sources: the checkout's git (where the driver runs from one), then the job's
    metadata (``ray job submit --metadata-json '{"git_commit": ...}'``), then the env vars of
    :data:`PROVENANCE_ENV` that the submit scripts set, else ``unknown``.

    Args:
        entry: entry point name (default: from ``sys.argv[0]``).
    """
    meta = job_info().get("metadata", {})
    commit = _git("rev-parse", "HEAD")
    dirty = None
    if commit:
        dirty = str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower()
    commit = commit or meta.get("git_commit") or os.environ.get(PROVENANCE_ENV["commit"]) or "unknown"
    if dirty is None:
        dirty = str(meta.get("git_dirty") or os.environ.get(PROVENANCE_ENV["dirty"]) or "unknown").lower()
    try:
        local_user = getpass.getuser()
    except (KeyError, OSError):
        local_user = ""
    # Under a job the driver runs as the Ray node's user; the submitter is who ran the submit script.
    user = meta.get("user") or os.environ.get(PROVENANCE_ENV["user"]) or local_user or "unknown"
    return {
        "mlflow.source.git.commit": commit,
        "git.dirty": dirty,
        "mlflow.source.name": entry or entry_point(),
        "mlflow.source.type": "JOB" if job_info() else "LOCAL",
        "mlflow.user": user,
    }


# --------------------------------------------------------------------------- relative paths

def in_job_package(cwd: Optional[str] = None) -> bool:
    """True when the cwd is a ``ray job submit --working-dir`` package (``.../_ray_pkg_<hash>``)."""
    cwd = cwd or os.getcwd()
    return "_ray_pkg_" in cwd or "/runtime_resources/working_dir_files/" in cwd


def _relative_local(url: Optional[str]) -> bool:
    return bool(url) and "://" not in url and not os.path.isabs(url)


def check_job_paths(cfg: Config, cwd: Optional[str] = None) -> None:
    """Under ``ray job submit`` a relative output path would land inside Ray's temporary working-dir
    package, which later jobs reuse and Ray deletes: refuse it, naming the key.

    Raises:
        ConfigError: for the first relative ``data.*``, ``checkpoint.storage_path``,
            ``model.pretrained`` or (default) sqlite ``tracking.uri``.
    """
    if not in_job_package(cwd):
        return
    keys = {"data.shards": cfg.data.shards, "checkpoint.storage_path": cfg.checkpoint.storage_path,
            "model.pretrained": cfg.model.pretrained, "data.cache_dir": cfg.data.cache_dir or None}
    if cfg.data.dataset == "synthetic" and cfg.data.prepare:
        keys["data.root"] = cfg.data.root
    for key, value in keys.items():
        if _relative_local(value):
            raise ConfigError(f"{key}={value} is a relative path, and under `ray job submit` it would resolve "
                              f"inside Ray's temporary package {cwd or os.getcwd()}; give an absolute path on "
                              f"storage every node sees, or an s3:// URL")
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if cfg.tracking.enabled and (not uri or (uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"))
                                 or _relative_local(uri)):
        raise ConfigError(f"tracking.uri={uri or '(default ./mlflow.db)'} would resolve inside Ray's temporary "
                          f"package under `ray job submit`; set tracking.uri (or MLFLOW_TRACKING_URI in the "
                          f"job's env_vars) to an MLflow server or sqlite://// with an absolute path")


# --------------------------------------------------------------------------- MLflow store

def _http_probe(uri: str, timeout: float) -> None:
    """One GET of the server's ``/health`` (any HTTP answer means a server is there)."""
    url = uri.rstrip("/") + "/health"
    try:
        urllib.request.urlopen(url, timeout=timeout).close()  # noqa: S310 - http(s) only, checked by caller
    except urllib.error.HTTPError:
        return  # it answered: auth / proxy paths are MLflow's business from here on
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(f"tracking.uri={_redacted(uri)}: MLflow server unreachable ({reason}); start it, "
                          f"or set tracking.uri to a reachable server or a sqlite://// file") from None


def _redacted(uri: str) -> str:
    from pipeline.redact import strip_credentials  # imports mlflow (~2.4 s); pipeline.train imports this module

    return strip_credentials(uri)


def preflight_tracking(cfg: Config, timeout: float = PREFLIGHT_TIMEOUT_S) -> Optional[str]:
    """Check the MLflow store before Ray starts and create/migrate it once, here.

    A server gets a short ``/health`` probe, then the experiment is created (MLflow's HTTP retries
    bounded by :func:`pipeline.tracking_store.bound_http_retries`); a sqlite file is created or migrated
    by this one process, so workers never race on a half-migrated database.

    Args:
        cfg: the run's config (``tracking.uri`` is resolved in place to an absolute URI).
        timeout: seconds for the reachability probe.

    Returns:
        The experiment id, or None when tracking is disabled.

    Raises:
        ConfigError: one line naming ``tracking.uri`` when the store cannot be reached or opened.
    """
    if not cfg.tracking.enabled:
        return None
    tracking_store.bound_http_retries()
    uri = cfg.tracking.uri = tracking_store.resolve_tracking_uri(cfg.tracking.uri)
    if uri.startswith(("http://", "https://")):
        _http_probe(uri, timeout)
    try:
        return tracking_store.ensure_experiment(uri, tracking_store.experiment_name(cfg))
    except Exception as exc:  # noqa: BLE001 - any store failure is one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"tracking.uri={_redacted(uri)}: cannot open the MLflow store ({_redacted(first)[:300]})") from None


def open_run(cfg: Config, *, run_name: str, run_dir: str, experiment_id: str,
             extra_tags: Optional[dict[str, Any]] = None) -> str:
    """The MLflow run of ``run_dir``: the existing one (a ``--resume`` of the same directory) or a new
    one named ``run_name``, tagged with provenance, the run directory and the Ray job.

    Args:
        cfg: the run's config (``tracking.uri`` already resolved).
        run_name: MLflow run name (the run directory's name).
        run_dir: URL of the run directory (tag ``sta.run_dir``; identifies the run on resume).
        experiment_id: from :func:`preflight_tracking`.
        extra_tags: more tags (redacted like all tags).
    """
    from mlflow import MlflowClient

    from pipeline import redact, tracking  # imports mlflow (~2.4 s); pipeline.train imports this module at start

    client = MlflowClient(cfg.tracking.uri)
    tags = {**provenance(), **tracking.run_tags(cfg, extra_tags), "sta.run_dir": run_dir}
    tags.update(provenance())  # the driver's view wins over run_tags' cwd-based git lookup
    job = job_info()
    if job.get("submission_id"):
        tags["ray.job_submission_id"] = job["submission_id"]
    found = client.search_runs([experiment_id], filter_string=f"tags.`sta.run_dir` = '{_quote(run_dir)}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "resume_count", str(int(found[0].data.tags.get("resume_count", "0")) + 1))
        return run_id
    run_id = client.create_run(experiment_id, run_name=run_name, tags=redact.safe_tags(tags)).info.run_id
    # Params and config now, so a run that fails before any worker starts still says what it was.
    tracker = tracking.Tracker(cfg)
    tracker.start(cfg, run_id=run_id, resumed=False)
    tracker.log_params(cfg)
    tracker.log_config(cfg)
    return run_id


def _quote(s: str) -> str:
    return s.replace("\\", "\\\\").replace("'", "\\'")


def set_run_tags(cfg: Config, run_id: str, tags: dict[str, Any]) -> None:
    """Add tags to a run from the driver; a tracking outage only warns."""
    from mlflow import MlflowClient

    from pipeline import redact  # imports mlflow (~2.4 s); pipeline.train imports this module at start

    try:
        client = MlflowClient(cfg.tracking.uri)
        for k, v in redact.safe_tags(tags).items():
            client.set_tag(run_id, k, v)
    except Exception as exc:  # noqa: BLE001 - tags must never fail a finished run
        print(f"warning: could not tag MLflow run {run_id}: {_redacted(str(exc))[:200]}", file=sys.stderr)


def close_run(cfg: Config, run_id: Optional[str], status: str) -> Optional[str]:
    """End ``run_id`` with ``status`` unless rank 0 already ended it; returns the final status.

    Called after ``trainer.fit()`` whatever happened, so a run whose rank 0 died, or whose driver
    was interrupted, never stays RUNNING.
    """
    if not run_id or not cfg.tracking.enabled:
        return None
    from mlflow import MlflowClient

    try:
        client = MlflowClient(cfg.tracking.uri)
        current = client.get_run(run_id).info.status
        if current == "RUNNING":
            client.set_terminated(run_id, status=status)
            return status
        return current
    except Exception as exc:  # noqa: BLE001 - the store may be the thing that failed
        print(f"warning: could not close MLflow run {run_id} as {status}: {_redacted(str(exc))[:200]}",
              file=sys.stderr)
        return None


# --------------------------------------------------------------------------- temp dirs

def ckpt_tmp_prefix(run_name: str, rank: int) -> str:
    """Prefix of one rank's temporary checkpoint dirs (``/tmp/sta-ckpt-<run>.r<rank>.e0001-*``).

    The run name in it lets the driver and a restarted rank remove exactly this run's leftovers,
    never those of another run on the same node (the name part holds no dots, so ``.r`` is unambiguous).
    """
    return f"{CKPT_TMP_PREFIX}{_safe_name(run_name)}.r{rank}."


def _safe_name(run_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]+", "_", run_name)[:80]


def cleanup_ckpt_tmp(run_name: str, rank: Optional[int] = None, older_than_s: float = 0.0) -> int:
    """Remove this run's temporary checkpoint dirs on this node (all ranks, or one); returns the count.

    Args:
        run_name: the run's name (as given to :func:`ckpt_tmp_prefix`).
        rank: only this rank's dirs (a restarted worker); None for every rank (the driver at exit).
        older_than_s: keep dirs modified more recently than this (an upload may still read them).
    """
    rank_re = str(rank) if rank is not None else r"\d+"
    mine = re.compile(re.escape(CKPT_TMP_PREFIX + _safe_name(run_name)) + rf"\.r{rank_re}\.")
    n = 0
    now = time.time()
    for d in glob.glob(os.path.join(tempfile.gettempdir(), CKPT_TMP_PREFIX + "*")):
        try:
            if mine.match(os.path.basename(d)) and os.path.isdir(d) and now - os.path.getmtime(d) >= older_than_s:
                shutil.rmtree(d, ignore_errors=True)
                n += 1
        except OSError:
            pass
    return n
