"""pipeline.run_state without Ray: metrics are held until the checkpoint holding their epoch is stored,
then sent to a real MLflow store (sqlite) in order, once."""
import torch
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.config import load_config
from pipeline.run_state import RunState, publish


def _run(tmp_path, cfg) -> RunState:
    return RunState(cfg=cfg, rank=0, world=1, device=torch.device("cpu"), dtype=torch.float32, num_classes=4,
                    run_dir=str(tmp_path / "run"), run_name="held")


def test_publish_sends_held_metrics_once_in_order(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("configs/tiny.yaml", [f"tracking.uri={uri}", "tracking.run_name=held"])
    tracker = tracking.Tracker(cfg)
    run_id = tracker.start(cfg)
    run = _run(tmp_path, cfg)
    run.held += [({"step/loss_total": 3.0}, 4), ({"step/loss_total": 2.0}, 8), ({"train/loss_total": 2.5}, 1)]
    client = MlflowClient(uri)
    assert client.get_metric_history(run_id, "train/loss_total") == []  # nothing sent before publish
    publish(run, tracker)
    assert run.held == []
    publish(run, tracker)  # nothing held: nothing sent twice
    steps = [(m.step, m.value) for m in client.get_metric_history(run_id, "step/loss_total")]
    assert sorted(steps) == [(4, 3.0), (8, 2.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss_total")] == [(1, 2.5)]
    tracker.end("FINISHED")


def test_publish_on_other_ranks_only_clears(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["tracking.enabled=false"])
    run = _run(tmp_path, cfg)
    run.held.append(({"train/loss_total": 1.0}, 1))
    publish(run, None)  # ranks other than 0 have no tracker
    assert run.held == []
