"""pipeline.tracking_store: the tracking URI every process resolves alike, and the experiment created once."""
from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline import tracking_store
from pipeline.config import Config


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating the schema takes seconds); tests use own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_store.resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_store.resolve_tracking_uri("sqlite:///rel/x.db") == f"sqlite:///{tmp_path.resolve()}/rel/x.db"
    assert tracking_store.resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking_store.resolve_tracking_uri(None) == "http://tracking:5000"
    assert tracking_store.resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"


def test_experiment_name():
    cfg = Config()
    assert tracking_store.experiment_name(cfg) == "sta-synthetic"
    cfg.tracking.experiment = "mine"
    assert tracking_store.experiment_name(cfg) == "mine"


@pytest.mark.parametrize("attempt", range(3))  # a few rounds: the losing create must hit the race path
def test_ensure_experiment_idempotent_and_race_safe(store, attempt):
    name = f"race-{uuid.uuid4().hex[:8]}"
    ids, errors = [], []
    barrier = threading.Barrier(4)

    def create():
        barrier.wait()
        try:
            ids.append(tracking_store.ensure_experiment(store, name))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(ids)) == 1 and len(ids) == 4
    assert tracking_store.ensure_experiment(store, name) == ids[0]
    exp = MlflowClient(store).get_experiment(ids[0])
    assert exp.name == name
    # Artifacts sit beside the sqlite file, not in the cwd of whoever created the experiment.
    assert exp.artifact_location.startswith(Path(store[len("sqlite:///"):]).parent.as_uri())
