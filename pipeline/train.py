"""``python -m pipeline.train [--config FILE] [key=value ...]``: STA training on Ray Train + DeepSpeed.

With no arguments it runs the embedded default: generates the synthetic set if absent, packs it into
local shards, starts a local Ray, trains 2 CPU workers, evaluates, logs to ./mlflow.db and prints a
summary. On a cluster the same command runs under ``ray job submit`` (Ray's address comes from
``RAY_ADDRESS``). Config errors exit with code 2 before Ray starts.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from pipeline import driver, resume, s3_errors, storage, tracking_store, urls
from pipeline.checkpoint import ray_storage
from pipeline.config import Config, ConfigError, load_config
from pipeline.epoch import batches_per_epoch
from pipeline.model_io import check_pretrained
from pipeline.pack import pack
from pipeline.run_summary import failed_result, format_summary, summarize
from pipeline.shards import read_manifest
from pipeline.synthetic import generate, generator_params, read_marker
from sta_model.threads import usable_cpus

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "synthetic.yaml"
log = logging.getLogger("pipeline.train")


def parse_args(argv: Optional[list[str]] = None, *, prog: str = "pipeline.train") -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="YAML config (default: configs/synthetic.yaml)")
    ap.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    ap.add_argument("--resume", help="run directory (storage_path/name) or checkpoint URI to continue from")
    ap.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    ap.add_argument("--verbose", action="store_true", help="keep Ray Train's per-report log lines")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 data.clip_len=8")
    return ap.parse_intermixed_args(argv)  # overrides may come before or after options


def config_or_exit(args: argparse.Namespace) -> Config:
    """Load + validate; a bad config prints one line naming the key and exits 2 (before Ray starts)."""
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    try:
        return load_config(path, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def prepare_data(cfg: Config) -> dict[str, Any]:
    """Make sure ``data.shards`` holds a dataset; for the synthetic default, generate and pack it."""
    check_stores(cfg)
    try:  # a manifest that is not one, or a store failing now: one line, exit 2
        found = storage.exists(urls.join(cfg.data.shards, "manifest.json"))
        manifest = read_manifest(cfg.data.shards).raw if found else None
    except (s3_errors.StorageError, ValueError) as exc:
        raise ConfigError(f"data.shards: {exc}") from None
    stale = synthetic_mismatch(cfg, manifest) if manifest else None
    if manifest and not stale:
        return manifest
    if stale:
        print(f"data.synthetic differs from the data at {cfg.data.shards} ({stale}): regenerating it")
    if cfg.data.dataset != "synthetic" or not cfg.data.prepare:
        raise ConfigError(f"data.shards: no dataset at {cfg.data.shards} (no manifest.json); pack it first: "
                          f"python -m pipeline.pack --dataset {cfg.data.dataset} --root <raw> --out {cfg.data.shards}")

    s = cfg.data.synthetic
    t = time.perf_counter()
    generate(cfg.data.root, num_ids=s.num_ids, num_test_ids=s.num_test_ids, tracklets_per_id=s.tracklets_per_id,
             frames_per_tracklet=(s.min_frames, s.max_frames), height=s.height, width=s.width,
             num_cameras=s.num_cameras, occlusion_prob=s.occlusion_prob, seed=s.seed)
    pack("synthetic", cfg.data.root, cfg.data.shards, progress=False)
    print(f"prepared synthetic dataset: {cfg.data.root} -> {cfg.data.shards} ({time.perf_counter() - t:.1f}s)")
    return read_manifest(cfg.data.shards).raw


def check_stores(cfg: Config, resume: Optional[str] = None) -> None:
    """``data.shards``, ``checkpoint.storage_path`` and ``--resume`` are stores this process can use
    (scheme, bucket, endpoint, credentials; :func:`pipeline.s3_errors.check`), else a ``ConfigError``
    naming the key: asked once, in seconds, before anything lists or reads them."""
    for key, url in (("data.shards", cfg.data.shards), ("checkpoint.storage_path", cfg.checkpoint.storage_path),
                     ("--resume", resume)):
        try:
            if url:
                s3_errors.check(url)
        except s3_errors.StorageError as exc:
            raise ConfigError(f"{key}: {exc}") from None


def synthetic_mismatch(cfg: Config, manifest: dict) -> Optional[str]:
    """For a synthetic dataset the pipeline prepares: the ``data.synthetic`` keys that differ from the
    generator parameters the shards were made with (the manifest's, else the raw root's marker), as
    ``"num_ids 8 -> 10"``; None when they agree or nothing says what they were."""
    if cfg.data.dataset != "synthetic" or not cfg.data.prepare:
        return None
    s = cfg.data.synthetic
    want = generator_params(num_ids=s.num_ids, num_test_ids=s.num_test_ids, tracklets_per_id=s.tracklets_per_id,
                            frames_per_tracklet=(s.min_frames, s.max_frames), height=s.height, width=s.width,
                            num_cameras=s.num_cameras, occlusion_prob=s.occlusion_prob, seed=s.seed)
    have = manifest.get("synthetic") or (read_marker(cfg.data.root) or {}).get("params")
    if not have:
        return None
    return ", ".join(f"{k} {have.get(k)} -> {v}" for k, v in want.items() if have.get(k) != v) or None


def init_ray(cfg: Config, address: Optional[str] = None, *, min_cpus: int = 0) -> None:
    """Attach to ``address`` / ``$RAY_ADDRESS``, else start a local Ray with enough logical CPUs.

    No environment travels in a runtime env: under ``ray job submit`` the job's own ``env_vars``
    reach its workers (re-forwarding the same keys is a merge error in ``ray.init``, whose message
    prints their values), on a cluster the workers get credentials from their node or pod, and a
    local Ray's processes inherit this process's environment. Ray logs runtime envs in plain text,
    so secrets must never be in one.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # Logical CPUs for every training worker (DataLoader processes are not Ray tasks) and its driver.
    need = max(int(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker) + 1, min_cpus)
    asked, have = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker, usable_cpus(omp=False)
    if asked > have:  # Ray is given the CPUs anyway (logical CPUs); the workers then time-share them
        print(f"warning: scaling.num_workers={cfg.scaling.num_workers} x scaling.cpus_per_worker="
              f"{cfg.scaling.cpus_per_worker:g} = {asked:g} CPUs, but this machine has {have} usable: "
              f"the workers will share them and run slower", file=sys.stderr)
    # The dashboard stays on (loopback only): Ray Train's placement-group cleanup needs its state API,
    # and finds it by auto-detection, which fails when another local Ray runs on the machine
    # ("multiple active Ray instances"); pin the port and point every process of this cluster at it
    # (set before ray.init, so the raylet and its workers inherit it).
    port = free_port()
    set_env("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}")
    ray.init(num_cpus=max(os.cpu_count() or 1, need), dashboard_host="127.0.0.1", dashboard_port=port,
             include_dashboard=True)


_ENV_SAVED: dict[str, Optional[str]] = {}


def set_env(key: str, value: str) -> None:
    """Set a process env var for this Ray session; :func:`shutdown_ray` puts the old value back."""
    _ENV_SAVED.setdefault(key, os.environ.get(key))
    os.environ[key] = value


def shutdown_ray() -> None:
    """Stop the local Ray and undo the env changes (a later Ray in this process must not see them)."""
    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()
    for key, value in _ENV_SAVED.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _ENV_SAVED.clear()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_trainer(cfg: Config, *, run_name: str, storage_path: str, resume: Optional[str] = None,
                  parent_run_id: Optional[str] = None, callbacks: Optional[list] = None,
                  mlflow_run_id: Optional[str] = None, verbose: bool = False):
    """The ``TorchTrainer`` for one run (also used per trial by ``pipeline.tune``).

    Args:
        mlflow_run_id: the run the driver opened (:func:`pipeline.driver.open_run`); rank 0 logs into it.
        verbose: keep Ray Train's per-report log lines (default: one console line per epoch).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.worker import train_loop_per_worker  # deepspeed + ray.train: ~1.4 s, kept off the --help path

    absolute_paths(cfg)
    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker, **sc.resources_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    path, fs = ray_storage(storage_path)
    # Workers must log to the driver's store even with another cwd: resolve it here.
    cfg.tracking.uri = tracking_store.resolve_tracking_uri(cfg.tracking.uri)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "resume": resume, "parent_run_id": parent_run_id,
                           "mlflow_run_id": mlflow_run_id, "run_name": run_name, "verbose": verbose},
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=path, storage_filesystem=fs, callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.failure.max_failures)),
    )


def absolute_paths(cfg: Config) -> Config:
    """Relative local paths are relative to the driver's cwd; Ray workers run elsewhere, so pin them."""
    def fix(url: Optional[str]) -> Optional[str]:
        if not url or "://" in url or os.path.isabs(url):
            return url
        return os.path.abspath(url)

    cfg.data.root, cfg.data.shards = fix(cfg.data.root), fix(cfg.data.shards)
    cfg.checkpoint.storage_path = fix(cfg.checkpoint.storage_path)
    cfg.model.pretrained = fix(cfg.model.pretrained)
    return cfg


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = config_or_exit(args)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return {}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_name = cfg.tracking.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        driver.check_job_paths(cfg)
        driver.preflight_tracking(cfg)  # the MLflow store answers (5 s) and is created/migrated once, here
        check_stores(cfg, args.resume)
        # Where the run writes and what it restores (pipeline.resume): decided and checked before Ray.
        plan = resume.plan_run(args.resume, cfg, run_name=run_name)
        manifest = prepare_data(cfg)
        check_pretrained(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if plan.mode != "new":
        print(f"resume: {plan.describe()}")
        for change in plan.changed:  # also kept on the MLflow run as param_changed.* tags
            print(f"resume: changed {change}")
    summary = fit_tracked(cfg, args, run_name=plan.run_name, storage_path=plan.storage_path,
                          resume=plan.checkpoint if plan.mode == "fork" else None, manifest=manifest)
    print(format_summary(summary))
    return summary


def fit_tracked(cfg: Config, args: argparse.Namespace, *, run_name: str, storage_path: str,
                resume: Optional[str], manifest: dict) -> dict[str, Any]:
    """Open the MLflow run in the driver, train, and close the run whatever happens.

    The run is named after the run directory and tagged with provenance before any worker starts;
    after ``fit`` (or Ctrl-C, or a failure that killed rank 0) the driver marks it FINISHED, FAILED
    or KILLED if rank 0 did not, tags the exports, and removes this run's temporary checkpoint dirs.

    Args:
        cfg: validated config; ``tracking.uri`` was checked by :func:`pipeline.driver.preflight_tracking`.
        args: CLI arguments (``--address``, ``--verbose``).
        run_name: the run directory's name under ``storage_path`` (also the MLflow run name).
        storage_path: where Ray Train keeps the run directory.
        resume: checkpoint URI to start from (a new run), or None.
        manifest: the dataset manifest (counts for the summary).
    """
    absolute_paths(cfg)
    # At least one per-step point per epoch (the workers cap it too); here, so the params logged
    # below already hold the value in force.
    ids = int(manifest["splits"]["train"]["num_identities"])
    cfg.tracking.log_every_steps = min(cfg.tracking.log_every_steps, batches_per_epoch(cfg, ids, 1))
    root = storage_path if "://" in storage_path else os.path.abspath(storage_path)
    run_dir = f"{root.rstrip('/')}/{run_name}"
    run_id = None
    if cfg.tracking.enabled:
        try:  # before Ray starts: an unreachable server is one line and exit 2, not a 13-minute hang
            exp_id = driver.preflight_tracking(cfg)
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        run_id = driver.open_run(cfg, run_name=run_name, run_dir=run_dir, experiment_id=exp_id)
    status = "FAILED"
    interrupted, restore_sigint = _watch_sigint()
    try:
        init_ray(cfg, getattr(args, "address", None))
        import ray.train  # after init_ray: importing Ray is kept off the --help / config-check path

        if run_id:
            driver.set_run_tags(cfg, run_id, {"ray.job_id": ray.get_runtime_context().get_job_id()})
        trainer = build_trainer(cfg, run_name=run_name, storage_path=storage_path, resume=resume,
                                mlflow_run_id=run_id, verbose=bool(getattr(args, "verbose", False)))
        t = time.perf_counter()
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as exc:  # Ray Train V2 raises the run's error from fit()
            result = failed_result(exc, run_dir)
        status = "FAILED" if result.error else "FINISHED"
        summary = summarize(cfg, result, manifest, time.perf_counter() - t)
        summary["mlflow_run_id"] = summary.get("mlflow_run_id") or run_id
        if run_id:
            exports = {f"sta.export.{k}": f"{run_dir}/{k}" for k in ("best", "final")
                       if storage.exists(f"{run_dir}/{k}/model.pt")}
            driver.set_run_tags(cfg, run_id, exports)
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        restore_sigint()
        if interrupted.is_set():  # Ray may turn the interrupt into a failed result or another error
            status = "KILLED"
        final = driver.close_run(cfg, run_id, status)
        if final and final != "FINISHED":
            print(f"MLflow run {run_id} marked {final}", file=sys.stderr)
        driver.cleanup_ckpt_tmp(run_name)


def _watch_sigint():
    """``(event, restore)``: the event is set when SIGINT (Ctrl-C) reaches the driver; ``restore()``
    undoes what this set up.

    Ray Train's ``fit`` installs its own SIGINT handler (a graceful abort of the controller) and then
    surfaces the interrupt as a dead controller actor, not ``KeyboardInterrupt``; the MLflow run must
    still be closed KILLED, not FAILED. So every SIGINT handler installed while training runs, Ray's
    included, is wrapped to set the event first and then do exactly what it did.
    """
    seen = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return seen, lambda: None  # handlers can only be set from the main thread (e.g. a Tune trial)
    real_signal, previous = signal.signal, signal.getsignal(signal.SIGINT)

    def wrap(handler):
        if not callable(handler):
            return handler

        def on_sigint(signum, frame):
            seen.set()
            return handler(signum, frame)
        return on_sigint

    def install(signum, handler):
        return real_signal(signum, wrap(handler) if signum == signal.SIGINT else handler)

    real_signal(signal.SIGINT, wrap(previous if previous is not None else signal.default_int_handler))
    signal.signal = install

    def restore() -> None:
        signal.signal = real_signal
        real_signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)

    return seen, restore


if __name__ == "__main__":
    summary = main()
    sys.exit(1 if summary.get("error") else 0)
