"""The per-worker training loop (what Ray Train runs on every rank), on a DeepSpeed engine.

Structure follows Ray's ``train_func(config)`` examples: build stream, model and engine; restore from
the latest checkpoint if Ray hands one over; then epochs of PK batches, periodic distributed evaluation,
and one ``ray.train.report`` per epoch carrying rank-reduced metrics and the DeepSpeed checkpoint.
The Ray-free parts (:func:`train_step`, :func:`run_epoch`) are what the overhead benchmark times.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from pipeline import checkpoint as ckpt_lib
from pipeline import console, driver
from pipeline.config import Config, config_from_dict
from pipeline.engine import autocast_dtype, build_engine
from pipeline.transforms import model_input
from sta_model.losses import combined_loss

log = logging.getLogger("pipeline.worker")

LOSS_KEYS = ("total", "triplet", "ce", "reg")
# Epoch metrics drawn in curves.png, grouped into panels by the prefix before "/".
CURVES = {**{f"loss_{k}": f"loss/{k}" for k in LOSS_KEYS}, "reg_share": "loss/reg_share", "lr": "lr/lr", "clips_per_s": "throughput/clips_per_s",
          "mAP": "eval/mAP", "rank1": "eval/rank1", "rr_mAP": "eval/rr_mAP", "rr_rank1": "eval/rr_rank1"}


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

    Loss terms stay on the device and are synchronised only every ``tracking.log_every_steps`` steps
    (one all-reduce), so the hot loop has no per-step host sync.
    """
    engine.train()
    sums = torch.zeros(len(LOSS_KEYS), device=device)
    window = torch.zeros(len(LOSS_KEYS), device=device)
    n_batches = n_clips = n_frames = skipped = 0
    data_time = 0.0
    start = time.perf_counter()
    t = start
    every = cfg.tracking.log_every_steps
    for batch in batches:
        data_time += time.perf_counter() - t
        skipped += int(batch.get("skipped", 0))
        losses = train_step(engine, batch, cfg, dtype, device)
        vec = torch.stack([losses[k] for k in LOSS_KEYS])
        sums += vec
        window += vec
        n_batches += 1
        n_clips += batch["clips"].shape[0]
        n_frames += batch["clips"].shape[0] * batch["clips"].shape[1]  # (B, N, ...) in both layouts
        if on_log is not None and n_batches % every == 0:
            avg = _reduce_mean(window / every, world_size).tolist()
            on_log(engine.global_steps, {f"step/loss_{k}": v for k, v in zip(LOSS_KEYS, avg)}
                   | {"step/lr": engine.get_lr()[0]})
            window.zero_()
        t = time.perf_counter()
    elapsed = time.perf_counter() - start
    counters = torch.tensor([n_batches, n_clips, n_frames, skipped], dtype=torch.float64, device=device)
    timing = torch.tensor([elapsed, data_time], dtype=torch.float64, device=device)
    means = sums / max(1, n_batches)
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(counters)
        dist.all_reduce(means)
        means /= world_size
        dist.all_reduce(timing, op=dist.ReduceOp.MAX)
    n_batches, n_clips, n_frames, skipped = counters.tolist()
    elapsed, data_time = timing.tolist()
    out = {f"loss_{k}": v for k, v in zip(LOSS_KEYS, means.tolist())}
    # The weighted Reg term's share of the objective: at small lambda it is ~1e-5, i.e. off in practice.
    out["reg_share"] = cfg.loss.lambda_reg * out["loss_reg"] / out["loss_total"] if out["loss_total"] else 0.0
    out.update(epoch_time_s=elapsed, data_wait_s=data_time, clips_per_s=n_clips / elapsed,
               frames_per_s=n_frames / elapsed, skipped_samples=int(skipped), batches=int(n_batches),
               lr=engine.get_lr()[0])
    return out


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


def attention_clips(model: torch.nn.Module, clips: torch.Tensor):
    """Spatial maps and score matrix of an STA model for a few clips (for the heatmap figure)."""
    from sta_model.attention import spatial_temporal_attention

    B, N = clips.shape[:2]
    with torch.no_grad():
        f = model.trunk(clips.flatten(0, 1))
        g, S = spatial_temporal_attention(f.reshape(B, N, *f.shape[1:]).float(), model.num_blocks,
                                          attention_map=getattr(model, "attention_map", "energy"))
    return g, S


def _device(cfg: Config) -> torch.device:
    if cfg.scaling.use_gpu and torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry: ``loop_config = {"config": Config.to_dict(), "resume": uri|None, "parent_run_id": id|None}``."""
    import ray.train

    from pipeline.shards import read_manifest
    from pipeline.train_data import LoaderSpec, train_loader
    from pipeline import evaluation, tracking

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

    manifest = read_manifest(cfg.data.shards)
    num_classes = manifest.num_classes
    steps = batches_per_epoch(cfg, manifest.split("train").num_identities, world)
    # At least one per-step point per epoch, whatever the epoch length.
    cfg.tracking.log_every_steps = min(cfg.tracking.log_every_steps, steps)
    model = ckpt_lib.build_model_from_config(cfg, num_classes)
    engine, precision, ds_cfg = build_engine(model, cfg, world_size=world,
                                             steps_per_epoch=steps // cfg.deepspeed.grad_accum)
    dtype = autocast_dtype(precision)
    # Where the ranks landed (reported once; the multi-node test checks the spread).
    nodes: list = [None] * world
    node = ray.get_runtime_context().get_node_id()
    if world > 1:
        dist.all_gather_object(nodes, node)
    else:
        nodes = [node]
    num_nodes = len(set(nodes))

    # Restore: Ray's latest checkpoint after a worker failure, else an explicit --resume checkpoint.
    meta: dict[str, Any] = {"epoch": 0, "global_step": 0, "best": None, "mlflow_run_id": None}
    start_ckpt = ray.train.get_checkpoint()
    restored = False
    if start_ckpt is not None:
        with start_ckpt.as_directory() as d:
            meta.update(ckpt_lib.load(engine, d))
        restored = True
    elif loop_config.get("resume"):
        from pipeline import storage

        src = loop_config["resume"]
        with tempfile.TemporaryDirectory() as d:
            if storage.is_s3(src):
                storage.download_dir(src, d)
                src = d
            meta.update(ckpt_lib.load(engine, src))
        meta["mlflow_run_id"] = None  # a checkpoint resume is a new run
        restored = True
    start_epoch = int(meta["epoch"])
    if restored and rank == 0:
        log.info("restored epoch %d, global step %d", start_epoch, engine.global_steps)

    tracker = tracking.Tracker(cfg) if rank == 0 else None
    if tracker is not None:
        new_run = not meta.get("mlflow_run_id")
        run_id = tracker.start(cfg, run_id=loop_config.get("mlflow_run_id") or meta.get("mlflow_run_id"),
                               resumed=not new_run,
                               parent_run_id=loop_config.get("parent_run_id"),
                               extra_tags={"precision": precision, "world_size": str(world),
                                           "num_nodes": str(num_nodes), **pretrained_tags(cfg)})
        meta["mlflow_run_id"] = run_id
        if new_run:
            tracker.log_params(cfg)
            tracker.log_config(cfg)
            tracker.log_text(json.dumps(ds_cfg, indent=1), "deepspeed_config.json")

    def on_log(step: int, values: dict) -> None:
        if tracker is not None:
            tracker.log_metrics(values, step)

    run_dir = storage_run_dir(ctx)
    print_epoch = console.EpochPrinter(cfg.optim.epochs, start_epoch)
    best = meta.get("best")
    history: dict[str, list] = {}
    last_eval: dict[str, Any] = {}

    spec = LoaderSpec.from_config(cfg, rank=rank, world_size=world, batches_per_epoch=steps,
                                  pin_memory=device.type == "cuda")  # data.p is global: p // world here

    def make_loader(epoch: int):
        return train_loader(manifest, spec, epoch=epoch, device=device)

    # Each epoch's loader starts during the previous epoch's last step (epoch_batches); a
    # persistent one is made once and its workers move on to the next epoch then.
    with contextlib.closing(epoch_batches(make_loader, start_epoch, cfg.optim.epochs)) as epochs:
        for epoch, batches in epochs:
            metrics = run_epoch(engine, batches, cfg, dtype=dtype, device=device, world_size=world,
                                on_log=on_log)
            metrics["epoch"] = epoch + 1
            metrics["num_nodes"] = num_nodes
            metrics["global_step"] = int(engine.global_steps)
            is_last = epoch + 1 == cfg.optim.epochs
            ev = cfg.eval.every_epochs
            if is_last or (ev and (epoch + 1) % ev == 0):
                engine.eval()
                res = evaluation.evaluate(lambda x: engine(x), cfg, embed_dim=cfg.model.embed_dim, rank=rank,
                                          world_size=world, device=device, dtype=dtype)
                if res is not None:
                    last_eval = res
                    metrics.update({k: v for k, v in res.items() if not k.endswith("cmc")})
            # Best-so-far decided on rank 0 and shared, so every rank agrees whether to export.
            flag = torch.zeros(1, device=device)
            if rank == 0 and cfg.checkpoint.best_metric in metrics:
                value = metrics[cfg.checkpoint.best_metric]
                if best is None or value > best:
                    best = value
                    flag += 1
            if world > 1:
                dist.broadcast(flag, 0)
            meta.update(epoch=epoch + 1, global_step=int(engine.global_steps), best=best, num_classes=num_classes)
            if flag.item():
                state = ckpt_lib.full_state_dict(engine)  # collective under ZeRO-3
                if rank == 0:
                    ckpt_lib.export_model(state, cfg, f"{run_dir}/best", num_classes=num_classes,
                                          metrics={k: v for k, v in metrics.items() if isinstance(v, float)},
                                          provenance={"mlflow_run_id": meta["mlflow_run_id"], "run_dir": run_dir})
            if tracker is not None:
                tracker.log_metrics(tracking.grouped_metrics(metrics), epoch + 1)
                print_epoch(epoch + 1, metrics)
                for k, v in metrics.items():
                    if k in CURVES:
                        history.setdefault(CURVES[k], []).append((epoch + 1, v))
            report_metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            report_metrics["mlflow_run_id"] = meta["mlflow_run_id"] or ""
            if (epoch + 1) % cfg.checkpoint.every_epochs == 0 or is_last:
                # A fresh dir per report: with ASYNC upload Ray deletes it once persisted.
                d = tempfile.mkdtemp(prefix=driver.ckpt_tmp_prefix(run_name, rank) + f"e{epoch + 1:04d}-")
                ckpt_lib.save(engine, d, rank=rank, cfg=cfg, meta=meta)
                ray.train.report(report_metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"checkpoint_epoch_{epoch + 1:04d}",
                                 checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
                _maybe_inject_failure(cfg, epoch + 1, restored, rank, world)
            else:
                ray.train.report(report_metrics)

    # Final artefacts: exported model (all ranks join the gather under ZeRO-3), figures, MLflow model.
    state = ckpt_lib.full_state_dict(engine)
    if rank == 0:
        final_metrics = {k: v for k, v in last_eval.items() if isinstance(v, float)}
        ckpt_lib.export_model(state, cfg, f"{run_dir}/final", num_classes=num_classes, metrics=final_metrics,
                              provenance={"mlflow_run_id": meta["mlflow_run_id"], "run_dir": run_dir})
        if tracker is not None:
            _final_artifacts(tracker, cfg, state, num_classes, last_eval, history)
            tracker.end("FINISHED")


def pretrained_tags(cfg: Config) -> dict[str, str]:
    """MLflow tags naming where the trunk came from when ``model.pretrained`` is an earlier run's export."""
    src = cfg.model.pretrained
    if not src or not ckpt_lib.is_export(src):
        return {}
    _, info = ckpt_lib.export_trunk_state(src)
    tags = {"pretrained.source": src, "pretrained.trunk": str(info["trunk"])}
    if info.get("mlflow_run_id"):
        tags["pretrained.source_run_id"] = str(info["mlflow_run_id"])
    if info.get("run_dir"):
        tags["pretrained.source_run_dir"] = str(info["run_dir"])
    return tags


def storage_run_dir(ctx) -> str:
    """URL of this run's directory in persistent storage (for exports beside Ray's checkpoints)."""
    st = ctx.get_storage()
    return ckpt_lib.storage_url(st.experiment_fs_path, st.storage_filesystem)


def _maybe_inject_failure(cfg: Config, epoch: int, restored: bool, rank: int, world: int) -> None:
    """Fault injection for tests: the last rank dies right after the checkpoint of epoch N, once."""
    target = cfg.failure.inject_at_epoch or int(os.environ.get("STA_INJECT_FAILURE_EPOCH", "0"))
    if target and epoch == target and not restored and rank == world - 1:
        log.warning("injected failure: rank %d exits after epoch %d's checkpoint", rank, epoch)
        # Give Ray's async upload of this rank's shard time to finish before the process dies.
        time.sleep(float(os.environ.get("STA_INJECT_FAILURE_DELAY_S", "5")))
        os._exit(1)


def _final_artifacts(tracker, cfg: Config, state: dict, num_classes: int, last_eval: dict, history: dict) -> None:
    from pipeline import viz

    with tempfile.TemporaryDirectory() as tmp:
        if "cmc" in last_eval:
            extra = {"re-ranked": last_eval["rr_cmc"]} if "rr_cmc" in last_eval else None
            tracker.log_artifact(viz.plot_cmc(last_eval["cmc"], os.path.join(tmp, "cmc.png"), label=cfg.model.kind,
                                              extra=extra))
        if history:
            tracker.log_artifact(viz.plot_curves(history, os.path.join(tmp, "curves.png"), title=cfg.name))
        model = ckpt_lib.build_model_from_config(_no_pretrained(cfg), num_classes)
        model.load_state_dict(state)
        model.eval()
        if cfg.model.kind == "sta" and cfg.tracking.heatmaps > 0:
            try:
                tracker.log_artifact(_heatmaps(model, cfg, os.path.join(tmp, "attention.png")))
            except Exception as exc:  # a figure must never fail a finished run
                log.warning("attention heatmaps skipped: %s", exc)
        if cfg.tracking.log_model:
            tracker.log_model(model, cfg, registered_model=cfg.tracking.registered_model,
                              metrics={f"eval/{k}": v for k, v in last_eval.items() if isinstance(v, float)})


def _no_pretrained(cfg: Config) -> Config:
    d = cfg.to_dict()
    d["model"]["pretrained"] = None
    return config_from_dict(d)


def _heatmaps(model: torch.nn.Module, cfg: Config, path: str) -> str:
    """The paper's figure: a few query clips with spatial maps and the N×K score matrix."""
    from pipeline import viz
    from pipeline.eval_data import eval_loader
    from pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD

    want = cfg.tracking.heatmaps
    panels, seen = [], set()
    loader = eval_loader(cfg.data.shards, "query", clip_len=cfg.data.clip_len, height=cfg.data.height,
                         width=cfg.data.width, num_workers=0, clips_per_batch=16)
    for batch in loader:
        for i in range(batch["clips"].shape[0]):
            idx = int(batch["index"][i])
            if idx in seen:
                continue
            seen.add(idx)
            clip = batch["clips"][i:i + 1]
            g, S = attention_clips(model, clip)
            frames = viz.denormalize(clip[0], IMAGENET_MEAN, IMAGENET_STD)
            panels.append((frames, g[0].numpy(), S[0].numpy(), f"query {idx} (pid {int(batch['pids'][i])})"))
            if len(panels) >= want:
                break
        if len(panels) >= want:
            break
    return viz.plot_attention_grid(panels, path)
