"""pipeline.driver / pipeline.console and the driver-side checks of pipeline.train (no Ray needed):
provenance fallbacks, relative paths under a job, the MLflow preflight (closed port -> one line, exit 2),
run naming/closing, temp checkpoint cleanup, metric groups, and the epoch line."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline import console, driver, tracking
from pipeline.config import Config, ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_job(monkeypatch):
    for k in ("RAY_JOB_CONFIG_JSON_ENV_VAR", *driver.PROVENANCE_ENV.values()):
        monkeypatch.delenv(k, raising=False)


def test_provenance_in_the_checkout(no_job):
    tags = driver.provenance(entry="pipeline.train")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # computed from the repo, not from the cwd
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()
        assert tags["git.dirty"] in ("true", "false")
    assert tags["mlflow.source.name"] == "pipeline.train" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"]


def test_provenance_without_git_uses_job_metadata_then_env(no_job, monkeypatch):
    monkeypatch.setattr(driver, "_git", lambda *a: None)  # a job's upload has no .git
    assert driver.provenance()["mlflow.source.git.commit"] == "unknown"
    monkeypatch.setenv("STA_GIT_COMMIT", "c0ffee")
    monkeypatch.setenv("STA_GIT_DIRTY", "True")
    monkeypatch.setenv("STA_USER", "alice")
    tags = driver.provenance()
    assert tags["mlflow.source.git.commit"] == "c0ffee" and tags["git.dirty"] == "true"
    assert tags["mlflow.user"] == "alice"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_1", "git_commit": "beef", "user": "bob"}}))
    tags = driver.provenance()
    assert tags["mlflow.source.git.commit"] == "beef" and tags["mlflow.user"] == "bob"
    assert tags["mlflow.source.type"] == "JOB" and driver.job_info()["submission_id"] == "raysubmit_1"


def test_entry_point_names():
    assert driver.entry_point(str(ROOT / "pipeline" / "train.py")) == "pipeline.train"
    assert driver.entry_point("/usr/bin/foo") == "foo"


def test_relative_paths_refused_only_inside_a_job_package(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = Config()
    cfg.data.shards, cfg.checkpoint.storage_path = "data/shards", "runs"
    driver.check_job_paths(cfg, cwd="/home/me/sta")  # a normal checkout: fine
    pkg = "/tmp/ray/session_x/runtime_resources/working_dir_files/_ray_pkg_0123abcd"
    with pytest.raises(ConfigError, match=r"^data.shards=data/shards is a relative path.*s3://"):
        driver.check_job_paths(cfg, cwd=pkg)
    cfg.data.shards = "s3://b/shards"
    with pytest.raises(ConfigError, match=r"^checkpoint.storage_path=runs"):
        driver.check_job_paths(cfg, cwd=pkg)
    cfg.checkpoint.storage_path = "/shared/runs"
    cfg.data.root = "/shared/raw"
    with pytest.raises(ConfigError, match=r"^tracking.uri=\(default ./mlflow.db\)"):
        driver.check_job_paths(cfg, cwd=pkg)
    cfg.tracking.uri = "sqlite:///rel.db"
    with pytest.raises(ConfigError, match=r"^tracking.uri=sqlite:///rel.db"):
        driver.check_job_paths(cfg, cwd=pkg)
    cfg.tracking.uri = "sqlite:////shared/m.db"
    driver.check_job_paths(cfg, cwd=pkg)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    cfg.tracking.uri = None
    driver.check_job_paths(cfg, cwd=pkg)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket goes


def test_preflight_closed_port_is_one_line_fast():
    cfg = Config()
    cfg.tracking.uri = f"http://127.0.0.1:{_closed_port()}"
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=r"^tracking.uri=http://127.0.0.1:\d+: MLflow server unreachable"):
        driver.preflight_tracking(cfg)
    assert time.perf_counter() - t < 10


def test_preflight_creates_the_store_once(tmp_path):
    cfg = Config()
    cfg.tracking.uri = f"sqlite:///{tmp_path}/m.db"
    cfg.tracking.experiment = "pre"
    exp = driver.preflight_tracking(cfg)
    assert (tmp_path / "m.db").exists() and MlflowClient(cfg.tracking.uri).get_experiment(exp).name == "pre"
    assert driver.preflight_tracking(cfg) == exp
    cfg.tracking.enabled = False
    assert driver.preflight_tracking(cfg) is None


def test_train_cli_closed_mlflow_port_exits_2_before_ray(tmp_path):
    """`pipeline.train tracking.uri=http://127.0.0.1:<closed>`: one line naming tracking.uri, exit 2, no Ray."""
    port = _closed_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "RAY_ADDRESS"))}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
                        f"data.root={tmp_path}/raw", f"data.shards={tmp_path}/shards",
                        f"checkpoint.storage_path={tmp_path}/runs", f"tracking.uri=http://127.0.0.1:{port}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - t
    assert r.returncode == 2, r.stdout + r.stderr
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert err == [f"config error: tracking.uri=http://127.0.0.1:{port}: MLflow server unreachable "
                   f"([Errno 111] Connection refused); start it, or set tracking.uri to a reachable server "
                   f"or a sqlite://// file"], r.stderr
    assert "Started a local Ray" not in r.stdout + r.stderr
    assert took < 120


def test_open_run_names_tags_and_reuses_by_run_dir(tmp_path, no_job):
    cfg = Config()
    cfg.tracking.uri = f"sqlite:///{tmp_path}/m.db"
    cfg.tracking.experiment = "open"
    exp = driver.preflight_tracking(cfg)
    run_id = driver.open_run(cfg, run_name="sta-x-1", run_dir="s3://b/runs/sta-x-1", experiment_id=exp)
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "sta-x-1" and run.data.tags["sta.run_dir"] == "s3://b/runs/sta-x-1"
    for key in ("mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit"):
        assert run.data.tags[key]
    assert driver.close_run(cfg, run_id, "FAILED") == "FAILED"
    assert driver.close_run(cfg, run_id, "KILLED") == "FAILED"  # an ended run keeps its status
    again = driver.open_run(cfg, run_name="sta-x-1", run_dir="s3://b/runs/sta-x-1", experiment_id=exp)
    assert again == run_id and client.get_run(run_id).info.status == "RUNNING"  # --resume of the same dir
    other = driver.open_run(cfg, run_name="sta-x-2", run_dir="s3://b/runs/sta-x-2", experiment_id=exp)
    assert other != run_id


def test_cleanup_ckpt_tmp_only_this_runs_dirs():
    tag = uuid.uuid4().hex[:6]
    mine = [tempfile.mkdtemp(prefix=driver.ckpt_tmp_prefix(f"run-{tag}", r) + "e0001-") for r in (0, 1)]
    other = tempfile.mkdtemp(prefix=driver.ckpt_tmp_prefix(f"run-{tag}-r0-x", 0) + "e0001-")
    longer = tempfile.mkdtemp(prefix=driver.ckpt_tmp_prefix(f"run-{tag}2", 0) + "e0001-")
    try:
        assert driver.cleanup_ckpt_tmp(f"run-{tag}", rank=1) == 1
        assert os.path.isdir(mine[0]) and not os.path.exists(mine[1])
        assert driver.cleanup_ckpt_tmp(f"run-{tag}") == 1
        assert not os.path.exists(mine[0]) and os.path.isdir(other) and os.path.isdir(longer)
    finally:
        for d in (other, longer):
            os.rmdir(d)


def test_metric_groups():
    m = {"loss_total": 1.0, "loss_ce": 0.5, "lr": 1e-3, "reg_share": 0.1, "skipped_samples": 0,
         "clips_per_s": 10.0, "data_wait_s": 0.1, "epoch_time_s": 2.0, "frames_per_s": 40.0,
         "mAP": 0.4, "rank1": 0.5, "rr_mAP": 0.45, "epoch": 3, "global_step": 30, "batches": 10,
         "num_nodes": 1, "mlflow_run_id": "abc", "step/loss_total": 1.0, "flag": True}
    g = tracking.grouped_metrics(m)
    assert g == {"train/loss_total": 1.0, "train/loss_ce": 0.5, "train/lr": 1e-3, "train/reg_share": 0.1,
                 "train/skipped_samples": 0, "system/clips_per_s": 10.0, "system/data_wait_s": 0.1,
                 "system/epoch_time_s": 2.0, "system/frames_per_s": 40.0, "eval/mAP": 0.4, "eval/rank1": 0.5,
                 "eval/rr_mAP": 0.45, "step/loss_total": 1.0}


def test_epoch_line_and_printer():
    m = {"loss_total": 1.2345, "loss_triplet": 0.3, "loss_ce": 0.9, "loss_reg": 0.01, "lr": 3e-4,
         "clips_per_s": 412.3, "data_wait_s": 1.0, "epoch_time_s": 50.0}
    line = console.epoch_line(3, 600, m, 3725)
    assert line == "epoch 3/600  loss 1.234 (tri 0.3 ce 0.9 reg 0.01)  lr 3.0e-04  412.3 clips/s  data wait 2%  ETA 1h02m"
    line = console.epoch_line(4, 4, {**m, "mAP": 0.412, "rank1": 0.601}, 0)
    assert line.endswith("ETA 0m00s  mAP 41.2% R1 60.1%")
    buf = io.StringIO()
    p = console.EpochPrinter(10, start_epoch=2, stream=buf)
    p(3, m)
    assert buf.getvalue().startswith("epoch 3/10  loss") and "ETA" in buf.getvalue()


def test_quiet_ray_reports_filters_only_report_dumps():
    import logging

    from ray.train.v2._internal.execution import context

    console.quiet_ray_reports()
    console.quiet_ray_reports()  # idempotent
    rec = lambda msg: logging.LogRecord("x", logging.INFO, "f", 1, msg, None, None)  # noqa: E731
    assert not context.logger.filter(rec("Reporting training result 3: TrainingReport(...)"))
    assert context.logger.filter(rec("Checkpoint successfully created"))


def test_progress_prints_rarely():
    buf = io.StringIO()
    p = console.Progress("extracting gallery", 100, every_s=0.0, stream=buf)
    assert p.update(10).startswith("extracting gallery: 10/100")
    q = console.Progress("x", 100, every_s=3600, stream=io.StringIO())
    assert q.update(50) is None
