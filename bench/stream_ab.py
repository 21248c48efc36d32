"""A/B of the training stream's CPU per delivered frame: this checkout against another commit.

Ratios taken in different runs of ``bench/data_throughput.py`` move by 10-20% with the host and its
load (docs/performance.md §2), too much to tell whether a data-path change cost 5%. This runs both
codes over the same shards in one run, interleaved: each round starts one process per side (the
order alternates), which makes the training path's loader (``train_loader``, uint8, persistent, one
loader process), discards its first epoch (the fork, the pool's first read) and measures the next
``--epochs``: CPU seconds of the process and its loader process per frame delivered.

    python bench/stream_ab.py --ref 11ccd2f^             # the commit before the #13 restructure
    python bench/stream_ab.py --ref HEAD~3 --rounds 10 --workdir /tmp/ab

The other side runs from a ``git worktree`` of ``--ref`` (removed afterwards) through ``PYTHONPATH``;
it must have ``pipeline.train_data.train_loader`` or the older ``pipeline.stream.train_loader``. The
shards are packed by this checkout (the format is the same since ``frame_bytes``). Prints per side
min / median / max µs per frame and, per round, this side's CPU over the other's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree_cpu() -> float:
    """CPU seconds of this process and its live children (the loader process)."""
    me = psutil.Process()
    return sum(me.cpu_times()[:2]) + sum(sum(c.cpu_times()[:2]) for c in me.children())


def side(shards: str, epochs: int) -> None:
    """One side's measurement, in whatever ``pipeline`` is first on the path; prints µs/frame."""
    import torch
    torch.set_num_threads(1)
    try:
        from pipeline.train_data import train_loader
    except ImportError:  # before issue 13's split
        from pipeline.stream import train_loader
    loader = train_loader(shards, epoch=0, normalize=False, persistent=True, clip_len=4, p=8, k=4, height=256,
                          width=128, batches_per_epoch=16, seed=0, num_workers=1,
                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    for _ in loader:  # the first epoch: fork and initial pool read
        pass
    out = []
    for _ in range(epochs):
        c0, frames = _tree_cpu(), 0
        for batch in loader:
            frames += batch["clips"].shape[0] * batch["clips"].shape[1]
        out.append((_tree_cpu() - c0) * 1e6 / frames)
    print(" ".join(f"{x:.2f}" for x in out), flush=True)
    loader.close()


def make_shards(work: str) -> str:
    """The data_throughput default set (128 ids x 4 tracklets of 16-64 frames, 256x128, 4 MB shards)."""
    from pipeline import pack as packmod
    from pipeline import synthetic
    shards = os.path.join(work, "shards")
    if not os.path.exists(os.path.join(shards, "manifest.json")):
        gen = synthetic.generate(os.path.join(work, "synthetic"), num_ids=128, tracklets_per_id=4,
                                 frames_per_tracklet=(16, 64), height=256, width=128, num_test_ids=1, seed=0)
        packmod.pack("synthetic", gen["root"], shards, shard_bytes=4 << 20, progress=False)
    return shards


def _run(path: str, shards: str, epochs: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": path}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--side", shards, "--epochs", str(epochs)],
                         env=env, cwd=path, capture_output=True, text=True, check=True)
    return [float(x) for x in out.stdout.split()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", help="the other side's commit")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3, help="measured epochs per process")
    ap.add_argument("--workdir", help="keep the shards here (default: a temp dir)")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.side:
        return side(a.side, a.epochs)
    if not a.ref:
        ap.error("--ref is required")
    with tempfile.TemporaryDirectory(prefix="sta-stream-ab-") as tmp:
        shards = make_shards(a.workdir or os.path.join(tmp, "data"))
        other = os.path.join(tmp, "ref")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", other, a.ref], check=True,
                       capture_output=True)
        try:
            sides = {"this": [], a.ref: []}
            paired = []
            for r in range(a.rounds):
                order = [("this", ROOT), (a.ref, other)][:: 1 if r % 2 == 0 else -1]
                got = {name: _run(path, shards, a.epochs) for name, path in order}
                for name, xs in got.items():
                    sides[name] += xs
                paired.append(statistics.median(got["this"]) / statistics.median(got[a.ref]))
                print(f"round {r + 1}/{a.rounds}: this {statistics.median(got['this']):.1f} µs/frame, "
                      f"{a.ref} {statistics.median(got[a.ref]):.1f}", flush=True)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", other], check=False)
    print(f"\nCPU per delivered frame (loader + main process; {a.rounds} rounds x {a.epochs} epochs per side)")
    print("| side | min | median | max |\n|---|---:|---:|---:|")
    for name, xs in sides.items():
        print(f"| {name} | {min(xs):.1f} µs | {statistics.median(xs):.1f} µs | {max(xs):.1f} µs |")
    print(f"this / {a.ref}, per round: min {min(paired):.3f} / median {statistics.median(paired):.3f} / "
          f"max {max(paired):.3f}  (below 1: this checkout spends less CPU per frame)")


if __name__ == "__main__":
    main()
