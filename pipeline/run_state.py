"""A rank's run state and the training loop's phase helpers, called by
:func:`pipeline.worker.train_loop_per_worker`: :func:`restore` (the newest complete checkpoint of the
run), :func:`start_tracking` (rank 0's MLflow run), :func:`end_epoch` (checkpoint, then evaluate, then
one ``ray.train.report``, then :func:`publish` of the epoch's metrics) and :func:`finish` (``final/``
export, figures, MLflow model).
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

import ray
import ray.train
import torch
import torch.distributed as dist

from pipeline import checkpoint as ckpt_lib
from pipeline import distributed_eval, driver, model_io, run_artifacts, storage, tracking, urls
from pipeline import resume as resume_lib
from pipeline.config import Config
from pipeline.epoch import NonFiniteLossError

log = logging.getLogger("pipeline.run_state")



NO_RETRY = "no_retry.json"  # in the run directory: why this Ray job must not train again


def mark_no_retry(run_dir: str, exc: Exception) -> None:
    """Record in the run directory that this job stopped for a reason no retry can fix (every rank
    writes the same record; a failed write only loses the shortcut, not the error)."""
    record = {"job_id": ray.get_runtime_context().get_job_id(), "error": str(exc)}
    try:
        storage.write_bytes(urls.join(run_dir, NO_RETRY), json.dumps(record).encode())
    except Exception as write_exc:  # noqa: BLE001 - the original error is what matters
        log.warning("could not record %s: %s", NO_RETRY, write_exc)


def refuse_retry(run_dir: str) -> None:
    """Raise the recorded error again when Ray restarts a job that :func:`mark_no_retry` stopped.

    Ray Train retries every worker error up to ``failure.max_failures``; with this, a retry fails at
    once instead of training from the last checkpoint into the same non-finite loss. A new
    ``pipeline.train`` (another Ray job: ``--resume`` after lowering the LR) is not affected.
    """
    try:
        record = json.loads(storage.read_bytes(urls.join(run_dir, NO_RETRY)))
    except Exception:  # noqa: BLE001 - none recorded (the usual case) or unreadable: train
        return
    if record.get("job_id") == ray.get_runtime_context().get_job_id():
        raise NonFiniteLossError(f"{record.get('error')} [not retried]")


@dataclass
class RunState:
    """What one rank carries from epoch to epoch (the rest is in the config)."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    num_classes: int
    run_dir: str  # URL of the run directory (exports, and the checkpoints a restart looks for)
    run_name: str
    num_nodes: int = 1
    meta: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "global_step": 0, "best": None,
                                                          "mlflow_run_id": None})
    best: Optional[float] = None
    last_eval: dict[str, Any] = field(default_factory=dict)
    # Rank 0's metrics (values, step) since the last persisted checkpoint; see publish().
    held: list = field(default_factory=list)

    def best_and_start(self) -> int:
        """The restored best metric and epoch to start at."""
        self.best = self.meta.get("best")
        return int(self.meta["epoch"])


def count_nodes(world: int) -> int:
    """How many nodes the ranks landed on (reported once; the multi-node test checks the spread)."""
    node = ray.get_runtime_context().get_node_id()
    nodes: list = [node] * world
    if world > 1:
        dist.all_gather_object(nodes, node)
    return len(set(nodes))


def restore(engine, run: RunState, *, resume: Optional[str]) -> dict[str, Any]:
    """Load the newest complete checkpoint of this run's directory into ``engine`` (after a Ray
    worker-failure restart, or ``--resume`` of the run), else the checkpoint of another run that
    ``--resume`` named (a new run: its MLflow run id is dropped), else nothing. Returns its meta.

    The run directory is searched rather than trusting ``ray.train.get_checkpoint()``: Ray's snapshot is
    missing after Ctrl-C, and may name a checkpoint whose upload never finished. Every rank reaches
    the same choice (same listing, same manifests); the files are verified again after download.

    Args:
        engine: the DeepSpeed engine.
        run: this rank's state (run directory, rank).
        resume: a checkpoint URL of another run (``--resume <checkpoint>``), or None.
    """
    url, epoch, skipped = resume_lib.newest_complete(run.run_dir)
    fork = url is None and resume is not None
    src = url or resume
    if src is None:
        return {}
    with tempfile.TemporaryDirectory(prefix="sta-restore-") as tmp:
        local = src
        if urls.is_s3(src):
            storage.download_dir(src, tmp)
            local = tmp
        meta = ckpt_lib.load(engine, local)  # verifies the manifests, reads weights-only
    if fork:
        meta["mlflow_run_id"] = None  # a checkpoint of another run starts a new run
    if run.rank == 0:
        log.info("restored %s: epoch %d, global step %d%s", src, int(meta.get("epoch", 0)), engine.global_steps,
                 f" (skipped incomplete {', '.join(n for n, _ in skipped)})" if skipped else "")
    return meta


def start_tracking(run: RunState, loop_config: dict[str, Any], *, precision: str, ds_cfg: dict):
    """Rank 0's MLflow handle on the run the driver opened (or the checkpoint's run); None elsewhere.

    Params are logged on every start: on a continued run only new keys are added and changed values
    become ``param_changed.*`` tags (MLflow params cannot be overwritten).
    """
    if run.rank != 0:
        return None
    cfg, meta = run.cfg, run.meta
    tracker = tracking.Tracker(cfg)
    new_run = not meta.get("mlflow_run_id")
    run_id = tracker.start(cfg, run_id=loop_config.get("mlflow_run_id") or meta.get("mlflow_run_id"),
                           resumed=not new_run, parent_run_id=loop_config.get("parent_run_id"),
                           extra_tags={"precision": precision, "world_size": str(run.world),
                                       "num_nodes": str(run.num_nodes), **run_artifacts.pretrained_tags(cfg)})
    meta["mlflow_run_id"] = run_id
    tracker.log_params(cfg)
    if new_run:
        tracker.log_config(cfg)
        tracker.log_text(json.dumps(ds_cfg, indent=1), "deepspeed_config.json")
    return tracker


def end_epoch(engine, run: RunState, tracker, epoch: int, metrics: dict[str, Any], print_epoch) -> None:
    """After training epoch ``epoch`` (1-based): checkpoint, then evaluate, then report both.

    The checkpoint is written before evaluation, so an evaluation error never loses the epoch: the
    checkpoint is still reported, ``final/`` is still exported after the last epoch, and then the
    error is raised (the run fails, naming it).
    """
    cfg = run.cfg
    is_last = epoch == cfg.optim.epochs
    metrics.update(epoch=epoch, num_nodes=run.num_nodes, global_step=int(engine.global_steps))
    run.meta.update(epoch=epoch, global_step=int(engine.global_steps), best=run.best, num_classes=run.num_classes)
    ckpt_dir = None
    if epoch % cfg.checkpoint.every_epochs == 0 or is_last:
        # A fresh dir per report: Ray deletes it once uploaded.
        ckpt_dir = tempfile.mkdtemp(prefix=driver.ckpt_tmp_prefix(run.run_name, run.rank) + f"e{epoch:04d}-")
        ckpt_lib.save(engine, ckpt_dir, rank=run.rank, world_size=run.world, cfg=cfg, meta=run.meta)
    ev = cfg.eval.every_epochs
    failed: Optional[Exception] = None
    if is_last or (ev and epoch % ev == 0):
        try:
            evaluate_and_export_best(engine, run, metrics)
        except Exception as exc:  # the epoch is kept whatever evaluation does; raised after the report
            failed = exc
    if tracker is not None:
        run.held.append((tracking.grouped_metrics(metrics), epoch))
        print_epoch(epoch, metrics)
    report = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    report["mlflow_run_id"] = run.meta["mlflow_run_id"] or ""
    if ckpt_dir is not None:
        # SYNC: when report returns the checkpoint is in storage, so what publish() sends is what a
        # resume keeps (ASYNC let MLflow run ahead of the checkpoints, and a resume logged epochs twice).
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir),
                         checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}",
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.SYNC,
                         delete_local_checkpoint_after_upload=True)
        publish(run, tracker)
    else:
        ray.train.report(report)
    if failed is not None:
        if is_last:
            export_final(engine, run)
        raise RuntimeError(f"evaluation after epoch {epoch} failed ({type(failed).__name__}: {failed}); "
                           f"checkpoint_epoch_{epoch:04d}{' and final/' if is_last else ''} kept") from failed


def publish(run: RunState, tracker) -> None:
    """Send rank 0's held metrics to MLflow.

    Metrics are held from one persisted checkpoint to the next, so the MLflow history never runs
    ahead of what ``--resume`` or a Ray restart continues from: an interrupted epoch is not logged,
    and the epoch trained again after a resume is logged once. The console line is not held.
    """
    if tracker is not None:
        tracker.log_metric_rows(run.held)
    run.held.clear()


def evaluate_and_export_best(engine, run: RunState, metrics: dict[str, Any]) -> None:
    """Distributed evaluation into ``metrics``; a new best (decided on rank 0, shared so every rank
    agrees) is exported to ``<run>/best``."""
    cfg = run.cfg
    engine.eval()
    res = distributed_eval.evaluate(lambda x: engine(x), cfg, embed_dim=cfg.model.embed_dim, rank=run.rank,
                              world_size=run.world, device=run.device, dtype=run.dtype)
    if res is not None:
        run.last_eval = res
        metrics.update({k: v for k, v in res.items() if not k.endswith("cmc")})
    flag = torch.zeros(1, device=run.device)
    if run.rank == 0 and cfg.checkpoint.best_metric in metrics:
        value = metrics[cfg.checkpoint.best_metric]
        if run.best is None or value > run.best:
            run.best = value
            flag += 1
    if run.world > 1:
        dist.broadcast(flag, 0)
    run.meta["best"] = run.best
    if flag.item():
        state = model_io.full_state_dict(engine)  # collective under ZeRO-3
        if run.rank == 0:
            model_io.export_model(state, cfg, f"{run.run_dir}/best", num_classes=run.num_classes,
                                  metrics={k: v for k, v in metrics.items() if isinstance(v, float)},
                                  provenance={"mlflow_run_id": run.meta["mlflow_run_id"], "run_dir": run.run_dir})


def export_final(engine, run: RunState) -> dict[str, torch.Tensor]:
    """``<run>/final``: the whole model (every rank joins the gather under ZeRO-3); returns its state."""
    state = model_io.full_state_dict(engine)
    if run.rank == 0:
        final_metrics = {k: v for k, v in run.last_eval.items() if isinstance(v, float)}
        model_io.export_model(state, run.cfg, f"{run.run_dir}/final", num_classes=run.num_classes,
                              metrics=final_metrics,
                              provenance={"mlflow_run_id": run.meta["mlflow_run_id"], "run_dir": run.run_dir})
    return state


def finish(engine, run: RunState, tracker, *, trained: bool) -> None:
    """Final export, then (rank 0) figures, the MLflow model and the run's end.

    A restart that found the run already at its last epoch (the final evaluation had failed, or a
    finished run was resumed) exports ``final/`` first and then evaluates again, reporting the result.

    Args:
        trained: whether this attempt trained any epoch (else nothing was evaluated in it).
    """
    state = export_final(engine, run)
    if not trained and run.cfg.optim.epochs > 0:
        metrics = {"epoch": run.cfg.optim.epochs, "global_step": int(engine.global_steps)}
        evaluate_and_export_best(engine, run, metrics)
        export_final(engine, run)  # now with the metrics
        if tracker is not None:
            run.held.append((tracking.grouped_metrics(metrics), run.cfg.optim.epochs))
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                         | {"mlflow_run_id": run.meta["mlflow_run_id"] or ""})
    publish(run, tracker)  # the last epoch's checkpoint and final/ are persisted
    if tracker is not None:
        run_artifacts.final_artifacts(tracker, run.cfg, state, run.num_classes, run.last_eval)
        tracker.end("FINISHED")


def storage_run_dir(ctx) -> str:
    """URL of this run's directory in persistent storage (for exports beside Ray's checkpoints)."""
    st = ctx.get_storage()
    return ckpt_lib.storage_url(st.experiment_fs_path, st.storage_filesystem)
