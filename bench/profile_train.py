"""Where the training worker's time goes on CPU, with the real data path (for docs/performance.md).

Data: a synthetic data set (``pipeline.synthetic``) packed into shards, read by
``pipeline.train_data.train_loader`` with ``--num-workers`` loader processes, exactly as
``pipeline.worker`` reads it. Model/engine: ``configs/synthetic.yaml`` (tiny trunk) through
``build_model_from_config`` + ``build_engine`` (1-rank gloo group). The step is
``pipeline.epoch.train_step`` split into its phases, each timed with ``perf_counter`` (CPU ops are
synchronous): data wait (``next(loader)``), forward, loss, backward (``engine.backward``), optimizer
step (``engine.step``: ZeRO bookkeeping, gradient reduction -- none with one rank -- and Adam), plus
one ``checkpoint.save`` timed separately. The loader worker's own time is split by running the same
worker function in-process under cProfile: JPEG decode (PIL), tar parsing + sample validation,
augmentation (flip/erase/copy into the batch), the rest.

Peak RSS (``--memory``): separate fresh processes run one forward/backward/step of the tiny trunk at
the profile's batch, and of the ResNet-50 trunk at 256x128, N=4, batch 8 (``ru_maxrss``).

    python bench/profile_train.py [--steps 30] [--json out.json] [--memory]
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from _process_group import one_rank_group
from pipeline import checkpoint as ckpt_lib
from pipeline import pack as packmod
from pipeline import synthetic
from pipeline.model_io import build_model_from_config
from pipeline.config import load_config
from pipeline.deepspeed_engine import autocast_dtype, build_engine
from pipeline.shards import read_manifest
from pipeline.train_data import train_loader
from sta_model.losses import combined_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _memory_child(trunk: str, overrides: list[str]) -> None:
    """One train step in this fresh process; print peak RSS (MB) before and after."""
    from pipeline.epoch import train_step  # deepspeed picks its accelerator on import: after one_rank_group

    cfg = load_config(os.path.join(ROOT, "configs", "synthetic.yaml"), overrides + [f"model.trunk={trunk}"])
    cfg.model.pretrained = None
    one_rank_group()
    d = cfg.data
    model = build_model_from_config(cfg, 625)
    engine, precision, _ = build_engine(model, cfg, world_size=1, steps_per_epoch=10)
    batch = {"clips": torch.randn(d.p * d.k, d.clip_len, 3, d.height, d.width),
             "pids": torch.arange(d.p).repeat_interleave(d.k)}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    train_step(engine, batch, cfg, autocast_dtype(precision), torch.device("cpu"))
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"trunk": trunk, "overrides": overrides, "params": sum(p.numel() for p in model.parameters()),
                      "rss_before_step_mb": before, "peak_rss_mb": peak, "step_s": dt}))


def _memory(overrides_tiny: list[str]) -> list[dict]:
    out = []
    for trunk, ov in (("tiny", overrides_tiny),
                      ("resnet50", ["data.p=2", "data.k=4", "data.clip_len=4", "data.height=256",
                                    "data.width=128"])):
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--_memory", trunk, *ov],
                             capture_output=True, text=True, timeout=900)
        line = [x for x in res.stdout.splitlines() if x.startswith("{")]
        out.append(json.loads(line[-1]) if line else {"trunk": trunk, "error": res.stderr[-2000:]})
        print("memory:", out[-1], flush=True)
    return out


def _loader_profile(url: str, common: dict) -> dict:
    """The loader worker's time by kind, from cProfile of the in-process stream."""
    prof = cProfile.Profile(time.process_time)  # CPU time: robust to other load on the machine
    prof.enable()
    for _ in train_loader(url, epoch=1, num_workers=0, normalize=False, **common):
        pass
    prof.disable()
    st = pstats.Stats(prof).stats
    total = max(v[3] for k, v in st.items() if k[2] == "_train_worker")

    def cum(pred):
        return sum(v[3] for k, v in st.items() if pred(k))

    decode = cum(lambda k: k[2] == "decode_into")  # libjpeg-turbo (simplejpeg) + the flip
    flip = cum(lambda k: "flip" in k[2] and "TensorBase" in k[2])
    parse = cum(lambda k: k[2] == "shard_samples")
    return {"total_s": total, "decode_into_s": decode, "of_which_flip_s": flip,
            "tar_parse_validate_s": parse, "other_s": total - decode - parse}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--_memory", nargs="+", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a._memory:
        _memory_child(a._memory[0], a._memory[1:])
        return 0


    cfg = load_config(os.path.join(ROOT, "configs", "synthetic.yaml"), [])
    d = cfg.data
    tmp = tempfile.TemporaryDirectory(prefix="sta-prof-")
    work = a.workdir or tmp.name
    url = os.path.join(work, "shards")
    if not os.path.exists(os.path.join(url, "manifest.json")):
        gen = synthetic.generate(os.path.join(work, "synthetic"), num_ids=48, tracklets_per_id=4,
                                 frames_per_tracklet=(d.synthetic.min_frames, d.synthetic.max_frames),
                                 height=d.synthetic.height, width=d.synthetic.width, num_test_ids=2, seed=0)
        packmod.pack("synthetic", gen["root"], url, shard_bytes=1 << 20, progress=False)
    man = read_manifest(url)
    num_classes = int(man["num_classes"])
    one_rank_group()
    torch.manual_seed(0)
    model = build_model_from_config(cfg, num_classes)
    engine, precision, _ = build_engine(model, cfg, world_size=1, steps_per_epoch=a.steps)
    dtype = autocast_dtype(precision)
    common = dict(clip_len=d.clip_len, p=d.p, k=d.k, height=d.height, width=d.width,
                  batches_per_epoch=a.steps + 2, seed=0, hflip=d.hflip, random_erasing=d.random_erasing)
    L = cfg.loss
    phases = {k: [] for k in ("data_wait", "forward", "loss", "backward", "step")}
    engine.train()
    it = iter(train_loader(url, epoch=0, num_workers=a.num_workers, **common))
    next(it), next(it)  # worker start-up and first pool read are not steady state
    t_all = time.perf_counter()
    cpu = {k: 0.0 for k in phases}  # CPU seconds of this process per phase (load-robust)
    for _ in range(a.steps):
        marks = [(time.perf_counter(), time.process_time())]
        batch = next(it)
        marks.append((time.perf_counter(), time.process_time()))
        out = engine(batch["clips"].to(dtype=dtype))
        marks.append((time.perf_counter(), time.process_time()))
        losses = combined_loss(out, batch["pids"], w_tri=L.w_tri, w_ce=L.w_ce, lambda_reg=L.lambda_reg,
                               margin=L.margin, soft_margin=L.soft_margin, label_smoothing=L.label_smoothing)
        marks.append((time.perf_counter(), time.process_time()))
        engine.backward(losses["total"])
        marks.append((time.perf_counter(), time.process_time()))
        engine.step()
        marks.append((time.perf_counter(), time.process_time()))
        for i, k in enumerate(phases):
            phases[k].append(marks[i + 1][0] - marks[i][0])
            cpu[k] += marks[i + 1][1] - marks[i][1]
    wall = time.perf_counter() - t_all
    with tempfile.TemporaryDirectory() as ck:
        t0 = time.perf_counter()
        ckpt_lib.save(engine, ck, rank=0, cfg=cfg, meta={"epoch": 0})
        ckpt_s = time.perf_counter() - t0
        ckpt_mb = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(ck) for f in fs) / 2**20
    loader = _loader_profile(url, common)

    step_sum = {k: sum(v) for k, v in phases.items()}
    total = sum(step_sum.values())
    res = {"config": "configs/synthetic.yaml", "batch": [d.p * d.k, d.clip_len, 3, d.height, d.width],
           "steps": a.steps, "num_workers": a.num_workers, "wall_s": wall,
           "step_ms_median": 1e3 * statistics.median(sum(x) for x in zip(*phases.values())),
           "phase_s": step_sum, "phase_pct": {k: 100 * v / total for k, v in step_sum.items()},
           "phase_cpu_s": cpu, "phase_cpu_pct": {k: 100 * v / sum(cpu.values()) for k, v in cpu.items()},
           "checkpoint_save_s": ckpt_s, "checkpoint_mb": ckpt_mb, "loader_worker_inprocess": loader,
           "loadavg": os.getloadavg(), "cpu_count": os.cpu_count()}
    print(f"training worker, {a.steps} steps, batch {tuple(res['batch'])}, tiny trunk, "
          f"{a.num_workers} loader worker(s), load {res['loadavg'][0]:.1f} on {os.cpu_count()} CPUs")
    for k, v in step_sum.items():
        print(f"  {k:<10}{1e3 * v / a.steps:8.1f} ms/step {res['phase_pct'][k]:6.1f}% wall | "
              f"{1e3 * cpu[k] / a.steps:8.1f} ms/step {res['phase_cpu_pct'][k]:6.1f}% CPU")
    print(f"  checkpoint save {ckpt_s:.2f} s, {ckpt_mb:.1f} MB (once per checkpoint.every_epochs)")
    print(f"  loader worker (in-process, CPU s, {a.steps + 2} batches): " +
          ", ".join(f"{k} {v:.2f}" for k, v in loader.items()))
    if a.memory:
        res["memory"] = _memory([f"data.p={d.p}", f"data.k={d.k}"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
