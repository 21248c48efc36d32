"""One training epoch on a DeepSpeed engine, without Ray: :func:`train_step` (forward, loss dict,
backward, step) and :func:`run_epoch` (loss terms kept on the device, synchronised every
``tracking.log_every_steps``, a non-finite loss stopped at the first sync after its step).

This is what every Ray Train worker runs per epoch (:mod:`pipeline.worker`) and what the overhead
benchmark times.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from pipeline.config import Config
from pipeline.transforms import model_input
from sta_model.losses import combined_loss


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
    clips = model_input(batch["clips"], device, dtype, flips=batch.get("flips"), erase=batch.get("erase"))
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
