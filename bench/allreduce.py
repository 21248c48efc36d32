"""Gradient allreduce time over gloo, 2 processes on this machine, at the models' gradient sizes.

Sizes: the parameter count of the STA model with the ResNet-50 trunk (paper setup, MARS's 625
classes) and with the tiny trunk (configs/tiny.yaml), counted from the real models built by
``pipeline.model_io.build_model_from_config``; plus fixed sizes to fit a bandwidth line. Each
size is one flat fp32 tensor (DeepSpeed buckets gradients, ``reduce_bucket_size`` 5e7 elements,
so ResNet-50's ~26M parameters go as one bucket). Two ranks spawned with ``torch.multiprocessing``
each time ``dist.all_reduce`` after a barrier; the slower rank's time counts. The baseline each
row is compared against is a local copy of the same bytes (``torch.Tensor.copy_``, memory
bandwidth) measured in the same run, so "ratio" says how many memcpy's one allreduce costs here.

NCCL over NVLink/InfiniBand cannot be measured on this machine (no GPU lent): docs/performance.md
uses assumed bandwidths for the scaling model and says so.

    python bench/allreduce.py [--repeats 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _process_group import free_port
from pipeline.model_io import build_model_from_config
from pipeline.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_params(config: str, overrides: list[str], num_classes: int) -> int:

    cfg = load_config(config, overrides)
    cfg.model.pretrained = None
    return sum(p.numel() for p in build_model_from_config(cfg, num_classes).parameters())


def _rank(rank: int, world: int, port: int, sizes: dict, repeats: int, warmup: int, q) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out = {}
    for name, n in sizes.items():
        x = torch.ones(n, dtype=torch.float32)
        times = []
        for i in range(warmup + repeats):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
        out[name] = times
    q.put((rank, out))
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--world", type=int, default=2)
    a = ap.parse_args(argv)

    cfgs = os.path.join(ROOT, "configs")
    sizes = {
        "sta_resnet50_mars": model_params(os.path.join(cfgs, "mars.yaml"), [], 625),
        "sta_tiny": model_params(os.path.join(cfgs, "tiny.yaml"), [], 8),
        "1M": 1 << 20, "4M": 4 << 20, "16M": 16 << 20,
    }
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, a.world, port, sizes, a.repeats, a.warmup, q))
             for r in range(a.world)]
    for p in procs:
        p.start()
    got = dict(q.get() for _ in procs)
    for p in procs:
        p.join()

    rows = []
    print(f"gloo allreduce, {a.world} processes on one host ({os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}), fp32, {a.repeats} repeats")
    print(f"{'tensor':<20}{'params':>12}{'MB':>8}{'min ms':>9}{'med ms':>9}{'max ms':>9}"
          f"{'GB/s*':>7}{'x memcpy':>9}")
    for name, n in sizes.items():
        t = [max(got[r][name][i] for r in got) for i in range(a.repeats)]
        src, dst = torch.ones(n), torch.empty(n)
        dst.copy_(src)  # first touch (page faults) is not part of a memcpy
        cp = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            cp.append(time.perf_counter() - t0)
        nbytes = 4 * n
        # ring "bus bandwidth": each rank sends/receives 2(n-1)/n of the buffer
        busbw = 2 * (a.world - 1) / a.world * nbytes / statistics.median(t) / 1e9
        ratios = [x / c for x, c in zip(t, cp)]
        row = {"name": name, "params": n, "bytes": nbytes, "seconds": t, "memcpy_seconds": cp,
               "busbw_GBps": busbw, "ratio_min": min(ratios), "ratio_median": statistics.median(ratios),
               "ratio_max": max(ratios), "world": a.world, "backend": "gloo"}
        rows.append(row)
        print(f"{name:<20}{n:>12,}{nbytes / 2**20:>8.1f}{1e3 * min(t):>9.1f}{1e3 * statistics.median(t):>9.1f}"
              f"{1e3 * max(t):>9.1f}{busbw:>7.2f}{row['ratio_median']:>9.1f}")
    print("* bus bandwidth 2(n-1)/n * bytes / median time. NCCL: not measurable here (no GPU).")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"benchmark": "allreduce", "rows": rows, "loadavg": os.getloadavg()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
