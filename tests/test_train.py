"""End-to-end training through real components: local Ray, DeepSpeed (2 workers, gloo), moto S3, MLflow.

Each test is a whole `pipeline.train` run on configs/tiny.yaml (seconds per epoch); marked slow.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    """The tiny synthetic set, generated and packed once for the module (local shards)."""
    from pipeline.config import load_config
    from pipeline.train import prepare_data

    base = tmp_path_factory.mktemp("tiny")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.root={base}/raw", f"data.shards={base}/shards"])
    prepare_data(cfg)
    return cfg.data.root, cfg.data.shards


@pytest.fixture
def ray_shutdown():
    yield
    from pipeline.train import shutdown_ray

    shutdown_ray()


def _mlflow_runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment} in {uri}"
    return client, client.search_runs([exp.experiment_id])


def _metric_steps(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_train_end_to_end_s3_checkpoints_mlflow(tiny_shards, s3_bucket, tmp_path, ray_shutdown, monkeypatch):
    from pipeline import storage
    from pipeline.checkpoint import load_any
    from pipeline.train import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    raw, shards = tiny_shards
    summary = main(["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.root={raw}", f"data.shards={shards}",
                    f"checkpoint.storage_path=s3://{s3_bucket}/runs", f"tracking.uri={uri}",
                    "tracking.run_name=e2e", "eval.rerank=true", "optim.epochs=2"])
    assert summary["error"] is None
    assert 0.0 <= summary["mAP"] <= 1.0 and summary["rank1"] is not None and summary["rr_mAP"] is not None

    # Checkpoints and exports live on the S3 server.
    run_url = f"s3://{s3_bucket}/runs/e2e"
    names = storage.listdir(run_url)
    assert "checkpoint_epoch_0002" in names and "final" in names and "best" in names, names
    ck = f"{run_url}/checkpoint_epoch_0002"
    assert {"meta.json", "config.yaml", "ds"} <= set(storage.listdir(ck))
    meta = json.loads(storage.read_bytes(f"{ck}/meta.json"))
    assert meta["epoch"] == 2 and meta["mlflow_run_id"] == summary["mlflow_run_id"]
    # The final export loads with sta_model alone (weights_only) and embeds clips.
    import torch

    model, cfg, _ = load_any(f"{run_url}/final")
    emb = model(torch.randn(2, 3, 3, cfg.data.height, cfg.data.width))
    assert emb.shape == (2, cfg.model.embed_dim)
    model2, _, _ = load_any(ck)  # and the DeepSpeed checkpoint gives the same weights
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)

    # MLflow: params, per-epoch and per-step metrics, artefacts, model — read back through its API.
    client, runs = _mlflow_runs(uri, "sta-tiny")
    run = next(r for r in runs if r.info.run_id == summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["data.clip_len"] == "2" and run.data.params["model.kind"] == "sta"
    assert run.data.tags["dataset"] == "synthetic"
    assert [s for s, _ in _metric_steps(client, run.info.run_id, "epoch")] == [1, 2]
    assert len(_metric_steps(client, run.info.run_id, "step/loss_total")) >= 2
    for key in ("loss_triplet", "loss_ce", "loss_reg", "lr", "clips_per_s", "skipped_samples", "mAP", "rank1", "rr_mAP"):
        assert key in run.data.metrics, key
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "cmc.png", "attention.png", "curves.png", "deepspeed_config.json"} <= arts, arts
    from mlflow.entities import LoggedModel  # noqa: F401  (MLflow 3: models are first-class)
    import mlflow

    mlflow.set_tracking_uri(uri)
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert any(m.source_run_id == run.info.run_id for m in models)


def test_fault_injection_restores_from_checkpoint(tiny_shards, tmp_path, ray_shutdown, monkeypatch):
    """Rank 1 dies after epoch 2's checkpoint; Ray restarts from it; epochs/steps continue without repeats."""
    from faults import use_failing_loop
    from pipeline.train import main

    use_failing_loop(monkeypatch, fail_at_epoch=2)  # the test's wrapper loop, not a production knob
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    raw, shards = tiny_shards
    summary = main(["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.root={raw}", f"data.shards={shards}",
                    f"checkpoint.storage_path={tmp_path}/runs", f"tracking.uri={uri}", "tracking.run_name=ft",
                    "optim.epochs=4", "failure.max_failures=1", "checkpoint.keep=4",
                    "data.decode=device"])  # JPEGs decoded by the training process (CPU here)
    assert summary["error"] is None and summary["epochs"] == 4
    client, runs = _mlflow_runs(uri, "sta-tiny")
    assert len(runs) == 1, "the restored attempt must continue the same MLflow run"
    run = runs[0]
    assert run.data.tags.get("resume_count") == "1"
    epochs = _metric_steps(client, run.info.run_id, "epoch")
    assert [s for s, _ in epochs] == [1, 2, 3, 4], epochs  # no repeated or lost epoch
    steps = [v for _, v in _metric_steps(client, run.info.run_id, "global_step")]
    per_epoch = steps[0]
    assert steps == [per_epoch * e for e in (1, 2, 3, 4)], steps  # continuous step counter
    # the LR schedule position survived too: lr metric equals the schedule at each epoch end
    assert summary["global_step"] == 4 * per_epoch
    ckpts = sorted(p.name for p in (tmp_path / "runs" / "ft").iterdir() if p.name.startswith("checkpoint_epoch"))
    assert ckpts == [f"checkpoint_epoch_000{e}" for e in (1, 2, 3, 4)]


def test_multi_node_cluster_s3(tiny_shards, s3_bucket, tmp_path, monkeypatch):
    """Head + two worker nodes (ray.cluster_utils.Cluster); the 2 training workers land on different
    nodes; shards and checkpoints go through the S3 server."""
    import ray
    from ray.cluster_utils import Cluster

    from pipeline import storage
    from pipeline.pack import pack
    from pipeline.train import main

    raw, _ = tiny_shards
    s3_shards = f"s3://{s3_bucket}/tiny"
    pack("synthetic", raw, s3_shards, progress=False)
    assert storage.exists(f"{s3_shards}/manifest.json")
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "dashboard_host": "127.0.0.1",
                                                            "include_dashboard": True})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env={"env_vars": {
            k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                       "AWS_DEFAULT_REGION", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") if k in os.environ}})
        summary = main(["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.shards={s3_shards}",
                        f"checkpoint.storage_path=s3://{s3_bucket}/runs", f"tracking.uri={uri}",
                        "tracking.run_name=mn", "optim.epochs=1", "tracking.log_model=false",
                        f"data.cache_dir={tmp_path}/shard-cache"])
        assert summary["error"] is None
        # the workers kept verified copies of the shards they read (named by the manifest's sha256)
        man = json.loads(storage.read_bytes(f"{s3_shards}/manifest.json"))
        digests = {s["sha256"]: s["bytes"] for sp in man["splits"].values() for s in sp["shards"]}
        cached = [f for _, _, fs in os.walk(tmp_path / "shard-cache") for f in fs]
        assert cached and all(f.endswith(".tar") and f[:-4] in digests for f in cached), cached
        client, runs = _mlflow_runs(uri, "sta-tiny")
        assert runs[0].data.metrics["num_nodes"] == 2.0
        assert "checkpoint_epoch_0001" in storage.listdir(f"s3://{s3_bucket}/runs/mn")
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ray_job_submit(tiny_shards, tmp_path):
    """`ray job submit --working-dir .` against a `ray start --head` started here; the job succeeds."""
    raw, shards = tiny_shards
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    from pipeline.train import free_port

    port, dash = free_port(), free_port()
    ray_bin = str(VENV_BIN / "ray")
    tmp_ray = Path("/tmp") / f"rj{os.getpid()}"  # short: Ray's socket paths must stay under 107 chars
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=3", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", "--node-ip-address=127.0.0.1", f"--temp-dir={tmp_ray}",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=180)
    try:
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        runtime_env = {"excludes": [".git", ".venv", "data", "runs", "mlruns", "mlflow.db", "*.tar"]}
        cmd = [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
               "--runtime-env-json", json.dumps(runtime_env), "--",
               "python", "-m", "pipeline.train", "--config", "configs/tiny.yaml", f"data.root={raw}",
               f"data.shards={shards}", f"checkpoint.storage_path={tmp_path}/runs", f"tracking.uri={uri}",
               "optim.epochs=1", "tracking.log_model=false", "tracking.run_name=job"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "succeeded" in (out.stdout + out.stderr).lower()
        assert "STA training finished" in out.stdout
        assert (tmp_path / "runs" / "job" / "final" / "model.pt").exists()
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(tmp_ray, ignore_errors=True)


def test_evaluate_cli_on_export(tiny_shards, tmp_path, ray_shutdown, monkeypatch):
    """`python -m pipeline.evaluate --checkpoint <final export> --rerank` prints the table and logs to MLflow."""
    from pipeline.train import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    raw, shards = tiny_shards
    main(["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.root={raw}", f"data.shards={shards}",
          f"checkpoint.storage_path={tmp_path}/runs", f"tracking.uri={uri}", "tracking.run_name=ev",
          "optim.epochs=1", "scaling.num_workers=1", "tracking.log_model=false"])
    out = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--checkpoint", f"{tmp_path}/runs/ev/final",
                          "--rerank", "--mlflow", "--json", f"{tmp_path}/m.json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "re-ranked" in out.stdout and "mAP" in out.stdout
    m = json.loads((tmp_path / "m.json").read_text())
    final_meta = json.loads((tmp_path / "runs" / "ev" / "final" / "meta.json").read_text())
    assert m["mAP"] == pytest.approx(final_meta["metrics"]["mAP"], abs=1e-6)  # same number standalone
    client, runs = _mlflow_runs(uri, "sta-tiny")
    assert any(r.data.tags.get("mode") == "evaluate" and "rr_mAP" in r.data.metrics for r in runs)


def test_resume_stopped_run_and_from_checkpoint(tiny_shards, tmp_path, ray_shutdown, monkeypatch):
    """`--resume <run dir>` continues the same run (epochs, steps, MLflow run); `--resume <checkpoint>`
    starts a new run from that checkpoint's weights and position."""
    from pipeline.train import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    raw, shards = tiny_shards
    common = ["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.root={raw}", f"data.shards={shards}",
              f"checkpoint.storage_path={tmp_path}/runs", f"tracking.uri={uri}", "scaling.num_workers=1",
              "tracking.log_model=false", "checkpoint.keep=5"]
    first = main(common + ["tracking.run_name=rs", "optim.epochs=1"])
    assert first["epochs"] == 1
    # A stopped run continued: same name, Ray restores its latest checkpoint, the MLflow run goes on.
    cont = main(common + ["--resume", f"{tmp_path}/runs/rs", "optim.epochs=3"])
    assert cont["epochs"] == 3 and cont["mlflow_run_id"] == first["mlflow_run_id"]
    client, runs = _mlflow_runs(uri, "sta-tiny")
    assert len(runs) == 1
    assert [s for s, _ in _metric_steps(client, first["mlflow_run_id"], "epoch")] == [1, 2, 3]
    steps = [v for _, v in _metric_steps(client, first["mlflow_run_id"], "global_step")]
    assert steps == [steps[0] * e for e in (1, 2, 3)]
    # From a checkpoint URI: a new run that starts at that checkpoint's epoch.
    ck = f"{tmp_path}/runs/rs/checkpoint_epoch_0002"
    new = main(common + ["--resume", ck, "tracking.run_name=from-ck", "optim.epochs=3"])
    assert new["mlflow_run_id"] != first["mlflow_run_id"]
    client, runs = _mlflow_runs(uri, "sta-tiny")
    assert [s for s, _ in _metric_steps(client, new["mlflow_run_id"], "epoch")] == [3]
    assert [v for _, v in _metric_steps(client, new["mlflow_run_id"], "global_step")] == [steps[0] * 3]
