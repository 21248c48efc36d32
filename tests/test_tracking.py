"""pipeline.tracking against real MLflow stores: a sqlite file, and (slow) a real `mlflow server`."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.config import Config, load_config
from pipeline.tracking import Tracker
from pipeline.train import free_port

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
ACCESS = "AKIAIOSFODNN7EXAMPLE"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating the schema takes seconds); tests use own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def make_cfg(uri, **tracking_kw):
    cfg = Config()
    cfg.tracking.uri = uri
    cfg.tracking.experiment = f"exp-{uuid.uuid4().hex[:8]}"
    for k, v in tracking_kw.items():
        setattr(cfg.tracking, k, v)
    return cfg


def load_run_metrics(uri, run_id):
    """Every metric of a run as ``name -> [(step, value), ...]``, sorted by step then time."""
    client = MlflowClient(uri)
    return {key: [(int(m.step), float(m.value)) for m in
                  sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]
            for key in client.get_run(run_id).data.metrics}


def all_stored_text(client, run_id):
    run = client.get_run(run_id)
    return " ".join(f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items())


# --------------------------------------------------------------------------- pure helpers

def test_run_tags(tmp_path, monkeypatch):
    cfg = Config()
    cfg.data.shards = f"s3://{ACCESS}:{SECRET}@bucket/shards"
    cfg.tracking.tags = {"team": "reid"}
    monkeypatch.setenv("RAY_JOB_ID", "03000000")
    tags = tracking.run_tags(cfg, {"trial": "t1"})
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()
        assert tags["git.dirty"] in ("true", "false")
    assert tags["data.shards"] == "s3://bucket/shards"
    assert tags["dataset"] == "synthetic" and tags["team"] == "reid" and tags["trial"] == "t1"
    assert tags["ray.job_id"] == "03000000" and tags["host"]
    monkeypatch.chdir(tmp_path)  # not a git checkout
    monkeypatch.delenv("RAY_JOB_ID")
    tags = tracking.run_tags(cfg)
    assert tags["mlflow.source.git.commit"] == "unknown" and "ray.job_id" not in tags


# --------------------------------------------------------------------------- sqlite store

def test_run_lifecycle_params_metrics_and_redaction(store, caplog):
    cfg = make_cfg(store, run_name="lifecycle", tags={"aws_secret_access_key": SECRET, "owner": "ci"})
    cfg.data.shards = f"s3://{ACCESS}:{SECRET}@bucket/shards"
    t = Tracker()
    run_id = t.start(cfg, extra_tags={"stage": "train"})
    t.log_params(cfg)
    t.log_metrics({"loss/total": torch.tensor(2.5), "loss/ce": np.float32(1.25), "lr": 3e-4}, step=0)
    with caplog.at_level("WARNING", logger="pipeline.tracking"):
        logged = t.log_metrics({"loss/total": 1.5, "loss/ce": float("nan"), "eval/mAP": np.array(0.4)}, step=1)
    assert "loss/ce is nan" in caplog.text
    assert logged == {"loss/total": 1.5, "eval/mAP": pytest.approx(0.4)}
    t.end()

    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "lifecycle"
    assert client.get_experiment(run.info.experiment_id).name == cfg.tracking.experiment
    params = run.data.params
    assert params["optim.lr"] == "0.0003" and params["data.dataset"] == "synthetic"
    assert params["model.fusion"] == '["max", "avg"]'
    # Paths and URLs are tags, not params: they differ in every run and would lead the compare view's diff.
    assert "data.shards" not in params and run.data.tags["config.data.shards"] == "s3://bucket/shards"
    paths = {k for k, v in cfg.flat().items() if tracking.is_path_value(v)}
    assert paths >= {"data.shards"} and set(params) == set(cfg.flat()) - paths
    assert run.data.tags["stage"] == "train" and run.data.tags["owner"] == "ci"
    assert run.data.tags["aws_secret_access_key"] == "***"
    stored = all_stored_text(client, run_id)
    assert SECRET not in stored and ACCESS not in stored

    metrics = load_run_metrics(store, run_id)
    assert metrics["loss/total"] == [(0, 2.5), (1, 1.5)]
    assert metrics["loss/ce"] == [(0, 1.25)]  # the NaN at step 1 was skipped
    assert metrics["eval/mAP"] == [(1, pytest.approx(0.4))]
    assert metrics["lr"] == [(0, pytest.approx(3e-4))]


def test_log_metrics_rejects_non_scalars(store):
    t = Tracker()
    t.start(make_cfg(store))
    with pytest.raises(ValueError):
        t.log_metrics({"v": torch.ones(3)}, step=0)
    with pytest.raises(TypeError):
        t.log_metrics({"v": "high"}, step=0)
    t.end("KILLED")
    assert MlflowClient(store).get_run(t.run_id).info.status == "KILLED"
    with pytest.raises(ValueError):
        t.end("DONE")


def test_nested_child_run(store):
    cfg = make_cfg(store, run_name="sweep")
    parent = Tracker()
    parent_id = parent.start(cfg)
    child_cfg = make_cfg(store, run_name="trial-0")  # another experiment name: child still nests
    child = Tracker()
    child_id = child.start(child_cfg, parent_run_id=parent_id, extra_tags={"trial": "0"})
    child.log_metrics({"mAP": 0.5}, step=1)
    child.end()
    parent.log_metrics({"best/mAP": 0.5}, step=1)
    parent.end()

    client = MlflowClient(store)
    c, p = client.get_run(child_id), client.get_run(parent_id)
    assert c.data.tags["mlflow.parentRunId"] == parent_id
    assert c.info.experiment_id == p.info.experiment_id
    assert "mlflow.parentRunId" not in p.data.tags
    # The two trackers logged into their own runs only.
    assert set(load_run_metrics(store, child_id)) == {"mAP"}
    assert set(load_run_metrics(store, parent_id)) == {"best/mAP"}


def test_resume_continues_same_run(store):
    cfg = make_cfg(store)
    first = Tracker()
    run_id = first.start(cfg)
    first.log_params(cfg)
    first.log_metrics({"loss": 3.0}, step=0)
    first.log_metrics({"loss": 2.0}, step=1)
    first.end("FAILED")  # the worker died; Ray Train restores from the checkpoint holding run_id

    cfg.optim.epochs = 700  # changed on restore: MLflow forbids overwriting a param
    again = Tracker()
    assert again.start(cfg, run_id=run_id) == run_id
    client = MlflowClient(store)
    assert client.get_run(run_id).info.status == "RUNNING"
    again.log_params(cfg)
    again.log_metrics({"loss": 1.0}, step=2)
    again.end()

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resume_count"] == "1"
    assert run.data.params["optim.epochs"] == "600"
    assert run.data.tags["param_changed.optim.epochs"] == "700"
    assert load_run_metrics(store, run_id)["loss"] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_resume_unknown_run_fails(store):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        Tracker().start(make_cfg(store), run_id=uuid.uuid4().hex)


def test_log_config_round_trip(store, tmp_path):
    cfg = load_config(overrides=["optim.lr=1e-4", "data.clip_len=6", "model.trunk=tiny",
                                 f"data.shards=s3://{ACCESS}:{SECRET}@bucket/s", "tracking.tags={team: reid}"])
    cfg.tracking.uri = store
    t = Tracker()
    run_id = t.start(cfg)
    t.log_config(cfg)
    t.end()
    path = MlflowClient(store).download_artifacts(run_id, "config.yaml", str(tmp_path))
    text = Path(path).read_text()
    assert SECRET not in text and ACCESS not in text
    back = load_config(path)
    assert back.optim.lr == 1e-4 and back.data.clip_len == 6 and back.model.trunk == "tiny"
    assert back.data.shards == "s3://bucket/s" and back.tracking.tags == {"team": "reid"}
    expected = cfg.to_dict()
    expected["data"]["shards"] = "s3://bucket/s"
    assert back.to_dict() == expected


def test_artifacts(store, tmp_path):
    t = Tracker()
    run_id = t.start(make_cfg(store))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("A")
    (tmp_path / "b.json").write_text("{}")
    t.log_artifact(tmp_path / "d", "dir")
    t.log_artifact(tmp_path / "b.json")
    t.log_text("hello", "notes/readme.txt")
    with pytest.raises(FileNotFoundError):
        t.log_artifact(tmp_path / "missing.txt")
    t.end()

    client = MlflowClient(store)
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"dir", "b.json", "notes"} <= names
    assert Path(client.download_artifacts(run_id, "dir/a.txt", str(tmp_path / "dl"))).read_text() == "A"
    assert Path(client.download_artifacts(run_id, "notes/readme.txt", str(tmp_path / "dl"))).read_text() == "hello"


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 3)
        self.bn = torch.nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_log_model_and_load_back(store):
    import mlflow
    import mlflow.pytorch

    torch.manual_seed(0)
    net = TinyNet().eval()
    net.bn.running_mean.fill_(0.3)  # buffers travel too
    cfg = make_cfg(store, registered_model=f"sta-tiny-{uuid.uuid4().hex[:6]}")
    t = Tracker()
    run_id = t.start(cfg)
    uri_before = os.environ.get("MLFLOW_TRACKING_URI")
    info = t.log_model(net, cfg, input_example=np.random.rand(5, 6).astype(np.float32),
                       metrics={"eval/mAP": 0.5})
    t.end()
    assert os.environ.get("MLFLOW_TRACKING_URI") == uri_before  # global state restored

    client = MlflowClient(store)
    assert str(info.registered_model_version) == "1"
    versions = client.search_model_versions(f"name='{cfg.tracking.registered_model}'")
    assert len(versions) == 1 and versions[0].run_id == run_id
    assert client.get_logged_model(info.model_id).experiment_id == client.get_run(run_id).info.experiment_id

    mlflow.set_tracking_uri(store)  # `models:/` URIs resolve through the global store
    try:
        loaded = mlflow.pytorch.load_model(info.model_uri)
        loaded_registered = mlflow.pytorch.load_model(f"models:/{cfg.tracking.registered_model}/1")
    finally:
        mlflow.set_tracking_uri(None)
        if uri_before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = uri_before
    x = torch.randn(5, 6)
    with torch.no_grad():
        expected = net(x)
        torch.testing.assert_close(loaded.eval()(x), expected)
        torch.testing.assert_close(loaded_registered.eval()(x), expected)


def test_log_model_into_two_stores_at_once_leaves_the_global_uri_alone(store, tmp_path):
    """Two trackers on different stores log models from two threads of one process (Tune trials):
    each model, its files and its registered version land in its own store only, and MLflow's
    process-global tracking URI is never touched."""
    import mlflow
    from mlflow.exceptions import MlflowException

    global_before = mlflow.get_tracking_uri()
    stores = [store, f"sqlite:///{tmp_path / 'other.db'}"]
    cfgs = [make_cfg(s, registered_model=f"sta-two-{uuid.uuid4().hex[:6]}") for s in stores]
    trackers = [Tracker() for _ in stores]
    for t, cfg in zip(trackers, cfgs):
        t.start(cfg)
    infos, errors = [None, None], []
    barrier = threading.Barrier(2)

    def log(i):
        barrier.wait()
        try:
            torch.manual_seed(i)
            infos[i] = trackers[i].log_model(TinyNet().eval(), cfgs[i], input_example=np.ones((2, 6), np.float32))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=log, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for t in trackers:
        t.end()
    assert not errors and all(infos)
    assert mlflow.get_tracking_uri() == global_before
    for i, (s, cfg, t, info) in enumerate(zip(stores, cfgs, trackers, infos)):
        client, other = MlflowClient(s), MlflowClient(stores[1 - i])
        logged = client.get_logged_model(info.model_id)
        assert logged.source_run_id == t.run_id and logged.status.to_int() == 2  # READY
        assert logged.experiment_id == client.get_run(t.run_id).info.experiment_id
        assert [o.model_id for o in client.get_run(t.run_id).outputs.model_outputs] == [info.model_id]
        files = Path(logged.artifact_location[len("file://"):])
        assert (files / "MLmodel").is_file() and (files / "code" / "sta_model" / "model.py").is_file()
        assert list(files.glob("*input_example*")) and "torch==" in (files / "requirements.txt").read_text()
        assert not list(files.rglob("__pycache__"))
        assert str(info.registered_model_version) == "1"
        versions = client.search_model_versions(f"name='{cfg.tracking.registered_model}'")
        assert [(str(v.version), v.run_id, v.source) for v in versions] == [("1", t.run_id, logged.artifact_location)]
        with pytest.raises(MlflowException):
            other.get_logged_model(info.model_id)
        assert other.search_model_versions(f"name='{cfg.tracking.registered_model}'") == []


def test_log_model_respects_config_switch(store):
    cfg = make_cfg(store, log_model=False)
    t = Tracker()
    run_id = t.start(cfg)
    assert t.log_model(TinyNet(), cfg) is None
    t.end()
    assert MlflowClient(store).list_artifacts(run_id) == []


def test_disabled_tracking_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = Config()
    cfg.tracking.enabled = False
    with Tracker() as t:
        assert t.start(cfg) is None and t.run_id is None
        t.log_params(cfg)
        assert t.log_metrics({"loss": 1.0}, step=0) == {}
        t.log_text("x", "x.txt")
        t.log_config(cfg)
        assert t.log_model(TinyNet(), cfg) is None
    t.end()
    assert list(tmp_path.iterdir()) == []


def test_unstarted_tracker_raises():
    with pytest.raises(RuntimeError):
        Tracker().log_metrics({"a": 1.0}, step=0)
    with pytest.raises(ValueError):
        Tracker().start()


def test_config_given_to_constructor(store):
    cfg = make_cfg(store)
    t = Tracker(cfg)
    run_id = t.start(run_id=None)
    with pytest.raises(RuntimeError):
        t.start()  # one run per handle at a time
    t.end()
    assert MlflowClient(store).get_run(run_id).info.experiment_id == tracking.ensure_experiment(
        store, cfg.tracking.experiment)


def test_context_manager_marks_failure(store):
    cfg = make_cfg(store)
    with pytest.raises(ZeroDivisionError):
        with Tracker(cfg) as t:
            run_id = t.start()
            1 / 0
    assert MlflowClient(store).get_run(run_id).info.status == "FAILED"


# --------------------------------------------------------------------------- real server

@pytest.mark.slow
def test_against_mlflow_server(tmp_path):
    port = free_port()
    artifacts = tmp_path / "artifacts"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(artifacts)]
    log_file = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not come up:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)

        cfg = make_cfg(uri, run_name="server", tags={"db_password": SECRET})
        parent = Tracker()
        parent_id = parent.start(cfg)
        child = Tracker()
        child_id = child.start(cfg, parent_run_id=parent_id)
        child.log_params(cfg)
        for step in range(3):
            child.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        child.log_config(cfg)
        child.end()
        parent.end()

        assert load_run_metrics(uri, child_id)["loss"] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
        client = MlflowClient(uri)
        assert client.get_run(child_id).data.tags["mlflow.parentRunId"] == parent_id
        assert SECRET not in all_stored_text(client, child_id)
        # Artifacts went through the server's proxy into --artifacts-destination.
        stored = list(artifacts.rglob("config.yaml"))
        assert len(stored) == 1 and SECRET not in stored[0].read_text()
        assert load_config(stored[0]).tracking.run_name == "server"
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log_file.close()
