"""pipeline.tune: resource arithmetic, result handling, and a real 4-trial ASHA search on local Ray."""
import json
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.search_space import load_tune_config, parse_tune_config
from pipeline.tune import best_row, derive_max_concurrent, trial_resources, write_table

ROOT = Path(__file__).resolve().parents[1]


def small_spec(tmp_path, **tune):
    data = tmp_path / "data"
    raw = {
        "base": {"config": str(ROOT / "configs" / "tiny.yaml"), "overrides": {
            "data.root": str(data / "raw"), "data.shards": str(data / "shards"),
            "data.batches_per_epoch": 6, "data.synthetic.num_ids": 12, "data.synthetic.num_test_ids": 10,
            "optim.epochs": 4, "eval.every_epochs": 1, "scaling.num_workers": 1,
            "checkpoint.storage_path": str(tmp_path / "unused"),
            "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment": "tune-test",
            "tracking.log_model": False, "tracking.heatmaps": 0}},
        # lr 1e-9 leaves the model at its (seeded, identical) initialisation: those trials cannot
        # improve, so ASHA's rung cut-off stops the later of them once better trials have reported.
        "search": {"optim.lr": {"grid": [3e-3, 1e-9]}, "loss.w_tri": {"uniform": [0.5, 2.0]}},
        "tune": {"num_samples": 2, "seed": 1, "grace_period": 1, "max_t": 4, "reduction_factor": 2,
                 "max_concurrent": 2, "storage_path": str(tmp_path / "tune"), "name": "search", **tune},
    }
    return parse_tune_config(raw)


def test_resources_and_concurrency(tmp_path):
    spec = small_spec(tmp_path)
    assert trial_resources(spec) == {"CPU": 2.0}  # driver + one worker
    assert derive_max_concurrent({"CPU": 8.0}, {"CPU": 2.0}) == 4
    assert derive_max_concurrent({"CPU": 3.0}, {"CPU": 2.0}) == 1
    assert derive_max_concurrent({"CPU": 16.0, "GPU": 2.0}, {"CPU": 2.0, "GPU": 1.0}) == 2
    assert derive_max_concurrent({"CPU": 1.0}, {"CPU": 2.0}) == 1  # never 0: Ray queues it
    spec.base.scaling.use_gpu, spec.base.scaling.num_workers = True, 2
    assert trial_resources(spec) == {"CPU": 3.0, "GPU": 2.0}


def test_best_row_prefers_full_trials_and_table(tmp_path):
    spec = small_spec(tmp_path)
    rows = [{"trial_id": "a", "optim.lr": 1e-3, "loss.w_tri": 1.0, "status": "stopped", "mAP": 0.9},
            {"trial_id": "b", "optim.lr": 3e-3, "loss.w_tri": 1.0, "status": "finished", "mAP": 0.5},
            {"trial_id": "c", "optim.lr": 3e-3, "loss.w_tri": 2.0, "status": "finished", "mAP": 0.6},
            {"trial_id": "d", "optim.lr": 3e-3, "loss.w_tri": 2.0, "status": "error", "mAP": None}]
    assert best_row(spec, rows)["trial_id"] == "c"
    assert best_row(spec, rows[:1])["trial_id"] == "a"  # no full trial: the best that reported
    spec.tune.mode = "min"
    assert best_row(spec, rows)["trial_id"] == "b"
    write_table(rows, ["trial_id", "optim.lr", "mAP"], tmp_path / "t.csv", tmp_path / "t.md")
    md = (tmp_path / "t.md").read_text().splitlines()
    assert md[0] == "| trial_id | optim.lr | mAP |" and md[4] == "| c | 0.003 | 0.6 |" and md[5] == "| d | 0.003 |  |"
    assert (tmp_path / "t.csv").read_text().splitlines()[1] == "a,0.001,0.9"


@pytest.fixture
def ray_cleanup():
    yield
    from pipeline.tune import shutdown_ray

    shutdown_ray()


def _free_cpus_settle(ray, timeout=60.0):
    total = ray.cluster_resources()["CPU"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0.0) >= total:
            return total, total
        time.sleep(1.0)
    return total, ray.available_resources().get("CPU", 0.0)


@pytest.mark.slow
def test_search_asha_mlflow_best_config_and_restore(tmp_path, ray_cleanup):
    import ray
    from mlflow import MlflowClient

    from pipeline.tune import run_search

    spec = small_spec(tmp_path)
    t = time.perf_counter()
    s = run_search(spec)
    first_seconds = time.perf_counter() - t
    rows = {r["trial_id"]: r for r in s["rows"]}
    assert s["num_trials"] == 4 and s["errors"] == 0, s["rows"]
    stopped = [r for r in rows.values() if r["status"] == "stopped"]
    assert stopped, "ASHA stopped no trial"
    assert all(r["epochs"] < 4 for r in stopped)
    # A frozen (lr 1e-9) trial can only pass a rung where it reports first; not both of them can.
    assert any(r["optim.lr"] == 1e-9 for r in stopped)
    assert all(r["epochs"] == 4 for r in rows.values() if r["status"] == "finished")
    # Stopped trials took their training workers (and placement groups) with them.
    total, free = _free_cpus_settle(ray)
    assert free == total, f"{total - free} CPUs still held after the search"

    # MLflow: one parent with the search space, four nested children with the trial's params.
    uri = s["tracking_uri"]
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tune-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == s["parent_run_id"]]
    assert [p.info.run_id for p in parents] == [s["parent_run_id"]]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert json.loads(parent.data.params["search.optim.lr"]) == {"grid": [0.003, 1e-9]}
    assert parent.data.params["tune.num_samples"] == "2" and parent.data.params["tune.scheduler"] == "asha"
    assert parent.data.metrics["tune.stopped"] == len(stopped)
    assert len(children) == 4
    by_run = {r["mlflow_run_id"]: r for r in rows.values()}
    for child in children:
        row = by_run[child.info.run_id]
        assert float(child.data.params["optim.lr"]) == pytest.approx(row["optim.lr"])
        assert float(child.data.params["loss.w_tri"]) == pytest.approx(row["loss.w_tri"])
        assert child.data.params["eval.every_epochs"] == "1"
        assert child.data.tags["tune.trial_id"].endswith(row["trial_id"])
        history = client.get_metric_history(child.info.run_id, "eval/mAP")
        steps = sorted(m.step for m in history)
        # A stopped trial may log an epoch or so more than Tune saw before the stop reached it.
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= row["epochs"]
        # (Tune's own view of stopped trials is checked above: fewer than 4 epochs; under load the
        # worker can still finish its last epoch before the stop reaches it.)
        assert len(steps) == 4 if row["status"] == "finished" else len(steps) <= 4
        if row["status"] == "stopped":  # KILLED, unless the stop reached it after its last epoch
            assert child.info.status == "KILLED" or (child.info.status == "FINISHED" and len(steps) == 4)
        else:
            assert child.info.status == "FINISHED"

    # Artifacts of the parent and the best config, ready to train.
    names = {a.path for a in client.list_artifacts(s["parent_run_id"])}
    assert {"best_config.yaml", "sweep.png", "trials.csv", "trials.md"} <= names
    best = load_config(s["best_config"])
    assert best.optim.lr == pytest.approx(3e-3)
    assert best.loss.w_tri == pytest.approx(s["best"]["loss.w_tri"])
    assert best.optim.epochs == 4 and best.eval.every_epochs == 1 and best.tracking.run_name is None
    assert s["best"]["mAP"] == max(r["mAP"] for r in rows.values() if r["status"] == "finished")
    local = Path(client.download_artifacts(s["parent_run_id"], "best_config.yaml", str(tmp_path / "dl")))
    assert load_config(local).to_dict() == best.to_dict()
    # Trial checkpoints live under the search's storage path.
    assert all(Path(r["path"]).is_relative_to(tmp_path / "tune" / "search") for r in rows.values())
    assert any((tmp_path / "tune" / "search" / "trials").iterdir())

    # Restore: the finished search comes back with the same trials; nothing is re-run.
    t = time.perf_counter()
    again = run_search(small_spec(tmp_path))
    assert again["restored"] and again["parent_run_id"] == s["parent_run_id"]
    assert {r["trial_id"]: (r["status"], r["epochs"], r["mAP"]) for r in again["rows"]} == \
        {k: (r["status"], r["epochs"], r["mAP"]) for k, r in rows.items()}
    assert len(client.search_runs([exp.experiment_id])) == 5  # no new child runs
    assert time.perf_counter() - t < first_seconds / 2


def log_tail(path: Path, lines: int = 80) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.mark.slow
def test_interrupted_search_resumes_without_rerunning_finished_trials(tmp_path, ray_cleanup):
    """Ctrl-C (SIGINT) a running search after its first trial finished, then ``--resume`` it."""
    import os
    import signal
    import subprocess
    import sys

    from mlflow import MlflowClient

    from pipeline.tune import run_search

    src = small_spec(tmp_path, num_samples=1, max_concurrent=1, scheduler="none").source
    # Two trials (a w_tri grid), one at a time, so the search is cut between them.
    raw_yaml = {"base": {"config": src["base"]["config"], "overrides": src["base"]["overrides"]},
                "search": {"loss.w_tri": {"grid": [0.5, 1.5]}}, "tune": src["tune"]}
    cfg_path = tmp_path / "t.yaml"
    cfg_path.write_text(yaml.safe_dump(raw_yaml))
    exp = tmp_path / "tune" / "search"
    log_path = tmp_path / "tune.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.tune", "--config", str(cfg_path)], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # One trial at a time: the second trial's directory appears once the first has finished.
        # Tune writes trial files in a local staging dir and syncs them to storage_path in the
        # background, so wait for the synced copy of the first trial's last result too: a dir can
        # be there before its result.json is (a copy under way when the search is cut).
        def first_trial_last_result():
            dirs = sorted(exp.glob("sta_trial_*"))
            if len(dirs) < 2 or not (dirs[0] / "result.json").exists():
                return None
            lines = (dirs[0] / "result.json").read_text().splitlines()
            try:
                last = json.loads(lines[-1]) if lines else None
            except json.JSONDecodeError:  # a line still being copied
                return None
            return last if last and last["training_iteration"] == 4 else None

        deadline = time.time() + 200
        while time.time() < deadline and (last := first_trial_last_result()) is None:
            time.sleep(1.0)
        assert last is not None, f"the first trial did not finish in time:\n{log_tail(log_path)}"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    finished_id = last["trial_id"]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("tune-test").experiment_id
    before = {r.info.run_id: r for r in client.search_runs([exp_id])}
    finished_run = next(r for r in before.values() if r.data.tags.get("tune.trial_id") == finished_id)
    assert finished_run.info.status == "FINISHED"

    resumed = run_search(load_tune_config(cfg_path), resume=True)
    assert resumed["restored"] and resumed["num_trials"] == 2 and resumed["errors"] == 0
    assert all(r["status"] == "finished" for r in resumed["rows"]), resumed["rows"]
    after = client.search_runs([exp_id])
    children = [r for r in after if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2  # the finished trial was not re-run into a new child run
    assert len({r.data.tags["mlflow.parentRunId"] for r in children}) == 1
    # The finished trial's run is untouched: same end time and one mAP point per epoch.
    again = client.get_run(finished_run.info.run_id)
    assert again.info.end_time == finished_run.info.end_time
    assert len(client.get_metric_history(finished_run.info.run_id, "eval/mAP")) == 4

