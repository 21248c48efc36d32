"""Where MLflow runs live: the tracking URI every process resolves alike, the experiment (created once,
race-safe), and MLflow's HTTP retries bounded so a dead server cannot stall training.

The run handle that logs into the store is :class:`pipeline.tracking.Tracker`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional


def resolve_tracking_uri(uri: Optional[str]) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<abs cwd>/mlflow.db``.

    Relative sqlite paths and plain paths are made absolute, because Ray workers run with another
    working directory and must log into the same store as the driver.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and uri != "sqlite:///:memory:":
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri and not uri.startswith("databricks"):
        return str(Path(uri).resolve())
    return uri


def experiment_name(cfg) -> str:
    """``cfg.tracking.experiment`` or ``sta-<dataset>``."""
    return cfg.tracking.experiment or f"sta-{cfg.data.dataset}"


def _artifact_location(uri: str, name: str) -> Optional[str]:
    """Artifacts of a sqlite store live beside the db file, not in whichever cwd created the experiment."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None  # servers / other stores pick their own artifact root
    db = Path(uri[len("sqlite:///"):])
    safe = re.sub(r"[^A-Za-z0-9_.\-]+", "_", name)
    return (db.parent / "mlartifacts" / safe).as_uri()


def ensure_experiment(uri: str, name: str) -> str:
    """Id of experiment ``name``, created if missing (a concurrent create by another worker is fine)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(uri, name))
    except MlflowException as exc:
        # Lost a race with another process: the experiment now exists, read it back.
        exp = client.get_experiment_by_name(name)
        if exp is None or ("RESOURCE_ALREADY_EXISTS" not in str(exc.error_code)
                           and "already exists" not in str(exc).lower()):
            raise
        return exp.experiment_id


# MLflow's HTTP client retries 7 times with backoff 2 and a 120 s timeout (~4 min per call against a
# dead server, and Ray repeats the worker 3 times): training caps that; a user's explicit setting wins.
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def bound_http_retries() -> dict[str, str]:
    """Cap MLflow's HTTP retries/timeout in this process (unless set); returns the values in force."""
    for key, value in HTTP_BOUNDS.items():
        os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in HTTP_BOUNDS}
