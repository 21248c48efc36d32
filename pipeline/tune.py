"""``python -m pipeline.tune --config configs/tune.yaml [key=value ...]``: hyperparameter search with Ray Tune.

Each trial is a full distributed training run: a Tune function trainable (the trial's driver, one CPU)
builds the trial's ``TorchTrainer`` through :func:`pipeline.train.build_trainer` and fits it, with
``TuneReportCallback`` passing rank 0's per-epoch metrics to Tune (Ray Train V2 cannot be handed to
``Tuner`` directly). ASHA stops poor trials on the metric; stopped trials take their workers with them.

MLflow: one parent run per search (search space + tune settings as params), one nested child run per
trial (logged by rank 0 of the trial), and at the end ``best_config.yaml`` (ready to train), a
parallel-coordinates plot and a trials table as artifacts of the parent. An interrupted search is
restored from ``<storage_path>/<name>`` (automatically, or ``--resume``): finished trials are kept,
unfinished ones continue from their last Ray Train checkpoint.

CLI overrides: ``tune.<setting>=v`` (settings), ``search.<key>={choice: [...]}`` (space entries), any
other ``section.key=v`` goes to the base training config. Config errors exit 2 before Ray starts.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from pipeline import tracking_store, urls
from pipeline.checkpoint import ray_storage
from pipeline.config import Config, ConfigError, apply_overrides, load_config
from pipeline.model_io import check_pretrained
from pipeline.train import absolute_paths, build_trainer, prepare_data, set_env, shutdown_ray
from pipeline.train import init_ray as init_train_ray
from pipeline.search_space import (VARIANT_KEY, TuneSpec, is_finite_number, load_tune_config, num_trials,
                                   to_ray_space, trial_overrides)

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tune.yaml"
PATH_TAG = "tune.experiment_path"  # marks the parent run of a search (found again on resume)
log = logging.getLogger("pipeline.tune")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="pipeline.tune", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="tune YAML (base + search + tune)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="restore the search at storage_path/name (error if none)")
    group.add_argument("--fresh", action="store_true", help="never restore; fails if the search already exists")
    ap.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    ap.add_argument("--print-space", action="store_true", help="print the validated search and exit")
    ap.add_argument("overrides", nargs="*", help="tune.num_samples=8, search.optim.lr={loguniform: [1e-4, 1e-2]}, "
                                                  "optim.epochs=6 ...")
    return ap.parse_args(argv)


def spec_or_exit(args: argparse.Namespace) -> TuneSpec:
    try:
        return load_tune_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# --------------------------------------------------------------------------- resources

def trial_resources(spec: TuneSpec) -> dict[str, float]:
    """What one trial holds: its driver function plus the training workers' bundles."""
    sc = spec.base.scaling
    need = dict(spec.tune.resources)
    need["CPU"] = need.get("CPU", 0.0) + sc.num_workers * sc.cpus_per_worker
    if sc.use_gpu:
        need["GPU"] = need.get("GPU", 0.0) + sc.num_workers * sc.gpus_per_worker
    for k, v in sc.resources_per_worker.items():
        need[k] = need.get(k, 0.0) + sc.num_workers * v
    return need


def derive_max_concurrent(cluster: dict[str, float], need: dict[str, float]) -> int:
    """Trials that fit the cluster at once (the scarcest resource decides), at least 1."""
    fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    return max(1, min(fits)) if fits else 1


def init_ray(spec: TuneSpec, address: Optional[str]) -> None:
    """Local Ray gets enough logical CPUs for ``max_concurrent`` trials (their drivers mostly wait)."""
    per_trial = trial_resources(spec)["CPU"]
    init_train_ray(spec.base, address, min_cpus=math.ceil(per_trial * max(1, spec.tune.max_concurrent)))


# --------------------------------------------------------------------------- the trial

def make_trainable(spec: TuneSpec, *, parent_run_id: Optional[str], trials_storage: str):
    """The Tune function trainable: one trial = one ``TorchTrainer.fit()`` of base + sampled overrides."""

    def sta_trial(params: dict[str, Any]) -> None:
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        trial_id = tune.get_context().get_trial_id()
        cfg = trial_config(spec, params)
        cfg.tracking.run_name = f"{spec.tune.name}-{trial_id}"
        cfg.tracking.tags = {**cfg.tracking.tags, "tune.trial_id": trial_id, "tune.search": spec.tune.name,
                             **({"tune.variant": str(params[VARIANT_KEY])} if VARIANT_KEY in params else {})}
        # The run name is the trial id, stable across a restore: Ray Train then resumes the trial's
        # own latest checkpoint (and with it the same MLflow child run).
        trainer = build_trainer(cfg, run_name=trial_id, storage_path=trials_storage, parent_run_id=parent_run_id,
                                callbacks=[TuneReportCallback()])
        trainer.fit()

    return sta_trial


def trial_config(spec: TuneSpec, params: dict[str, Any]) -> Config:
    return apply_overrides(spec.base, trial_overrides(spec, params))


# --------------------------------------------------------------------------- MLflow parent run

def parent_params(spec: TuneSpec) -> dict[str, Any]:
    out: dict[str, Any] = {f"search.{k}": v for k, v in spec.source["search"].items()}
    out.update({f"tune.{k}": v for k, v in spec.source["tune"].items()})
    out["base.config"] = spec.source["base"]["config"]
    out.update({f"base.{k}": v for k, v in spec.source["base"]["overrides"].items()})
    out.update({f"base.cli.{i}": v for i, v in enumerate(spec.source["base"]["cli"])})
    out["tune.num_trials"] = num_trials(spec)
    return out


def start_parent_run(spec: TuneSpec, uri: str, exp_path: str, *, reuse: bool) -> str:
    """The search's parent run: on a restore, the one tagged with this experiment path; else a new one."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from pipeline import redact, tracking  # imports mlflow (~2.4 s): kept off the --help / config-check path

    client = MlflowClient(uri)
    exp_id = tracking_store.ensure_experiment(uri, tracking_store.experiment_name(spec.base))
    found = reuse and client.search_runs([exp_id], filter_string=f"tags.`{PATH_TAG}` = '{exp_path}'",
                                         order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = tracking.run_tags(spec.base, {PATH_TAG: exp_path, "tune.search": spec.tune.name,
                                         "tune.search_alg": spec.tune.search_alg})
    run = client.create_run(exp_id, run_name=spec.tune.name, tags=tags)
    params = [Param(k, v) for k, v in redact.safe_params(parent_params(spec)).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    return run.info.run_id


# --------------------------------------------------------------------------- results

def trial_rows(spec: TuneSpec, results) -> list[dict[str, Any]]:
    """One row per trial: params, epochs run, status, last and best metric, MLflow child run."""
    metric, sign = spec.tune.metric, (1 if spec.tune.mode == "max" else -1)
    rows = []
    for r in results:
        params = dict(r.config or {})
        m = r.metrics or {}
        epochs_cfg = trial_config(spec, params).optim.epochs
        done = int(m.get("epoch") or 0)
        history = []
        df = r.metrics_dataframe
        if df is not None and metric in df:
            history = [float(v) for v in df[metric].tolist() if is_finite_number(v)]
        status = "error" if r.error else ("finished" if done >= epochs_cfg else "stopped")
        last = m.get(metric)
        rows.append({"trial_id": m.get("trial_id") or Path(r.path).name, **params, "status": status,
                     "epochs": done, metric: last if is_finite_number(last) else None,
                     f"best_{metric}": (sign * max(sign * v for v in history)) if history else None,
                     "rank1": m.get("rank1"), "mlflow_run_id": m.get("mlflow_run_id") or None,
                     "path": r.path})
    return rows


def close_child_runs(uri: str, rows: list[dict[str, Any]]) -> None:
    """Children of trials ASHA stopped (or that failed) never reach the worker's end(): close them here."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for row in rows:
        rid = row.get("mlflow_run_id")
        if not rid:
            continue
        client.set_tag(rid, "tune.status", row["status"])  # rewritten when a restored trial finishes
        if row["status"] != "finished" and client.get_run(rid).info.status == "RUNNING":
            client.set_terminated(rid, status="KILLED" if row["status"] == "stopped" else "FAILED")


def best_row(spec: TuneSpec, rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """Best last-epoch metric among trials that ran their full schedule (else among all reporting)."""
    metric, sign = spec.tune.metric, (1 if spec.tune.mode == "max" else -1)
    scored = [r for r in rows if is_finite_number(r.get(metric))]
    finished = [r for r in scored if r["status"] == "finished"]
    pool = finished or scored
    return max(pool, key=lambda r: sign * r[metric]) if pool else None


def best_config(spec: TuneSpec, row: dict[str, Any]) -> Config:
    """The winning trial's full config, cleaned of per-trial tracking names, ready for pipeline.train."""
    cfg = trial_config(spec, {k: row[k] for k in spec.search})
    cfg.tracking.run_name = None
    return cfg


def write_table(rows: list[dict[str, Any]], columns: list[str], csv_path: Path, md_path: Path) -> None:
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")


def finish(spec: TuneSpec, results, *, uri: str, parent_run_id: str, out_dir: Path) -> dict[str, Any]:
    """Trials table, sweep plot and best config; all logged to the parent run, which is then closed."""
    from mlflow import MlflowClient

    from pipeline import viz  # matplotlib: ~0.6 s, only for the sweep plot at the end

    client = MlflowClient(uri)
    out_dir.mkdir(parents=True, exist_ok=True)
    metric = spec.tune.metric
    rows = trial_rows(spec, results)
    close_child_runs(uri, rows)
    params = list(spec.search)
    columns = ["trial_id", *params, "status", "epochs", metric, f"best_{metric}", "rank1", "mlflow_run_id"]
    write_table(rows, columns, out_dir / "trials.csv", out_dir / "trials.md")
    for name in ("trials.csv", "trials.md"):
        client.log_artifact(parent_run_id, str(out_dir / name))
    summary: dict[str, Any] = {"num_trials": len(rows), "out_dir": str(out_dir), "parent_run_id": parent_run_id,
                               "tracking_uri": uri, "rows": rows,
                               "stopped": sum(r["status"] == "stopped" for r in rows),
                               "errors": sum(r["status"] == "error" for r in rows)}
    try:
        summary["sweep_png"] = str(viz.plot_sweep(rows, params, metric, out_dir / "sweep.png",
                                                  title=f"{spec.tune.name}: {metric} of {len(rows)} trials"))
        client.log_artifact(parent_run_id, summary["sweep_png"])
    except ValueError as exc:  # no trial reported the metric: nothing to draw
        log.warning("sweep plot skipped: %s", exc)
    best = best_row(spec, rows)
    for k in ("stopped", "errors", "num_trials"):
        client.log_metric(parent_run_id, f"tune.{k}", summary[k])
    if best is not None:
        cfg = best_config(spec, best)
        path = out_dir / "best_config.yaml"
        path.write_text(f"# best of {len(rows)} trials of {spec.tune.name}: {metric} = {best[metric]:.4f} "
                        f"(trial {best['trial_id']})\n" + cfg.to_yaml())
        load_config(path)  # what we hand out must load back
        client.log_artifact(parent_run_id, str(path))
        client.log_metric(parent_run_id, f"best_{metric}", float(best[metric]))
        for k, v in {"best_trial": best["trial_id"], "best_run_id": best.get("mlflow_run_id") or "",
                     **{f"best.{p}": json.dumps(best[p]) for p in params}}.items():
            client.set_tag(parent_run_id, k, v)
        summary.update(best=best, best_config=str(path))
    client.set_terminated(parent_run_id, status="FINISHED" if summary["errors"] < len(rows) else "FAILED")
    return summary


# --------------------------------------------------------------------------- driver

def experiment_location(spec: TuneSpec) -> tuple[str, Any, str]:
    """``(path for Ray, pyarrow fs or None, URL)`` of ``storage_path/name``: Ray gets the path + fs
    (an S3 endpoint from ``AWS_ENDPOINT_URL`` needs its own fs), people and trials get the URL."""
    path, fs = ray_storage(spec.tune.storage_path)
    root = spec.tune.storage_path if urls.is_s3(spec.tune.storage_path) else path
    return f"{path}/{spec.tune.name}", fs, urls.join(root, spec.tune.name)


def output_dir(spec: TuneSpec) -> Path:
    if spec.tune.out:
        return Path(spec.tune.out).resolve()
    if urls.is_s3(spec.tune.storage_path):
        return Path("runs", "tune-out", spec.tune.name).resolve()
    return Path(experiment_location(spec)[0])


def run_search(spec: TuneSpec, *, resume: Optional[bool] = None, address: Optional[str] = None) -> dict[str, Any]:
    """Run (or restore) the search and write its outputs. ``resume``: None = restore when possible."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    s = spec.tune
    # One absolute store for the driver and every trial's rank 0 (workers run in other directories).
    uri = tracking_store.resolve_tracking_uri(spec.base.tracking.uri)
    spec.base.tracking.uri = uri
    absolute_paths(spec.base)  # trial drivers and workers run in other directories
    prepare_data(spec.base)  # once, before trials race to generate the same synthetic set
    check_pretrained(spec.base)
    ray_path, fs, exp_url = experiment_location(spec)
    can_restore = tune.Tuner.can_restore(ray_path, storage_filesystem=fs)
    if resume and not can_restore:
        raise ConfigError(f"--resume: no restorable search at {exp_url}")
    if resume is False and can_restore:
        raise ConfigError(f"--fresh: a search already exists at {exp_url} (pick another tune.name)")
    restoring = bool(can_restore and resume is not False)

    init_ray(spec, address)
    parent_run_id = start_parent_run(spec, uri, exp_url, reuse=restoring)
    trainable = make_trainable(spec, parent_run_id=parent_run_id, trials_storage=f"{exp_url}/trials")
    trainable = tune.with_resources(trainable, s.resources)
    if s.scheduler == "none" and spec.base.eval.every_epochs != 1:
        # Without ASHA the metric may come only with the final evaluation: epochs without it are
        # fine for Tune's bookkeeping (validation already requires every-epoch eval for ASHA).
        set_env("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    if restoring:
        print(f"restoring search {exp_url} (finished trials are kept)")
        tuner = tune.Tuner.restore(ray_path, trainable=trainable,
                                   resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    else:
        need = trial_resources(spec)
        max_conc = s.max_concurrent or derive_max_concurrent(ray.cluster_resources(), need)
        if s.search_alg == "optuna":
            from ray.tune.search import ConcurrencyLimiter
            from ray.tune.search.optuna import OptunaSearch

            search_alg = ConcurrencyLimiter(OptunaSearch(seed=s.seed), max_concurrent=max_conc)
        else:
            # The variant generator enforces the limit itself (Tune ignores max_concurrent_trials for it).
            search_alg = BasicVariantGenerator(random_state=s.seed, max_concurrent=max_conc)
        scheduler = FIFOScheduler()
        if s.scheduler == "asha":
            # stop_last_trials=False: a trial reaching max_t finishes its own run (final eval,
            # model export, MLflow run closed) instead of being killed at its last report.
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=s.max_t or spec.base.optim.epochs,
                                      grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                                      stop_last_trials=False)
        print(f"search {s.name}: {num_trials(spec)} trials, {max_conc} at a time, each {need}")
        tuner = tune.Tuner(
            trainable, param_space=to_ray_space(spec),
            tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, num_samples=s.num_samples,
                                        search_alg=search_alg, scheduler=scheduler),
            run_config=tune.RunConfig(name=s.name, storage_path=ray_path.rsplit("/", 1)[0], storage_filesystem=fs,
                                      verbose=1),
        )
    t = time.perf_counter()
    results = tuner.fit()
    summary = finish(spec, results, uri=uri, parent_run_id=parent_run_id, out_dir=output_dir(spec))
    summary.update(seconds=time.perf_counter() - t, experiment=exp_url, restored=restoring)
    return summary


def format_summary(spec: TuneSpec, s: dict[str, Any]) -> str:
    metric = spec.tune.metric
    lines = ["", f"== search {spec.tune.name}: {s['num_trials']} trials in {s['seconds'] / 60:.1f} min "
                 f"({s['stopped']} stopped early, {s['errors']} failed)"]
    if s.get("best"):
        b = s["best"]
        lines.append(f"   best {metric} {b[metric]:.4f} (trial {b['trial_id']}): "
                     + ", ".join(f"{k}={b[k]}" for k in spec.search))
        lines.append(f"   best config: {s['best_config']}   (python -m pipeline.train --config {s['best_config']})")
    lines += [f"   trials table: {s['out_dir']}/trials.md", f"   search directory: {s['experiment']}",
              f"   MLflow parent run {s['parent_run_id']} in {s['tracking_uri']}"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    spec = spec_or_exit(args)
    if args.print_space:
        print(yaml.safe_dump(spec.source, sort_keys=False), end="")
        return {}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    resume = True if args.resume else (False if args.fresh else None)
    try:
        summary = run_search(spec, resume=resume, address=args.address)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        shutdown_ray()
    print(format_summary(spec, summary))
    return summary


if __name__ == "__main__":
    out = main()
    sys.exit(1 if out and out.get("errors") == out.get("num_trials") else 0)
