"""The end of ``python -m pipeline.train``: the run's summary dict and the lines printed for it.

A finished run's summary comes from Ray's ``Result``; a run whose ``fit()`` raised (Ray Train V2 raises
the run's error) from :func:`failed_result`, so both end in the same few lines, never a traceback.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from pipeline import resume, tracking_store
from pipeline.checkpoint import storage_url
from pipeline.config import Config


def failed_result(exc: Exception, run_dir: str) -> SimpleNamespace:
    """What :func:`summarize` needs from a run whose ``fit()`` raised: the error (for a worker failure,
    the first rank's own exception, one line, not Ray's wrapped traceback) and the newest complete
    checkpoint, which ``--resume`` would continue from.

    Args:
        exc: what ``fit()`` raised (Ray's ``WorkerGroupError`` carries ``worker_failures``: rank -> error).
        run_dir: the run's directory (local or ``s3://``), searched for complete checkpoints.
    """
    failures = getattr(exc, "worker_failures", None) or {}
    root = failures[min(failures)] if failures else exc
    error = f"{type(root).__name__}: {root}".strip().splitlines()[0] if str(root) else type(root).__name__
    url, epoch, _ = resume.newest_complete(run_dir)
    return SimpleNamespace(metrics={"epoch": epoch} if url else {}, error=error, path=run_dir,
                           checkpoint=SimpleNamespace(path=url) if url else None)


def summarize(cfg: Config, result, manifest: dict, seconds: float) -> dict[str, Any]:
    """The run's figures and places: metrics of the last report, the run directory and checkpoint as
    URLs ``--resume`` takes, the MLflow run, the error if any."""
    m = result.metrics or {}
    uri = tracking_store.resolve_tracking_uri(cfg.tracking.uri)
    return {
        "rank1": m.get("rank1"), "mAP": m.get("mAP"), "rr_rank1": m.get("rr_rank1"), "rr_mAP": m.get("rr_mAP"),
        "epochs": m.get("epoch"), "global_step": m.get("global_step"), "skipped_samples": m.get("skipped_samples"),
        "skipped_queries": m.get("skipped_queries"),
        "num_query": manifest["splits"]["query"]["num_tracklets"], "num_gallery": manifest["splits"]["gallery"]["num_tracklets"],
        # Full URLs (s3://...), pasteable into --resume: Ray reports paths relative to its filesystem.
        "run_path": storage_url(result.path, getattr(result, "filesystem", None)),
        "checkpoint": storage_url(result.checkpoint.path, getattr(result.checkpoint, "filesystem", None))
        if result.checkpoint else None,
        "mlflow_run_id": m.get("mlflow_run_id"), "tracking_uri": uri, "seconds": seconds,
        "error": str(result.error) if result.error else None,
    }


def format_summary(s: dict[str, Any]) -> str:
    """The summary as the console shows it at the end of a run."""
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = [
        "",
        f"== STA training finished in {s['seconds'] / 60:.1f} min ({s['epochs']} epochs, {s['global_step']} steps)",
        f"   Rank-1 {pct(s['rank1'])}   mAP {pct(s['mAP'])}   ({s['num_query']} queries, {s['num_gallery']} gallery)",
        f"   queries without a cross-camera true match (left out of Rank-k/mAP): {s.get('skipped_queries')}",
    ]
    if s.get("rr_mAP") is not None:
        lines.append(f"   re-ranked: Rank-1 {pct(s['rr_rank1'])}   mAP {pct(s['rr_mAP'])}")
    lines += [
        f"   skipped corrupt samples: {s['skipped_samples']}",
        f"   run directory: {s['run_path']}",
        f"   last checkpoint: {s['checkpoint']}",
        f"   MLflow run {s['mlflow_run_id']} in {s['tracking_uri']}",
        f"   open the UI: {ui_hint(s['tracking_uri'])}",
    ]
    if s.get("error"):
        lines.append(f"   ERROR: {s['error']}")
    return "\n".join(lines)


def ui_hint(uri: str) -> str:
    """How to look at the run: the server's URL, or the command that serves a local store."""
    # redact imports mlflow (~2.4 s): the driver does not, so that config errors exit at once
    from pipeline.redact import strip_credentials

    if uri.startswith(("http://", "https://")):
        return strip_credentials(uri)
    return f"mlflow ui --backend-store-uri {uri}"
