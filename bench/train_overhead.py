"""Training-loop overhead: ``pipeline.epoch.run_epoch`` on a real DeepSpeed engine vs. a plain
PyTorch loop on the same model, batches, loss and optimizer.

Both sides: one process, CPU, fp32, the model of ``--config`` (default configs/tiny.yaml: tiny
trunk) built by ``pipeline.model_io.build_model_from_config``, ``--steps`` in-memory batches
(random normalised clips, P x K labels, generated once and shared), loss
``sta_model.losses.combined_loss`` with the config's weights, and ``torch.optim.Adam`` with the
config's lr / weight decay and the same no-decay-on-BN/bias parameter groups.

* ``deepspeed``: ``pipeline.deepspeed_engine.build_engine`` (ZeRO stage and clipping from the config, a
  1-rank gloo group) + ``pipeline.epoch.run_epoch`` -- exactly what a Ray worker runs per epoch,
  minus the data stream.
* ``plain``: ``zero_grad / forward / combined_loss / backward / (clip_grad_norm_) / step /
  scheduler.step`` with no host sync per step.

Both models start from the same weights and get ``--warmup`` untimed steps first. Each repeat
runs the ``--steps`` batches on both sides in ``--blocks`` alternating blocks (``run_epoch`` is
called once per block, as an epoch; which side goes first flips every block), so load drift on a
shared machine hits both alike.
Reported: steps/s of each, and ``overhead = plain_steps_per_s / deepspeed_steps_per_s - 1``
(min/median/max over repeats, ratio taken per repeat). Target: overhead <= 10%.

    python bench/train_overhead.py [--repeats 5] [--json out.json] [--config configs/tiny.yaml]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from _process_group import one_rank_group
from pipeline.model_io import build_model_from_config
from pipeline.config import load_config
from pipeline.deepspeed_engine import autocast_dtype, build_engine, build_optimizer, lr_factor, param_groups
from sta_model.losses import combined_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batches(cfg, steps: int, num_classes: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    d = cfg.data
    out = []
    for _ in range(steps):
        pids = torch.arange(d.p).repeat_interleave(d.k) + torch.randint(0, num_classes - d.p + 1, (1,),
                                                                        generator=g)
        clips = torch.randn(d.p * d.k, d.clip_len, 3, d.height, d.width, generator=g)
        out.append({"clips": clips, "pids": pids, "camids": torch.zeros_like(pids), "skipped": 0})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.yaml"))
    ap.add_argument("--steps", type=int, default=30, help="timed steps per epoch (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=6, help="alternating blocks per repeat")
    ap.add_argument("--num-classes", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    ap.add_argument("--set", nargs="*", default=["data.p=8", "data.k=4", "data.clip_len=4",
                                                 "data.height=128", "data.width=64",
                                                 "tracking.log_every_steps=10"],
                    help="config overrides; the defaults give tiny.yaml the clip size of configs/synthetic.yaml (128x64, P8 K4 N4): a ~150 ms CPU step")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from pipeline.epoch import run_epoch  # deepspeed picks its accelerator on import: after one_rank_group

    cfg = load_config(a.config, a.set)
    cfg.scaling.use_gpu = False
    cfg.model.pretrained = None
    one_rank_group()
    device = torch.device("cpu")
    steps = a.warmup + a.steps
    batches = _batches(cfg, steps, a.num_classes, cfg.seed)

    torch.manual_seed(cfg.seed)
    ds_model = build_model_from_config(cfg, a.num_classes)
    plain_model = build_model_from_config(cfg, a.num_classes)
    plain_model.load_state_dict(ds_model.state_dict())
    engine, precision, ds_cfg = build_engine(ds_model, cfg, world_size=1, steps_per_epoch=steps)
    dtype = autocast_dtype(precision)
    n_params = sum(p.numel() for p in ds_model.parameters())

    opt = build_optimizer(cfg, param_groups(plain_model, cfg.optim.weight_decay), use_gpu=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, cfg))
    L, clip = cfg.loss, cfg.deepspeed.grad_clip

    def plain_epoch(bs):
        plain_model.train()
        for b in bs:
            clips = b["clips"].to(device=device, dtype=dtype)
            out = plain_model(clips)
            losses = combined_loss(out, b["pids"], w_tri=L.w_tri, w_ce=L.w_ce, lambda_reg=L.lambda_reg,
                                   margin=L.margin, soft_margin=L.soft_margin,
                                   label_smoothing=L.label_smoothing)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(plain_model.parameters(), clip)
            opt.step()
            sched.step()

    def ds_epoch(bs):
        run_epoch(engine, bs, cfg, dtype=dtype, device=device, world_size=1, on_log=lambda s, v: None)

    # Interleave at block granularity: each repeat alternates blocks of steps between the two
    # loops (order flipped every block), so load changes on a shared machine hit both sides alike.
    runs = {"plain": [], "deepspeed": []}
    fns = {"plain": plain_epoch, "deepspeed": ds_epoch}
    for name in fns:  # warm-up (allocator, DeepSpeed's first-step setup), not timed
        fns[name](batches[:a.warmup])
    timed = batches[a.warmup:]
    m = max(1, len(timed) // a.blocks)
    for r in range(a.repeats):
        spent = {"plain": 0.0, "deepspeed": 0.0}
        for c in range(0, len(timed), m):
            order = ("plain", "deepspeed") if (r + c // m) % 2 == 0 else ("deepspeed", "plain")
            for name in order:
                t0 = time.perf_counter()
                fns[name](timed[c:c + m])
                spent[name] += time.perf_counter() - t0
        for name in fns:
            runs[name].append(len(timed) / spent[name])
        print(f"  repeat {r + 1}/{a.repeats}: plain {runs['plain'][-1]:.2f} steps/s, "
              f"deepspeed {runs['deepspeed'][-1]:.2f} steps/s", flush=True)

    overhead = [p / d - 1 for p, d in zip(runs["plain"], runs["deepspeed"])]
    med = statistics.median
    row = {"name": "train_overhead", "repeats": a.repeats, "steps": a.steps, "threads": a.threads,
           "config": os.path.relpath(a.config, ROOT), "overrides": a.set, "params": n_params,
           "batch": [cfg.data.p * cfg.data.k, cfg.data.clip_len, 3, cfg.data.height, cfg.data.width],
           "zero_stage": cfg.deepspeed.zero_stage, "grad_clip": clip, "precision": precision,
           "plain_steps_per_s": runs["plain"], "deepspeed_steps_per_s": runs["deepspeed"],
           "plain_step_ms_median": 1e3 / med(runs["plain"]),
           "deepspeed_step_ms_median": 1e3 / med(runs["deepspeed"]),
           "overhead": overhead, "overhead_min": min(overhead), "overhead_median": med(overhead),
           "overhead_max": max(overhead),
           # ratio against the baseline, as every bench reports it: > 1 means DeepSpeed is faster
           "ratio_min": min(d / p for p, d in zip(runs["plain"], runs["deepspeed"])),
           "ratio_median": med(d / p for p, d in zip(runs["plain"], runs["deepspeed"])),
           "ratio_max": max(d / p for p, d in zip(runs["plain"], runs["deepspeed"])),
           "target": "overhead <= 10% (ratio >= 0.91)", "ds_config": ds_cfg}
    print(f"\n{cfg.model.trunk} trunk, {n_params / 1e6:.2f}M params, batch {tuple(row['batch'])}, "
          f"ZeRO {row['zero_stage']}, {precision}, {a.threads} thread(s), {a.steps} timed steps x "
          f"{a.repeats} repeats")
    print(f"plain     {med(runs['plain']):7.2f} steps/s ({row['plain_step_ms_median']:.1f} ms/step)")
    print(f"deepspeed {med(runs['deepspeed']):7.2f} steps/s ({row['deepspeed_step_ms_median']:.1f} ms/step)")
    print(f"overhead min/median/max: {100 * row['overhead_min']:+.1f}% / "
          f"{100 * row['overhead_median']:+.1f}% / {100 * row['overhead_max']:+.1f}%  (target <= +10%)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"benchmark": "train_overhead", "rows": [row]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
