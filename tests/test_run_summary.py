"""pipeline.run_summary: a failed run ends in one line naming its error and the checkpoint --resume takes."""
from __future__ import annotations

from types import SimpleNamespace

from pipeline.run_summary import failed_result, format_summary, summarize, ui_hint
from test_resume import _cfg, _checkpoint


class WorkerGroupError(RuntimeError):
    """The shape of Ray Train V2's error when ranks fail: ``worker_failures`` maps rank -> exception."""

    def __init__(self, failures):
        super().__init__("Training failed due to worker errors:\n" + "\n".join(map(repr, failures.values())))
        self.worker_failures = failures


MANIFEST = {"splits": {"query": {"num_tracklets": 8}, "gallery": {"num_tracklets": 24}}}


def test_a_failed_run_names_the_first_ranks_error_and_the_newest_complete_checkpoint(tmp_path):
    cfg = _cfg(f"tracking.uri=sqlite:///{tmp_path}/m.db")
    run = tmp_path / "runs" / "r"
    _checkpoint(run / "checkpoint_epoch_0001", 1, cfg)
    _checkpoint(run / "checkpoint_epoch_0002", 2, cfg)
    _checkpoint(run / "checkpoint_epoch_0003", 3, cfg, finished_ranks=1)  # rank 1 died while saving
    exc = WorkerGroupError({1: ValueError("rank one"), 0: FloatingPointError("non-finite loss at step 7\nmore")})
    result = failed_result(exc, str(run))
    assert result.error == "FloatingPointError: non-finite loss at step 7"
    assert result.checkpoint.path == str(run / "checkpoint_epoch_0002") and result.metrics == {"epoch": 2}
    text = format_summary(summarize(cfg, result, MANIFEST, 90.0))
    assert "ERROR: FloatingPointError: non-finite loss at step 7" in text
    assert f"last checkpoint: {run / 'checkpoint_epoch_0002'}" in text and "(2 epochs" in text
    assert "Traceback" not in text and "Training failed due to worker errors" not in text


def test_a_run_that_failed_before_any_checkpoint(tmp_path):
    cfg = _cfg(f"tracking.uri=sqlite:///{tmp_path}/m.db")
    result = failed_result(KeyboardInterrupt(), str(tmp_path / "nothing"))
    assert result.error == "KeyboardInterrupt" and result.checkpoint is None and result.metrics == {}
    s = summarize(cfg, result, MANIFEST, 3.0)
    assert s["checkpoint"] is None and s["error"] == "KeyboardInterrupt" and s["num_gallery"] == 24
    assert "Rank-1 n/a   mAP n/a   (8 queries, 24 gallery)" in format_summary(s)


def test_a_finished_run_reports_s3_urls_and_its_metrics(tmp_path):
    cfg = _cfg(f"tracking.uri=sqlite:///{tmp_path}/m.db")
    s3 = SimpleNamespace(type_name="s3")
    result = SimpleNamespace(metrics={"rank1": 0.5, "mAP": 0.25, "epoch": 4, "global_step": 24}, error=None,
                             path="bucket/runs/r", filesystem=s3,
                             checkpoint=SimpleNamespace(path="bucket/runs/r/checkpoint_epoch_0004", filesystem=s3))
    s = summarize(cfg, result, MANIFEST, 120.0)
    assert s["run_path"] == "s3://bucket/runs/r" and s["checkpoint"] == "s3://bucket/runs/r/checkpoint_epoch_0004"
    text = format_summary(s)
    assert "finished in 2.0 min (4 epochs, 24 steps)" in text and "Rank-1 50.0%   mAP 25.0%" in text
    assert "ERROR" not in text


def test_the_ui_hint_never_prints_credentials():
    assert ui_hint("https://alice:s3cret@mlflow.example:5000") == "https://mlflow.example:5000"
    assert ui_hint("sqlite:////data/mlflow.db") == "mlflow ui --backend-store-uri sqlite:////data/mlflow.db"
