"""GPU training step (issue #7): clips/s, frames/s and MFU of the real training step, fed (a) from
synthetic batches already on the device and (b) through the real data path; target b/a >= 0.95.

Both modes run ``pipeline.epoch.train_step`` on the engine training uses
(``pipeline.deepspeed_engine.build_engine``: DeepSpeed, ZeRO-0, one rank; precision, channels_last and
torch.compile from the flags), STA with a ResNet-50 trunk at 256x128, N=4, P=16 x K=4 = 64 clips
(256 frames) per step, a 625-class head (MARS) by default.

* (a) ``synthetic``: a few random uint8 ``(B, N, H, W, 3)`` batches created on the device and
  cycled: the step rate with no input pipeline at all (normalisation on the device included).
* (b) ``real``: ``pipeline.train_data.train_loader`` over shards packed by ``pipeline.pack`` from a
  ``pipeline.synthetic`` data set (JPEGs at the training size; generated and packed once under
  ``--data``), ``--num-workers`` loader processes, pinned uint8 batches normalised on the device
  by ``pipeline.transforms.model_input``: what a Ray worker runs per step (``--decode device``:
  the loader ships JPEGs and the training process decodes them on the device). The warm-up steps
  absorb the loader's start-up and initial pool read (training overlaps those with the previous
  epoch, see ``pipeline.prefetch.epoch_batches``), so this is the steady state.

Model FLOPs per step are counted once by ``torch.utils.flop_counter.FlopCounterMode`` over one
eager training step (forward + backward of every conv/matmul; the optimizer is not counted);
MFU = FLOPs per step / step time / ``--peak-tflops`` (default 989: H100 SXM dense bf16 without
sparsity; give the peak of your device and precision). Each repeat runs (a) then (b), after
``--warmup`` untimed steps each; the device is synchronised before and after the ``--steps``
timed steps. Reported per mode: median over repeats; ratio b/a per repeat (min/median/max).

    python bench/gpu_step.py [--channels-last] [--compile] [--precision bf16] [--json out.json]
    python bench/gpu_step.py --device cpu --trunk tiny --height 64 --width 32 --p 4 --k 2 \\
        --precision fp32 --steps 2 --warmup 1 --num-workers 1   # CPU smoke run (tests)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from _process_group import one_rank_group
from pipeline import pack, synthetic
from pipeline.model_io import build_model_from_config
from pipeline.config import load_config
from pipeline.deepspeed_engine import autocast_dtype, build_engine, compile_engine
from pipeline.train_data import train_loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TARGET = 0.95  # issue #7: the real data path within 5% of synthetic batches


def prepare_shards(data_dir: str, a) -> str:
    """Synthetic JPEG data set at the training size, packed once; returns the shard URL."""
    root = os.path.join(data_dir, f"synthetic-{a.height}x{a.width}-{a.ids}ids")
    shards = root + "-shards"
    if not os.path.exists(os.path.join(shards, "manifest.json")):
        synthetic.generate(root, num_ids=a.ids, tracklets_per_id=4, frames_per_tracklet=(16, 32),
                           height=a.height, width=a.width, num_test_ids=2, seed=0)
        pack.pack("synthetic", root, shards, shard_bytes=int(a.shard_mb * (1 << 20)), progress=False)
    return shards


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(engine, batch: dict, cfg, dtype, device) -> int:
    """FLOPs of one eager training step (forward + backward; also a warm-up step)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.epoch import train_step  # deepspeed picks its accelerator on import: after one_rank_group

    with FlopCounterMode(display=False) as counter:
        train_step(engine, batch, cfg, dtype, device)
    _sync(device)
    return int(counter.get_total_flops())


def timed_steps(engine, batches, cfg, dtype, device, warmup: int, steps: int) -> dict:
    """``warmup`` untimed steps, then ``steps`` timed ones from the iterator ``batches``."""
    from pipeline.epoch import train_step  # deepspeed picks its accelerator on import: after one_rank_group

    for _ in range(warmup):
        train_step(engine, next(batches), cfg, dtype, device)
    _sync(device)
    wait = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t
        losses = train_step(engine, batch, cfg, dtype, device)
    _sync(device)
    elapsed = time.perf_counter() - t0
    loss = float(losses["total"])
    if not torch.isfinite(torch.tensor(loss)):
        raise RuntimeError(f"non-finite loss {loss}")
    return {"seconds": elapsed, "step_s": elapsed / steps, "host_data_wait_s": wait, "last_loss": loss}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--trunk", default="resnet50", choices=("resnet50", "resnet18", "tiny"))
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--clip-len", type=int, default=4, help="N frames per clip")
    ap.add_argument("--p", type=int, default=16, help="identities per batch")
    ap.add_argument("--k", type=int, default=4, help="tracklets per identity (batch = P*K clips)")
    ap.add_argument("--num-classes", type=int, default=625, help="classifier size (625: MARS)")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--channels-last", action="store_true", help="model.channels_last=true")
    ap.add_argument("--compile", action="store_true", help="model.compile=true")
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--steps", type=int, default=50, help="timed steps per mode and repeat")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps before each timed block")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-workers", type=int, default=6, help="loader processes (configs/mars.yaml: 6)")
    ap.add_argument("--prefetch-factor", type=int, default=4)
    ap.add_argument("--decode", default="loader", choices=("loader", "device"),
                    help="train_loader(decode=...): JPEGs decoded in the loader processes or on the device")
    ap.add_argument("--ids", type=int, default=128, help="identities of the synthetic data set")
    ap.add_argument("--shard-mb", type=float, default=16.0)
    ap.add_argument("--data", default=os.path.join(ROOT, "bench", "results", "gpu_step_data"),
                    help="where the synthetic data set and its shards are made (reused)")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="device peak FLOP/s for the precision, in TFLOP/s (989: H100 SXM dense bf16)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    device = torch.device(a.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device (use --device cpu for a smoke run)")
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if a.threads:
        torch.set_num_threads(a.threads)

    from pipeline.epoch import train_step  # deepspeed picks its accelerator on import: after one_rank_group

    shards = prepare_shards(a.data, a)
    cfg = load_config(None, [
        "data.dataset=synthetic", f"data.shards={shards}", "data.prepare=false",
        f"data.clip_len={a.clip_len}", f"data.height={a.height}", f"data.width={a.width}",
        f"data.p={a.p}", f"data.k={a.k}", f"data.num_workers={a.num_workers}",
        f"data.prefetch_factor={a.prefetch_factor}", f"model.trunk={a.trunk}", "model.pretrained=null",
        f"model.channels_last={str(a.channels_last).lower()}", "model.compile=false",
        f"model.compile_mode={a.compile_mode}", "deepspeed.zero_stage=0", f"deepspeed.precision={a.precision}",
        f"scaling.use_gpu={str(device.type == 'cuda').lower()}", "optim.warmup_epochs=0"])
    one_rank_group(device)
    torch.manual_seed(0)
    model = build_model_from_config(cfg, a.num_classes)
    n_params = sum(p.numel() for p in model.parameters())
    per_epoch = a.warmup + a.steps
    engine, precision, _ = build_engine(model, cfg, world_size=1, steps_per_epoch=per_epoch)
    dtype = autocast_dtype(precision)

    B, N, H, W = a.p * a.k, a.clip_len, a.height, a.width
    g = torch.Generator(device=device).manual_seed(0)
    pids = torch.arange(a.p, device=device).repeat_interleave(a.k)
    synthetic = [{"clips": torch.randint(0, 256, (B, N, H, W, 3), dtype=torch.uint8, device=device, generator=g),
                  "pids": pids, "skipped": 0} for _ in range(4)]

    flops = count_flops(engine, synthetic[0], cfg, dtype, device)  # eager, before any compile
    t_compile = None
    if a.compile:
        compile_engine(engine, a.compile_mode)
        t = time.perf_counter()
        train_step(engine, synthetic[0], cfg, dtype, device)  # the compilation, reported apart
        _sync(device)
        t_compile = time.perf_counter() - t

    def cycle(items):
        while True:
            yield from items

    runs: dict[str, list] = {"synthetic": [], "real": []}
    # as training uses it (pipeline.prefetch.epoch_batches): one persistent loader, an epoch a repeat
    loader = train_loader(shards, clip_len=N, p=a.p, k=a.k, height=H, width=W, batches_per_epoch=per_epoch,
                          epoch=0, seed=0, num_workers=a.num_workers, pin_memory=device.type == "cuda",
                          prefetch_factor=a.prefetch_factor, normalize=False, decode=a.decode,
                          device=device if a.decode == "device" else None, persistent=True)
    try:
        for _ in range(a.repeats):
            runs["synthetic"].append(timed_steps(engine, cycle(synthetic), cfg, dtype, device, a.warmup, a.steps))
            batches = iter(loader)
            runs["real"].append(timed_steps(engine, batches, cfg, dtype, device, a.warmup, a.steps))
            for _ in batches:  # the rest of the epoch: the next iter() starts the next one
                pass
    finally:
        loader.close()

    def summary(rs: list) -> dict:
        step = statistics.median(x["step_s"] for x in rs)
        tflops = flops / step / 1e12
        return {"step_s": step, "clips_per_s": B / step, "frames_per_s": B * N / step,
                "tflops": tflops, "mfu": tflops / a.peak_tflops,
                "host_data_wait_s": statistics.median(x["host_data_wait_s"] for x in rs), "runs": rs}

    result = {k: summary(v) for k, v in runs.items()}
    ratios = [s["step_s"] / r["step_s"] for s, r in zip(runs["synthetic"], runs["real"])]
    out = {
        "bench": "gpu_step",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {platform.processor() or platform.machine()}",
        "torch": torch.__version__, "python": platform.python_version(),
        "setup": {"trunk": a.trunk, "height": H, "width": W, "clip_len": N, "p": a.p, "k": a.k,
                  "batch_clips": B, "frames_per_step": B * N, "num_classes": a.num_classes,
                  "params": n_params, "precision": precision, "channels_last": a.channels_last,
                  "compile": a.compile, "compile_mode": a.compile_mode if a.compile else None,
                  "steps": a.steps, "warmup": a.warmup, "repeats": a.repeats, "num_workers": a.num_workers,
                  "decode": a.decode,
                  "prefetch_factor": a.prefetch_factor, "shards": shards},
        "flops_per_step": flops, "peak_tflops": a.peak_tflops, "compile_s": t_compile,
        "synthetic": result["synthetic"], "real": result["real"],
        "ratio_real_over_synthetic": {"min": min(ratios), "median": statistics.median(ratios),
                                      "max": max(ratios), "per_repeat": ratios},
        "target": TARGET, "met": statistics.median(ratios) >= TARGET,
    }
    print(f"{out['device']}, {a.trunk} {H}x{W} N={N} batch {B} clips, {precision}, "
          f"channels_last={a.channels_last}, compile={a.compile}; {flops / 1e12:.3f} TFLOP per step")
    print(f"{'mode':<10}{'ms/step':>9}{'clips/s':>10}{'frames/s':>10}{'TFLOP/s':>9}{'MFU':>7}")
    for k in ("synthetic", "real"):
        s = result[k]
        print(f"{k:<10}{s['step_s'] * 1e3:>9.1f}{s['clips_per_s']:>10.1f}{s['frames_per_s']:>10.1f}"
              f"{s['tflops']:>9.2f}{s['mfu']:>7.1%}")
    rr = out["ratio_real_over_synthetic"]
    print(f"real/synthetic throughput: min {rr['min']:.3f} median {rr['median']:.3f} max {rr['max']:.3f} "
          f"(target >= {TARGET}: {'met' if out['met'] else 'not met'})")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
