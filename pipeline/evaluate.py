"""``python -m pipeline.evaluate --checkpoint URI [--rerank] [--mlflow]``: standalone evaluation.

``URI`` is an exported model directory (a run's ``final/`` or ``best/``) or a training checkpoint
directory (``checkpoint_epoch_NNNN``), local or ``s3://``. Runs in one process (CPU, or the first GPU
with ``--device cuda``), prints the metric table, and logs it to MLflow when asked.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline import checkpoint, distributed_eval, model_io, s3_errors, storage, tracking_store, urls
from pipeline.config import ConfigError, apply_overrides, parse_override

# What the two kinds of directory hold (for messages about a directory that is neither).
KINDS = ("an exported model (<run>/final or <run>/best: model.pt, meta.json) or a training checkpoint "
         "(<run>/checkpoint_epoch_NNNN: config.yaml, meta.json, ds/)")


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
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, cfg, meta = load_or_exit(args.checkpoint)
    try:
        if args.overrides:
            cfg = apply_overrides(cfg, dict(parse_override(o) for o in args.overrides))
        s3_errors.check(cfg.data.shards)
    except (ConfigError, s3_errors.StorageError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    device = torch.device(args.device)
    model = model.to(device).eval()
    metrics = distributed_eval.evaluate(model, cfg, embed_dim=cfg.model.embed_dim, device=device, rerank=args.rerank)
    print(distributed_eval.format_table(metrics))
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(scalars, f, indent=1)
    if args.mlflow:
        _log(cfg, args, metrics, scalars)
    return metrics


def load_or_exit(url: str):
    """``(model, cfg, meta)`` from ``url``, or one line ``checkpoint error: ...`` and exit 2.

    A missing directory, a plain file, a run directory, a store that cannot be used, and a file that
    does not load are told apart; torch's own text about unpickling is never shown (its advice,
    ``weights_only=False``, would run whatever code the file carries).

    Args:
        url (str): the ``--checkpoint`` argument.
    """
    try:
        why = not_a_checkpoint(url)
        if why is None:
            with warnings.catch_warnings():  # torch warns about the pickle protocol of a file it refuses
                warnings.filterwarnings("ignore", message=".*pickle protocol.*")
                return model_io.load_any(url)
    except (s3_errors.StorageError, checkpoint.CheckpointError) as exc:  # these name the URL already
        why = one_line(exc)
    except Exception as exc:  # CheckpointError, a refused unpickle, bad YAML/JSON, shape mismatch ...
        why = f"{url}: cannot load it: {one_line(exc)}"
    print(f"checkpoint error: {why}", file=sys.stderr)
    raise SystemExit(2)


def not_a_checkpoint(url: str) -> Optional[str]:
    """Why ``url`` is not a directory to load a model from, or None when it may be one.

    Args:
        url (str): a local path, ``file://`` or ``s3://`` URL.
    """
    url = url.rstrip("/") or url
    s3_errors.check(url)
    if not urls.is_s3(url):
        path = url[len("file://"):] if url.startswith("file://") else url
        if not os.path.exists(path):
            return f"{url}: no such directory"
        if not os.path.isdir(path):
            return f"{url}: is a file, not a directory; pass {KINDS}"
    names = set(storage.listdir(url))
    if not names:
        return f"{url}: {'nothing under this prefix' if urls.is_s3(url) else 'empty directory'}"
    if "model.pt" in names or "config.yaml" in names:
        return None
    ckpts = sorted(n for n in names if n.startswith("checkpoint_"))
    if ckpts or {"final", "best"} & names:
        has = ", ".join(sorted({"final", "best"} & names) + ckpts[-1:])
        return f"{url}: a run directory; pass one of its exports or checkpoints ({has})"
    return f"{url}: neither {KINDS}"


def one_line(exc: BaseException) -> str:
    """The first line of an error, without torch's advice to unpickle with ``weights_only=False``."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    if "weights_only=False" in str(exc) or "Unpickl" in first:
        return f"not a plain tensor file ({type(exc).__name__}); it is not loaded"
    return first if len(first) <= 300 else first[:300] + "..."


def _log(cfg, args, metrics: dict, scalars: dict) -> None:
    from pipeline import tracking, viz  # mlflow (~2.4 s) and matplotlib (~0.6 s): only with --mlflow

    cfg.tracking.run_name = cfg.tracking.run_name or "evaluate"
    tracker = tracking.Tracker(cfg)
    run_id = tracker.start(cfg, extra_tags={"evaluate.checkpoint": args.checkpoint, "mode": "evaluate"})
    tracker.log_params(cfg)
    tracker.log_metrics(scalars, 0)
    with tempfile.TemporaryDirectory() as tmp:
        extra = {"re-ranked": metrics["rr_cmc"]} if "rr_cmc" in metrics else None
        tracker.log_artifact(viz.plot_cmc(metrics["cmc"], Path(tmp) / "cmc.png", label=cfg.model.kind, extra=extra))
    tracker.end("FINISHED")
    print(f"logged to MLflow run {run_id} ({tracking_store.resolve_tracking_uri(cfg.tracking.uri)})")


if __name__ == "__main__":
    main()
