"""The per-worker training loop (what Ray Train runs on every rank), on a DeepSpeed engine.

:func:`train_loop_per_worker` reads like Ray's DeepSpeed example: seed, model, engine, restore, tracking,
loaders, then per epoch :func:`run_epoch` and ``end_epoch`` (checkpoint, then evaluate, then one
``ray.train.report`` carrying rank-reduced metrics and the checkpoint, then the epoch's MLflow metrics),
and ``finish`` (``final/`` export, figures, MLflow model); the phase helpers are in
:mod:`pipeline.run_state`, the cross-epoch loader prefetch in :mod:`pipeline.prefetch`. The Ray-free
epoch (:func:`pipeline.epoch.run_epoch`) is what the overhead benchmark times. Fault injection for
tests lives in ``tests/faults.py``.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import ray.train.torch  # also binds ray.train
import torch

from pipeline import console, driver, model_io
from pipeline.config import Config, config_from_dict
from pipeline.deepspeed_engine import autocast_dtype, build_engine
from pipeline.epoch import NonFiniteLossError, batches_per_epoch, run_epoch
from pipeline.prefetch import epoch_batches
from pipeline.run_state import (RunState, count_nodes, end_epoch, finish, mark_no_retry,
                                publish, refuse_retry, restore, start_tracking, storage_run_dir)
from pipeline.shards import read_manifest
from pipeline.train_data import LoaderSpec, train_loader

log = logging.getLogger("pipeline.worker")


def _device(cfg: Config) -> torch.device:
    if cfg.scaling.use_gpu and torch.cuda.is_available():
        return ray.train.torch.get_device()
    return torch.device("cpu")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry, on every rank: seed, model, engine, restore, loaders, then per epoch
    train → checkpoint → evaluate → report, and the final export.

    Args:
        loop_config: ``{"config": Config.to_dict(), "resume": checkpoint URL of another run or None,
            "mlflow_run_id": the run the driver opened, "parent_run_id", "run_name", "verbose"}``.
    """
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
    model = model_io.build_model_from_config(cfg, manifest.num_classes)
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
            run.held.append((values, step))

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
                publish(run, tracker)  # the losses that led here are what the user needs to see
                raise
            end_epoch(engine, run, tracker, epoch + 1, metrics, print_epoch)
    finish(engine, run, tracker, trained=start_epoch < cfg.optim.epochs)
