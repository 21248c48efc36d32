"""``python -m pipeline.evaluate --checkpoint URI [--rerank] [--mlflow]``: standalone evaluation.

``URI`` is an exported model directory (a run's ``final/`` or ``best/``) or a training checkpoint
directory (``checkpoint_epoch_NNNN``), local or ``s3://``. Runs in one process (CPU, or the first GPU
with ``--device cuda``), prints the metric table, and logs it to MLflow when asked.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Optional

import torch

from pipeline.config import ConfigError, apply_overrides


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="pipeline.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="exported model dir or training checkpoint dir (path or s3://)")
    ap.add_argument("--rerank", action="store_true", help="also report k-reciprocal re-ranked metrics")
    ap.add_argument("--mlflow", action="store_true", help="log the metrics as a new MLflow run")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--json", help="also write the metrics to this JSON file")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. data.shards=s3://... eval.clip_len=8")
    return ap.parse_intermixed_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    from pipeline import checkpoint, evaluation

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        model, cfg, meta = checkpoint.load_any(args.checkpoint)
    except checkpoint.CheckpointError as exc:  # incomplete, or not plain tensors: one line, never loaded
        print(f"checkpoint error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.overrides:
        try:
            cfg = apply_overrides(cfg, dict(_split(o) for o in args.overrides))
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    device = torch.device(args.device)
    model = model.to(device).eval()
    metrics = evaluation.evaluate(model, cfg, embed_dim=cfg.model.embed_dim, device=device, rerank=args.rerank)
    print(evaluation.format_table(metrics))
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(scalars, f, indent=1)
    if args.mlflow:
        _log(cfg, args, metrics, scalars)
    return metrics


def _split(text: str) -> tuple[str, Any]:
    from pipeline.config import parse_override

    return parse_override(text)


def _log(cfg, args, metrics: dict, scalars: dict) -> None:
    import tempfile
    from pathlib import Path

    from pipeline import tracking, viz

    cfg.tracking.run_name = cfg.tracking.run_name or "evaluate"
    tracker = tracking.Tracker(cfg)
    run_id = tracker.start(cfg, extra_tags={"evaluate.checkpoint": args.checkpoint, "mode": "evaluate"})
    tracker.log_params(cfg)
    tracker.log_metrics(scalars, 0)
    with tempfile.TemporaryDirectory() as tmp:
        extra = {"re-ranked": metrics["rr_cmc"]} if "rr_cmc" in metrics else None
        tracker.log_artifact(viz.plot_cmc(metrics["cmc"], Path(tmp) / "cmc.png", label=cfg.model.kind, extra=extra))
    tracker.end("FINISHED")
    print(f"logged to MLflow run {run_id} ({tracking.resolve_tracking_uri(cfg.tracking.uri)})")


if __name__ == "__main__":
    main()
