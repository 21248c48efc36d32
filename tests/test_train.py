"""End-to-end training through real components: local Ray, DeepSpeed (2 workers, gloo), moto S3, MLflow.

Each test is a whole `pipeline.train` run on configs/tiny.yaml (seconds per epoch); marked slow.
"""
from __future__ import annotations

import json
import os
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


def _checkpoint_steps(run_dir: Path) -> dict[int, int]:
    """``epoch -> global_step`` from the meta.json of every checkpoint of a run."""
    out = {}
    for p in sorted(run_dir.glob("checkpoint_epoch_*")):
        meta = json.loads((p / "meta.json").read_text())
        out[int(meta["epoch"])] = int(meta["global_step"])
    return out


def test_train_end_to_end_s3_checkpoints_mlflow(tiny_shards, s3_bucket, tmp_path, ray_shutdown, monkeypatch):
    from pipeline import storage
    from pipeline.model_io import load_any
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
    assert [s for s, _ in _metric_steps(client, run.info.run_id, "train/loss_total")] == [1, 2]
    assert len(_metric_steps(client, run.info.run_id, "step/loss_total")) >= 2
    for key in ("train/loss_triplet", "train/loss_ce", "train/loss_reg", "train/lr", "system/clips_per_s",
                "train/skipped_samples", "eval/mAP", "eval/rank1", "eval/rr_mAP"):
        assert key in run.data.metrics, key
    assert not {"epoch", "global_step", "batches", "num_nodes"} & set(run.data.metrics)  # bookkeeping
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

    use_failing_loop(monkeypatch, fail_at_epoch=2)  # the test's wrapper loop, not a production knob
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    raw, shards = tiny_shards
    summary = _main(["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.root={raw}", f"data.shards={shards}",
                    f"checkpoint.storage_path={tmp_path}/runs", f"tracking.uri={uri}", "tracking.run_name=ft",
                    "optim.epochs=4", "failure.max_failures=1", "checkpoint.keep=4",
                    "data.decode=device"])  # JPEGs decoded by the training process (CPU here)
    assert summary["error"] is None and summary["epochs"] == 4
    client, runs = _mlflow_runs(uri, "sta-tiny")
    assert len(runs) == 1, "the restored attempt must continue the same MLflow run"
    run = runs[0]
    assert run.data.tags.get("resume_count") == str(1 + _main.retries)  # the worker restart (+ driver retries)
    epochs = _metric_steps(client, run.info.run_id, "train/loss_total")
    assert [s for s, _ in epochs] == [1, 2, 3, 4], epochs  # no repeated or lost epoch
    steps = list(_checkpoint_steps(tmp_path / "runs" / "ft").values())
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
        assert runs[0].data.tags["num_nodes"] == "2"
        assert "checkpoint_epoch_0001" in storage.listdir(f"s3://{s3_bucket}/runs/mn")
    finally:
        ray.shutdown()
        cluster.shutdown()


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
    assert [s for s, _ in _metric_steps(client, first["mlflow_run_id"], "train/loss_total")] == [1, 2, 3]
    steps = list(_checkpoint_steps(tmp_path / "runs" / "rs").values())
    assert steps == [steps[0] * e for e in (1, 2, 3)]
    # From a checkpoint URI: a new run that starts at that checkpoint's epoch.
    ck = f"{tmp_path}/runs/rs/checkpoint_epoch_0002"
    new = main(common + ["--resume", ck, "tracking.run_name=from-ck", "optim.epochs=3"])
    assert new["mlflow_run_id"] != first["mlflow_run_id"]
    client, runs = _mlflow_runs(uri, "sta-tiny")
    assert [s for s, _ in _metric_steps(client, new["mlflow_run_id"], "train/loss_total")] == [3]
    assert _checkpoint_steps(tmp_path / "runs" / "from-ck") == {3: steps[0] * 3}


def _tiny_cli(tmp_path, raw, shards, *extra):
    return [sys.executable, "-m", "pipeline.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
            f"data.root={raw}", f"data.shards={shards}", f"checkpoint.storage_path={tmp_path}/runs",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.log_model=false", "checkpoint.keep=10",
            *extra]


RAY_START_TIMEOUT = "The current node timed out during startup"  # Ray's fixed 30 s, on an overloaded machine


def _run_cli(cmd: list[str], cwd: Path, log: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run a CLI to the end, again (up to 3 times) only when Ray's own node start timed out: that
    happens before the run touches anything, and is the machine's load, not the code under test."""
    for _ in range(3):
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        log.write_text(out.stdout + out.stderr)
        if RAY_START_TIMEOUT not in out.stderr:
            break
    return out


def _main(args: list[str]) -> dict:
    """``pipeline.train.main`` in this process, again (up to 3 times) only when Ray's own node start
    timed out (see :func:`_run_cli`)."""
    from pipeline.train import main, shutdown_ray

    _main.retries = 0  # a retried driver re-opens its MLflow run: one more resume_count
    for attempt in range(3):
        try:
            return main(args)
        except Exception as exc:  # noqa: BLE001 - only Ray's start-up timeout is retried
            if RAY_START_TIMEOUT not in str(exc) or attempt == 2:
                raise
            shutdown_ray()
            _main.retries += 1
    raise AssertionError("unreachable")


def _snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under the run's checkpoint dirs."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in run_dir.glob("checkpoint_epoch_*/**/*") if p.is_file()}


def test_ctrl_c_then_resume_continues_without_overwriting(tiny_shards, tmp_path):
    """A real SIGINT to a real `python -m pipeline.train` after epoch 2's checkpoint, then `--resume <run dir>`:
    the run continues from the newest complete checkpoint, earlier checkpoints are untouched, no epoch repeats."""
    import signal
    import time

    from pipeline import checkpoint as ckpt_lib

    raw, shards = tiny_shards
    run_dir = tmp_path / "runs" / "cc"
    log = open(tmp_path / "first.log", "w")
    cmd = _tiny_cli(tmp_path, raw, shards, "tracking.run_name=cc", "optim.epochs=6")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 1500  # a busy CI machine: Ray and DeepSpeed start slowly
        while time.time() < deadline and not (run_dir / "checkpoint_epoch_0002").is_dir() \
                or ckpt_lib.verify(str(run_dir / "checkpoint_epoch_0002")):
            if proc.poll() is not None and RAY_START_TIMEOUT in (tmp_path / "first.log").read_text():
                proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # see _run_cli
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    first = (tmp_path / "first.log").read_text()
    done = sorted(int(p.name[-4:]) for p in run_dir.glob("checkpoint_epoch_*")
                  if not ckpt_lib.verify(str(p)))
    assert done and done[-1] < 6, first[-3000:]  # interrupted, with epochs to go
    last = done[-1]
    before = _snapshot(run_dir)

    out = _run_cli(_tiny_cli(tmp_path, raw, shards, "--resume", str(run_dir), "optim.epochs=6"), tmp_path,
                   tmp_path / "resume.log", timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"resume: continuing run from {run_dir}/checkpoint_epoch_{last:04d} (epoch {last})" in out.stdout
    assert "(6 epochs," in out.stdout
    after = _snapshot(run_dir)
    kept = {k: v for k, v in before.items() if int(k.split("/")[0][-4:]) <= last}
    assert kept and all(after.get(k) == v for k, v in kept.items()), "an earlier checkpoint was rewritten"
    assert sorted(int(p.name[-4:]) for p in run_dir.glob("checkpoint_epoch_*")) == list(range(1, 7))
    client, runs = _mlflow_runs(f"sqlite:///{tmp_path}/mlflow.db", "sta-tiny")
    assert len(runs) == 1  # the same MLflow run continued
    epochs = [s for s, _ in _metric_steps(client, runs[0].info.run_id, "train/loss_total")]
    assert epochs == sorted(set(epochs)) and epochs[-1] == 6 and set(range(last + 1, 7)) <= set(epochs)
    steps = _checkpoint_steps(run_dir)
    assert steps == {e: e * steps[1] for e in range(1, 7)}  # continuous step counter (and LR position)


def test_resume_refuses_a_crafted_pickle_and_runs_nothing(tiny_shards, tmp_path, ray_shutdown, monkeypatch):
    """A checkpoint whose DeepSpeed file would run `touch` (manifest rewritten to match, as anyone who can
    write the bucket could): `--resume` and `pipeline.evaluate` both refuse it; the command never runs."""
    import torch

    from pipeline import checkpoint as ckpt_lib

    monkeypatch.chdir(tmp_path)
    raw, shards = tiny_shards
    common = ["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.root={raw}", f"data.shards={shards}",
              f"checkpoint.storage_path={tmp_path}/runs", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
              "tracking.log_model=false", "scaling.num_workers=1", "failure.max_failures=0"]
    _main(common + ["tracking.run_name=src", "optim.epochs=1"])
    ck = tmp_path / "runs" / "src" / "checkpoint_epoch_0001"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    states = ck / "ds" / "mp_rank_00_model_states.pt"
    torch.save({"module": Payload()}, states)
    ckpt_lib.write_manifest(str(ck), rank=0, world_size=1)
    ev = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--checkpoint", str(ck)], cwd=ROOT,
                        capture_output=True, text=True, timeout=900)  # imports alone take minutes when busy
    assert ev.returncode == 2 and "refused" in ev.stderr and "weights_only" not in ev.stderr, ev.stderr[-2000:]
    summary = _main(common + ["--resume", str(ck), "tracking.run_name=evil", "optim.epochs=2"])
    assert summary["error"] and "refused" in summary["error"] and "posix.system" in summary["error"], summary
    assert "weights_only" not in summary["error"]
    assert not marker.exists(), "the crafted pickle ran"


def test_non_finite_loss_stops_at_its_step_keeps_last_checkpoint_and_is_not_retried(tiny_shards, tmp_path,
                                                                                    ray_shutdown, monkeypatch):
    from faults import nan_loss_loop, use_loop
    from pipeline import checkpoint as ckpt_lib

    use_loop(monkeypatch, nan_loss_loop(at_step=3))  # tiny: 2 steps an epoch, so epoch 2's first step
    monkeypatch.chdir(tmp_path)
    raw, shards = tiny_shards
    summary = _main(["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.root={raw}", f"data.shards={shards}",
                    f"checkpoint.storage_path={tmp_path}/runs", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                    "tracking.run_name=nan", "optim.epochs=3", "tracking.log_model=false", "failure.max_failures=2"])
    err = summary["error"] or ""
    assert "non-finite loss at global step 3" in err and "ce=nan" in err and "triplet=" in err, err
    assert "[not retried]" in err, err  # Ray's retry stopped at once instead of training again
    run_dir = tmp_path / "runs" / "nan"
    assert sorted(p.name for p in run_dir.glob("checkpoint_epoch_*")) == ["checkpoint_epoch_0001"]
    assert ckpt_lib.verify(str(run_dir / "checkpoint_epoch_0001")) == []


def test_final_evaluation_failure_keeps_the_epoch_and_final_export(tiny_shards, tmp_path, ray_shutdown, monkeypatch):
    """The last epoch's evaluation raises: its checkpoint was written before, final/ is still exported,
    and the run fails naming the evaluation error (no epoch is trained again)."""
    from faults import eval_failure_loop, use_loop
    from pipeline import checkpoint as ckpt_lib
    from pipeline import model_io

    use_loop(monkeypatch, eval_failure_loop())
    monkeypatch.chdir(tmp_path)
    raw, shards = tiny_shards
    summary = _main(["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.root={raw}", f"data.shards={shards}",
                    f"checkpoint.storage_path={tmp_path}/runs", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                    "tracking.run_name=evfail", "optim.epochs=2", "tracking.log_model=false",
                    "failure.max_failures=0"])
    err = summary["error"] or ""
    assert "evaluation after epoch 2 failed" in err and "gallery shard unreadable" in err, err
    assert "checkpoint_epoch_0002 and final/ kept" in err, err
    run_dir = tmp_path / "runs" / "evfail"
    assert ckpt_lib.verify(str(run_dir / "checkpoint_epoch_0002")) == []
    model, _, meta = model_io.load_any(str(run_dir / "final"))
    assert meta["metrics"] == {} and model is not None
