"""The per-worker training loop (what Ray Train runs on every rank), on a DeepSpeed engine.

:func:`train_loop_per_worker` reads like Ray's DeepSpeed example: seed, model, engine, restore
(:func:`restore`: the newest complete checkpoint of the run), tracking (:func:`start_tracking`), loaders,
then per epoch :func:`run_epoch` and :func:`end_epoch` (checkpoint, then evaluate, then one
``ray.train.report`` carrying rank-reduced metrics and the checkpoint), and :func:`finish` (``final/``
export, figures, MLflow model). The Ray-free parts (:func:`train_step`, :func:`run_epoch`) are what the
overhead benchmark times. Fault injection for tests lives in ``tests/faults.py``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from pipeline import checkpoint as ckpt_lib
from pipeline import console, driver, evaluation, run_artifacts, storage, tracking
from pipeline import resume as resume_lib
from pipeline.config import Config, config_from_dict
from pipeline.engine import autocast_dtype, build_engine
from pipeline.transforms import model_input
from sta_model.losses import combined_loss

log = logging.getLogger("pipeline.worker")



class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite: training stops (not retried), the last good checkpoint stays."""


def batches_per_epoch(cfg: Config, num_train_ids: int, world_size: int) -> int:
    """Optimiser steps in one epoch: configured, or one pass over the identities with the global
    batch of ``data.p`` identities (every rank takes ``p / world_size`` of them each step), so a
    recipe has the same number of steps, and LR schedule, on 1 or 64 GPUs."""
    if cfg.data.batches_per_epoch:
        return cfg.data.batches_per_epoch
    return max(1, math.ceil(num_train_ids / cfg.data.p))


def train_step(engine, batch: dict, cfg: Config, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Forward, loss dict, DeepSpeed backward+step. Returns detached loss terms (no host sync)."""
    clips = model_input(batch["clips"], device, dtype)
    pids = batch["pids"].to(device=device, non_blocking=True)
    out = engine(clips)
    # Losses in fp32 whatever the engine's precision: margins and log-softmax need the range.
    out = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in out.items()}
    L = cfg.loss
    losses = combined_loss(out, pids, w_tri=L.w_tri, w_ce=L.w_ce, lambda_reg=L.lambda_reg, margin=L.margin,
                           soft_margin=L.soft_margin, label_smoothing=L.label_smoothing,
                           global_batch=dist.is_initialized() and dist.get_world_size() > 1)
    engine.backward(losses["total"])
    engine.step()
    return {k: v.detach() for k, v in losses.items()}


def _reduce_mean(values: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(values)
        values = values / world_size
    return values


def run_epoch(engine, batches: Iterable[dict], cfg: Config, *, dtype: torch.dtype, device: torch.device,
              world_size: int = 1, on_log: Optional[Callable[[int, dict], None]] = None) -> dict[str, float]:
    """One epoch over ``batches``; returns rank-averaged loss terms and summed counters.

    Every term of the loss dict is logged by its own name (``loss_<term>``, ``step/loss_<term>``). Loss
    terms stay on the device and are synchronised only every ``tracking.log_every_steps`` steps (one
    all-reduce), so the hot loop has no per-step host sync; the first step with a non-finite term is
    remembered on the device and raises :class:`NonFiniteLossError` at the next sync, before any
    checkpoint of the damaged weights can be written.
    """
    engine.train()
    keys: list[str] = []  # the loss dict's terms, in its order, from the first step
    sums = window = bad_step = bad_terms = None
    n_batches = n_clips = n_frames = skipped = 0
    data_time = 0.0
    start = time.perf_counter()
    t = start
    every = cfg.tracking.log_every_steps
    first_step = int(engine.global_steps)
    for batch in batches:
        data_time += time.perf_counter() - t
        skipped += int(batch.get("skipped", 0))
        losses = train_step(engine, batch, cfg, dtype, device)
        if not keys:
            keys = list(losses)
            sums = torch.zeros(len(keys), device=device)
            window = torch.zeros(len(keys), device=device)
            bad_step = torch.full((), -1, dtype=torch.long, device=device)
            bad_terms = torch.zeros(len(keys), device=device)
        vec = torch.stack([losses[k].float() for k in keys])
        # Device-side record of the first non-finite step (its index in this epoch and its terms).
        newly = ~torch.isfinite(vec).all() & (bad_step < 0)
        bad_step = torch.where(newly, torch.full_like(bad_step, n_batches), bad_step)
        bad_terms = torch.where(newly, vec, bad_terms)
        sums += vec
        window += vec
        n_batches += 1
        n_clips += batch["clips"].shape[0]
        n_frames += batch["clips"].shape[0] * batch["clips"].shape[1]  # (B, N, ...) in both layouts
        if on_log is not None and n_batches % every == 0:
            _raise_if_non_finite(bad_step, bad_terms, keys, first_step, world_size)
            avg = _reduce_mean(window / every, world_size).tolist()
            on_log(engine.global_steps, {f"step/loss_{k}": v for k, v in zip(keys, avg)}
                   | {"step/lr": engine.get_lr()[0]})
            window.zero_()
        t = time.perf_counter()
    if keys:
        _raise_if_non_finite(bad_step, bad_terms, keys, first_step, world_size)
    elapsed = time.perf_counter() - start
    counters = torch.tensor([n_batches, n_clips, n_frames, skipped], dtype=torch.float64, device=device)
    timing = torch.tensor([elapsed, data_time], dtype=torch.float64, device=device)
    means = sums / max(1, n_batches) if keys else torch.zeros(0, device=device)
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(counters)
        dist.all_reduce(means)
        means /= world_size
        dist.all_reduce(timing, op=dist.ReduceOp.MAX)
    n_batches, n_clips, n_frames, skipped = counters.tolist()
    elapsed, data_time = timing.tolist()
    out = {f"loss_{k}": v for k, v in zip(keys, means.tolist())}
    if "loss_reg" in out and out.get("loss_total"):
        # The weighted Reg term's share of the objective: at small lambda it is ~1e-5, i.e. off in practice.
        out["reg_share"] = cfg.loss.lambda_reg * out["loss_reg"] / out["loss_total"]
    out.update(epoch_time_s=elapsed, data_wait_s=data_time, clips_per_s=n_clips / elapsed,
               frames_per_s=n_frames / elapsed, skipped_samples=int(skipped), batches=int(n_batches),
               lr=engine.get_lr()[0])
    return out


def _raise_if_non_finite(bad_step: torch.Tensor, bad_terms: torch.Tensor, keys: list[str], first_step: int,
                         world_size: int) -> None:
    """Raise :class:`NonFiniteLossError` on every rank if any rank saw a non-finite loss term.

    Args:
        bad_step: this rank's index (in this epoch) of its first non-finite step, -1 if none.
        bad_terms: the loss terms at that step.
        keys: the terms' names.
        first_step: the global step before this epoch's first step.
        world_size: ranks (the flag is MAX-reduced so every rank stops, none waits in a collective).
    """
    flag = torch.cat([bad_step.float().view(1), bad_terms])
    if world_size > 1 and dist.is_initialized():
        # The lowest bad step wins; a rank without one sends +inf so it never wins.
        mine = torch.where(flag[0] < 0, torch.full_like(flag[0], float("inf")), flag[0])
        low = mine.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        if not torch.isfinite(low):
            return
        step = int(low.item())
        terms = "this rank's terms were finite" if mine.item() != low.item() else \
            ", ".join(f"{k}={v:.4g}" for k, v in zip(keys, flag[1:].tolist()))
    else:
        if flag[0].item() < 0:
            return
        step = int(flag[0].item())
        terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(keys, flag[1:].tolist()))
    raise NonFiniteLossError(f"non-finite loss at global step {first_step + step + 1} ({terms}); training "
                             f"stopped, the last checkpoint before it is kept (lower optim.lr or check the data)")


def start_batches(loader: Iterable[dict]) -> tuple[Iterator[dict], Optional[Iterator]]:
    """``iter(loader)``, returning ``(batches, started)``: ``started`` is the running DataLoader
    iterator (its worker processes forked, reading shards already) or None for other iterables.
    The stream's loaders start their DataLoader in ``iter()``; ``stop_batches`` stops it."""
    it = iter(loader)
    if isinstance(loader, DataLoader):
        return it, it
    return it, getattr(it, "dataloader_iter", None)


def stop_batches(batches: Iterator) -> None:
    """Stop a started loader's worker processes now (what the DataLoader iterator's ``__del__``
    does, without waiting for the last reference to go): the stream's iterators and generators
    have ``close()``, a DataLoader's own iterator ``_shutdown_workers()``."""
    stop = getattr(batches, "close", None) or getattr(batches, "_shutdown_workers", None)
    if stop is not None:
        stop()


def epoch_batches(make_loader: Callable[[int], Iterable[dict]], start_epoch: int, end_epoch: int, *,
                  on_start: Optional[Callable[[int, Optional[Iterator]], None]] = None
                  ) -> Iterator[tuple[int, Iterator[dict]]]:
    """``(epoch, batches)`` for ``start_epoch <= epoch < end_epoch``, ``batches`` being exactly
    those of ``make_loader(epoch)``, with each next epoch's loader started (``start_batches``)
    just before this epoch's last batch is handed out (``len(loader)``; at its end if it has no
    length). Its worker start-up and initial pool read then overlap the last step, evaluation
    and checkpointing instead of delaying the next epoch's first step. Nothing is started for
    ``end_epoch``. Close the generator (``contextlib.closing``) to stop loaders started ahead or
    in use, e.g. on an exception. ``on_start(epoch, started)`` is called for every start, with
    the running DataLoader iterator (None if the loader has none).

    A loader with ``persistent`` true (``train_loader(persistent=True)``) is made once, for
    ``start_epoch``: each later epoch is its next ``iter()``, which sets its worker processes on
    that epoch at the same point (they are forked once and stopped with its ``close()``)."""
    ahead: dict[int, tuple[Iterator, Optional[int]]] = {}
    kept: Optional[Any] = None  # the persistent loader

    def start(epoch: int) -> None:
        nonlocal kept
        loader = kept if kept is not None else make_loader(epoch)
        if getattr(loader, "persistent", False):
            kept = loader
        try:
            n = len(loader)
        except TypeError:
            n = None
        it, started = start_batches(loader)
        ahead[epoch] = (it, n)
        if on_start is not None:
            on_start(epoch, started)

    def start_ahead(epoch: int) -> None:
        if epoch < end_epoch and epoch not in ahead:
            try:
                start(epoch)
            except Exception as exc:  # e.g. a storage hiccup: the epoch's own start retries it
                log.warning("could not start epoch %d's loader ahead: %s", epoch, exc)

    def batches(epoch: int, it: Iterator, n: Optional[int]) -> Iterator[dict]:
        handed = 0
        try:
            for batch in it:
                handed += 1
                if handed == n:
                    start_ahead(epoch + 1)
                yield batch
            start_ahead(epoch + 1)  # no len(), or fewer batches than it said
        finally:
            stop_batches(it)

    current: Optional[Iterator] = None
    try:
        for epoch in range(start_epoch, end_epoch):
            if epoch not in ahead:
                start(epoch)
            current = batches(epoch, *ahead.pop(epoch))
            yield epoch, current
    finally:
        if current is not None:
            current.close()
        for it, _ in ahead.values():
            stop_batches(it)
        ahead.clear()
        if kept is not None:
            kept.close()


def _device(cfg: Config) -> torch.device:
    if cfg.scaling.use_gpu and torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry, on every rank: seed, model, engine, restore, loaders, then per epoch
    train → checkpoint → evaluate → report, and the final export.

    Args:
        loop_config: ``{"config": Config.to_dict(), "resume": checkpoint URL of another run or None,
            "mlflow_run_id": the run the driver opened, "parent_run_id", "run_name", "verbose"}``.
    """
    import ray.train

    from pipeline.shards import read_manifest
    from pipeline.train_data import LoaderSpec, train_loader

    cfg = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
    console.quiet_ray_reports(bool(loop_config.get("verbose")))
    run_name = loop_config.get("run_name") or "run"
    driver.cleanup_ckpt_tmp(run_name, rank)  # a restarted rank's leftovers from its previous attempt
    torch.manual_seed(cfg.seed)  # same init on every rank; DeepSpeed also broadcasts rank 0's weights
    device = _device(cfg)
    if cfg.scaling.use_gpu and device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True

    run_dir = storage_run_dir(ctx)
    refuse_retry(run_dir)  # a non-finite loss stopped this job: Ray's retry must not train again
    manifest = read_manifest(cfg.data.shards)
    steps = batches_per_epoch(cfg, manifest.split("train").num_identities, world)
    # At least one per-step point per epoch, whatever the epoch length.
    cfg.tracking.log_every_steps = min(cfg.tracking.log_every_steps, steps)
    model = ckpt_lib.build_model_from_config(cfg, manifest.num_classes)
    engine, precision, ds_cfg = build_engine(model, cfg, world_size=world,
                                             steps_per_epoch=steps // cfg.deepspeed.grad_accum)
    run = RunState(cfg=cfg, rank=rank, world=world, device=device, dtype=autocast_dtype(precision),
                   num_classes=manifest.num_classes, run_dir=run_dir, run_name=run_name,
                   num_nodes=count_nodes(world))
    run.meta.update(restore(engine, run, resume=loop_config.get("resume")))
    start_epoch = run.best_and_start()
    tracker = start_tracking(run, loop_config, precision=precision, ds_cfg=ds_cfg)

    spec = LoaderSpec.from_config(cfg, rank=rank, world_size=world, batches_per_epoch=steps,
                                  pin_memory=device.type == "cuda")  # data.p is global: p // world here

    def make_loader(epoch: int):
        return train_loader(manifest, spec, epoch=epoch, device=device)

    def on_log(step: int, values: dict) -> None:
        if tracker is not None:
            tracker.log_metrics(values, step)

    print_epoch = console.EpochPrinter(cfg.optim.epochs, start_epoch)
    # Each epoch's loader starts during the previous epoch's last step (epoch_batches); a
    # persistent one is made once and its workers move on to the next epoch then.
    with contextlib.closing(epoch_batches(make_loader, start_epoch, cfg.optim.epochs)) as epochs:
        for epoch, batches in epochs:
            try:
                metrics = run_epoch(engine, batches, cfg, dtype=run.dtype, device=device, world_size=world,
                                    on_log=on_log)
            except NonFiniteLossError as exc:
                mark_no_retry(run_dir, exc)
                raise
            end_epoch(engine, run, tracker, epoch + 1, metrics, print_epoch)
    finish(engine, run, tracker, trained=start_epoch < cfg.optim.epochs)


NO_RETRY = "no_retry.json"  # in the run directory: why this Ray job must not train again


def mark_no_retry(run_dir: str, exc: Exception) -> None:
    """Record in the run directory that this job stopped for a reason no retry can fix (every rank
    writes the same record; a failed write only loses the shortcut, not the error)."""
    import ray

    record = {"job_id": ray.get_runtime_context().get_job_id(), "error": str(exc)}
    try:
        storage.write_bytes(storage.join(run_dir, NO_RETRY), json.dumps(record).encode())
    except Exception as write_exc:  # noqa: BLE001 - the original error is what matters
        log.warning("could not record %s: %s", NO_RETRY, write_exc)


def refuse_retry(run_dir: str) -> None:
    """Raise the recorded error again when Ray restarts a job that :func:`mark_no_retry` stopped.

    Ray Train retries every worker error up to ``failure.max_failures``; with this, a retry fails at
    once instead of training from the last checkpoint into the same non-finite loss. A new
    ``pipeline.train`` (another Ray job: ``--resume`` after lowering the LR) is not affected.
    """
    import ray

    try:
        record = json.loads(storage.read_bytes(storage.join(run_dir, NO_RETRY)))
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

    def best_and_start(self) -> int:
        """The restored best metric and epoch to start at."""
        self.best = self.meta.get("best")
        return int(self.meta["epoch"])


def count_nodes(world: int) -> int:
    """How many nodes the ranks landed on (reported once; the multi-node test checks the spread)."""
    import ray

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
        if storage.is_s3(src):
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
    import ray.train

    cfg = run.cfg
    is_last = epoch == cfg.optim.epochs
    metrics.update(epoch=epoch, num_nodes=run.num_nodes, global_step=int(engine.global_steps))
    run.meta.update(epoch=epoch, global_step=int(engine.global_steps), best=run.best, num_classes=run.num_classes)
    ckpt_dir = None
    if epoch % cfg.checkpoint.every_epochs == 0 or is_last:
        # A fresh dir per report: with ASYNC upload Ray deletes it once persisted.
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
        tracker.log_metrics(tracking.grouped_metrics(metrics), epoch)
        print_epoch(epoch, metrics)
    report = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    report["mlflow_run_id"] = run.meta["mlflow_run_id"] or ""
    if ckpt_dir is not None:
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir),
                         checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}",
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
    else:
        ray.train.report(report)
    if failed is not None:
        if is_last:
            export_final(engine, run)
        raise RuntimeError(f"evaluation after epoch {epoch} failed ({type(failed).__name__}: {failed}); "
                           f"checkpoint_epoch_{epoch:04d}{' and final/' if is_last else ''} kept") from failed


def evaluate_and_export_best(engine, run: RunState, metrics: dict[str, Any]) -> None:
    """Distributed evaluation into ``metrics``; a new best (decided on rank 0, shared so every rank
    agrees) is exported to ``<run>/best``."""
    cfg = run.cfg
    engine.eval()
    res = evaluation.evaluate(lambda x: engine(x), cfg, embed_dim=cfg.model.embed_dim, rank=run.rank,
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
        state = ckpt_lib.full_state_dict(engine)  # collective under ZeRO-3
        if run.rank == 0:
            ckpt_lib.export_model(state, cfg, f"{run.run_dir}/best", num_classes=run.num_classes,
                                  metrics={k: v for k, v in metrics.items() if isinstance(v, float)},
                                  provenance={"mlflow_run_id": run.meta["mlflow_run_id"], "run_dir": run.run_dir})


def export_final(engine, run: RunState) -> dict[str, torch.Tensor]:
    """``<run>/final``: the whole model (every rank joins the gather under ZeRO-3); returns its state."""
    state = ckpt_lib.full_state_dict(engine)
    if run.rank == 0:
        final_metrics = {k: v for k, v in run.last_eval.items() if isinstance(v, float)}
        ckpt_lib.export_model(state, run.cfg, f"{run.run_dir}/final", num_classes=run.num_classes,
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
    import ray.train

    state = export_final(engine, run)
    if not trained and run.cfg.optim.epochs > 0:
        metrics = {"epoch": run.cfg.optim.epochs, "global_step": int(engine.global_steps)}
        evaluate_and_export_best(engine, run, metrics)
        export_final(engine, run)  # now with the metrics
        if tracker is not None:
            tracker.log_metrics(tracking.grouped_metrics(metrics), run.cfg.optim.epochs)
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                         | {"mlflow_run_id": run.meta["mlflow_run_id"] or ""})
    if tracker is not None:
        run_artifacts.final_artifacts(tracker, run.cfg, state, run.num_classes, run.last_eval)
        tracker.end("FINISHED")


def storage_run_dir(ctx) -> str:
    """URL of this run's directory in persistent storage (for exports beside Ray's checkpoints)."""
    st = ctx.get_storage()
    return ckpt_lib.storage_url(st.experiment_fs_path, st.storage_filesystem)
