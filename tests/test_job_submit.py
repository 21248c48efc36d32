"""The documented cluster path with the real `ray` CLI, and the faults a run must survive or report.

- `ray start --head` on 127.0.0.1 (token auth on, as after any earlier local Ray), then `ray job submit
  --working-dir . --runtime-env-json '{"env_vars": {MLFLOW_TRACKING_URI, AWS_*}}'` running `pipeline.train`
  on the tiny config with S3 checkpoints (moto): the job succeeds and its run lands in the given store,
  with provenance from the env vars a submit script sets (the upload has no .git);
- relative paths under a job fail with one line naming the key;
- a local S3 run leaves the secret nowhere in Ray's session directory (no runtime_env forwarding);
- a run whose worker dies is closed FAILED by the driver, Ctrl-C closes it KILLED, and the run's
  temporary checkpoint dirs are gone;
- an MLflow server that dies mid-run does not stop training.

Every process started here is stopped by its PID (never `ray stop`, which would stop other Rays too).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pipeline.train import free_port

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow
EXCLUDES = [".git", ".venv", "data", "runs", "mlruns", "mlartifacts", "mlflow.db", "*.tar", "docs",
            ".pytest_cache", "__pycache__", "*.egg-info"]


def _base_env(**extra: str) -> dict[str, str]:
    """This process's env without credentials or a tracking URI (the cluster does not have them)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_TRACKING", "RAY_ADDRESS", "RAY_JOB", "STA_"))}
    env.update(PATH=f"{VENV_BIN}:{env['PATH']}", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true", **extra)
    return env


def stop_processes_under(marker: str, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL, every process whose command line names ``marker`` (our Ray's temp dir)."""
    import psutil

    procs = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.info["cmdline"] and any(marker in a for a in p.info["cmdline"]) and p.pid != os.getpid():
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from pipeline.config import load_config
    from pipeline.train import prepare_data

    base = tmp_path_factory.mktemp("tiny")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.root={base}/raw", f"data.shards={base}/shards"])
    prepare_data(cfg)
    return cfg.data.root, cfg.data.shards


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` on loopback with its own ports and temp dir; token auth as the README says."""
    tmp_ray = f"/tmp/rjs{os.getpid()}"  # short: Ray's socket paths must stay under 107 characters
    env = _base_env(RAY_AUTH_MODE="token")
    port, dash = free_port(), free_port()
    for _ in range(4):  # Ray waits only 30 s for its raylet: a busy machine needs another try
        r = subprocess.run([str(VENV_BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=3",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--node-ip-address=127.0.0.1",
                            f"--temp-dir={tmp_ray}", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=600)
        if r.returncode == 0:
            break
        stop_processes_under(tmp_ray)
        time.sleep(10)
    try:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        yield {"address": f"http://127.0.0.1:{dash}", "env": env, "temp_dir": tmp_ray}
    finally:
        stop_processes_under(tmp_ray)


def submit(head, env_vars: dict, args: list[str], submission_id: str, timeout: int = 2400):
    runtime_env = {"excludes": EXCLUDES, "env_vars": env_vars}
    cmd = [str(VENV_BIN / "ray"), "job", "submit", f"--address={head['address']}", "--submission-id", submission_id,
           "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "-m", "pipeline.train", "--config", "configs/tiny.yaml", *args]
    deadline = time.time() + 900
    while True:
        out = subprocess.run(cmd, env=head["env"], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        # A fresh head's job agent comes up some seconds after `ray start` returns (minutes on a busy machine).
        if "No available agent to submit job" not in out.stdout + out.stderr or time.time() > deadline:
            return out
        time.sleep(5)


def _runs(uri: str, experiment: str = "sta-tiny"):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment} in {uri}"
    return client, client.search_runs([exp.experiment_id])


def test_job_submit_with_env_vars(ray_head, tiny_shards, s3_server, s3_bucket, tmp_path):
    """The docs' `--runtime-env-json '{"env_vars": ...}'` must not crash `ray.init` (merge conflict), and
    the run lands in the store and bucket the job named, with the submitter's provenance."""
    from pipeline import storage

    raw, shards = tiny_shards
    secret = f"sta-job-{uuid.uuid4().hex}"
    uri = f"sqlite:///{tmp_path}/m.db"
    env_vars = {"MLFLOW_TRACKING_URI": uri, "AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
                "STA_GIT_COMMIT": "0123456789abcdef0123456789abcdef01234567", "STA_GIT_DIRTY": "false",
                "STA_USER": "platform-engineer"}
    sid = f"sta-test-{uuid.uuid4().hex[:8]}"
    out = submit(ray_head, env_vars, [f"data.root={raw}", f"data.shards={shards}",
                                      f"checkpoint.storage_path=s3://{s3_bucket}/runs", "optim.epochs=1",
                                      "tracking.log_model=false", "tracking.heatmaps=0"], sid)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "Failed to merge" not in text and "STA training finished" in text
    assert secret not in text  # nothing of ours prints it
    assert "Reporting training result" not in text  # quiet by default
    assert "epoch 1/1" in text
    client, runs = _runs(uri)
    assert len(runs) == 1
    run = runs[0]
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["sta.run_dir"].startswith(f"s3://{s3_bucket}/runs/") and run.info.run_name == tags["sta.run_dir"].rsplit("/", 1)[1]
    assert tags["mlflow.source.git.commit"] == env_vars["STA_GIT_COMMIT"] and tags["git.dirty"] == "false"
    assert tags["mlflow.user"] == "platform-engineer" and tags["mlflow.source.type"] == "JOB"
    assert tags["mlflow.source.name"] == "pipeline.train" and tags["ray.job_submission_id"] == sid
    assert tags["sta.export.final"] == tags["sta.run_dir"] + "/final"
    assert storage.exists(tags["sta.export.final"] + "/model.pt")
    assert "train/loss_total" in run.data.metrics and "epoch" not in run.data.metrics


def test_relative_paths_under_a_job_fail_naming_the_key(ray_head, tmp_path):
    out = submit(ray_head, {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}, ["optim.epochs=1"],
                 f"sta-rel-{uuid.uuid4().hex[:8]}", timeout=1200)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "config error: data.shards=data/shards/tiny is a relative path" in text, text[-3000:]
    assert "Traceback" not in text


def _train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.train", "--config", str(ROOT / "configs" / "tiny.yaml"), *args]


def test_s3_secret_never_reaches_rays_session_dir(tiny_shards, s3_server, s3_bucket, tmp_path):
    """Issue 15 B9: a local run with S3 checkpoints; the secret appears in no file Ray wrote."""
    raw, shards = tiny_shards
    secret = f"sta-b9-{uuid.uuid4().hex}"
    tmp_ray = f"/tmp/rb{os.getpid()}"
    env = _base_env(AWS_ENDPOINT_URL=s3_server, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY=secret,
                    AWS_DEFAULT_REGION="us-east-1", RAY_TMPDIR=tmp_ray)
    try:
        out = subprocess.run(_train_cmd(f"data.root={raw}", f"data.shards={shards}", "optim.epochs=1",
                                        f"checkpoint.storage_path=s3://{s3_bucket}/runs",
                                        f"tracking.uri=sqlite:///{tmp_path}/m.db", "tracking.log_model=false",
                                        "tracking.heatmaps=0"),
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=2400)
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
        assert Path(tmp_ray).is_dir()
        hits = subprocess.run(["grep", "-rl", "--binary-files=text", secret, tmp_ray], capture_output=True, text=True)
        assert hits.stdout == "", f"secret found in: {hits.stdout}"
        assert secret not in out.stdout + out.stderr
    finally:
        stop_processes_under(tmp_ray)


def _run_status(uri: str):
    client, runs = _runs(uri)
    assert len(runs) == 1
    return runs[0]


def test_worker_failure_closes_the_run_failed(tiny_shards, tmp_path):
    """Issue 15 A7: a rank dies and no retry is allowed: the driver marks the MLflow run FAILED and the
    run's temporary checkpoint dirs are removed."""
    raw, shards = tiny_shards
    uri = f"sqlite:///{tmp_path}/m.db"
    name = f"fail-{uuid.uuid4().hex[:6]}"
    # tests/faults.py: the last rank exits right after epoch 1's checkpoint report; no retry allowed.
    cmd = [sys.executable, str(ROOT / "tests" / "faults.py"), "--fail-at-epoch", "1", "--fail-delay-s", "1",
           "--config", str(ROOT / "configs" / "tiny.yaml"), f"data.root={raw}", f"data.shards={shards}",
           "optim.epochs=2", f"checkpoint.storage_path={tmp_path}/runs", f"tracking.uri={uri}",
           "failure.max_failures=0", f"tracking.run_name={name}", "tracking.log_model=false"]
    out = subprocess.run(cmd, env=_base_env(PYTHONPATH=str(ROOT)), cwd=tmp_path, capture_output=True, text=True,
                         timeout=2400)
    assert out.returncode != 0, (out.stdout + out.stderr)[-3000:]
    run = _run_status(uri)
    assert run.info.status == "FAILED" and run.info.run_name == name
    assert not list(Path("/tmp").glob(f"sta-ckpt-{name}.*"))


def test_ctrl_c_closes_the_run_killed(tiny_shards, tmp_path):
    raw, shards = tiny_shards
    uri = f"sqlite:///{tmp_path}/m.db"
    name = f"int-{uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen(_train_cmd(f"data.root={raw}", f"data.shards={shards}", "optim.epochs=50",
                                       f"checkpoint.storage_path={tmp_path}/runs", f"tracking.uri={uri}",
                                       f"tracking.run_name={name}", "tracking.log_model=false"),
                            env=_base_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "epoch 2/50" in line:
                break
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the driver
        rest, _ = proc.communicate(timeout=900)
        lines.append(rest)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(lines)
    assert proc.returncode != 0, text[-3000:]
    assert _run_status(uri).info.status == "KILLED", text[-3000:]
    assert not list(Path("/tmp").glob(f"sta-ckpt-{name}.*"))


def test_tracking_server_dying_mid_run_does_not_stop_training(tiny_shards, tmp_path):
    """Issue 15 C10: the MLflow server goes away after the first epoch; training finishes (rc 0) and warns."""
    raw, shards = tiny_shards
    port = free_port()
    server = subprocess.Popen([str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path}/srv.db",
                               "--default-artifact-root", str(tmp_path / "art"), "--workers", "1"],
                              env=_base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", 600)
        proc = subprocess.Popen(_train_cmd(f"data.root={raw}", f"data.shards={shards}", "optim.epochs=4",
                                           f"checkpoint.storage_path={tmp_path}/runs",
                                           f"tracking.uri=http://127.0.0.1:{port}", "tracking.log_model=true"),
                                env=_base_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "epoch 1/4" in line:
                os.killpg(server.pid, signal.SIGKILL)
                break
        rest, _ = proc.communicate(timeout=2400)
        text = "".join(lines) + rest
        assert proc.returncode == 0, text[-4000:]
        assert "epoch 4/4" in text and "STA training finished" in text
        assert "training goes on" in text
    finally:
        for p in (server, locals().get("proc")):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


def _wait_http(url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)
