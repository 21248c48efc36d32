"""Training-data throughput per core: the shard stream vs. a torchreid-style per-file loader.

Data: a synthetic dataset (``pipeline.synthetic``, DukeV layout, JPEG frames) packed into shards
with ``pipeline.pack``. Cases, all with the same clip sampling (restricted random, N frames),
clip-consistent flip, resize to the target size and ImageNet normalisation, P x K batches:

* ``stream_local`` -- ``pipeline.train_data.train_loader`` over local shards, ``persistent=True`` as
  training uses it (``pipeline.prefetch.epoch_batches``): one loader whose worker process is forked
  once and serves each repeat's epoch (its first epoch, with the fork, is reported apart);
* ``stream_local_u8`` -- the same with ``normalize=False``: uint8 clips, normalisation, flips and
  erasing left to the GPU (``model_input`` after ``.to(device)``), the intended training setup;
* ``stream_local_u8_fresh`` -- ``stream_local_u8`` with a new loader (a fork) every epoch;
* ``stream_local_u8_stock_tar`` -- ``stream_local_u8`` with webdataset's tar stage for every shard
  (``tar_blocks=False``) instead of the block stage: the A/B that decides whether the block stage stays;
* ``stream_local_u8_no_ring`` -- ``stream_local_u8`` without batch-buffer reuse (``reuse_buffers=False``):
  the A/B that decides whether the ring stays;
* ``stream_local_jpeg`` -- ``decode="device"`` with device ``cpu``: the worker ships the sampled
  JPEGs, the main process decodes them (libjpeg-turbo) into the batch; on a GPU this decode is
  nvJPEG's. Same output as ``stream_local_u8``;
* ``stream_s3``    -- ``stream_local_u8`` over moto's S3 server on 127.0.0.1 (``--s3``; the server runs in a
  thread of this process, so its CPU counts as the measuring process's);
* ``wds_stock``    -- the same training stream written with the stock ``webdataset`` library
  (``bench/_loop_baselines.wds_stock_loader``: open_clip's ``get_wds_dataset`` pattern with
  ``tarfile_to_samples``, restricted sampling, decode of only the sampled frames by the stream's own
  decoder, a 4P-identity pool and P x K batches; a persistent ``WebLoader``): the library peer row;
* ``per_file``     -- map-style Dataset whose ``__getitem__`` opens each sampled JPEG file with PIL
  (``Image.open(path).convert("RGB")``, resize, flip, per-frame ToTensor + Normalize, stack),
  torchreid's RandomIdentitySampler for P x K, default collate;
* ``raw_decode``   -- libjpeg-turbo (simplejpeg) decoding the same frames from memory into one
  preallocated array in a tight loop in this process: the practical per-core limit (the fastest
  decoder we have, with nothing else done). The array is a ``transforms.frame_buffer`` (rows
  8 bytes off vector alignment, so libjpeg-turbo's x86 SIMD code uses cached stores), like the
  stream's batches: where the array lands decides ~17% of the rate otherwise;
* ``raw_decode_aligned`` -- the same into a 64-byte-aligned array (non-temporal stores), for reference;
* ``raw_decode_batches`` -- the same into successive frames of 5 batch-sized ``frame_buffer`` s (a
  loader's ring): the memory traffic of writing each frame to its own place, which a loader cannot
  avoid and the one-array loop does not have;
* ``raw_decode_pil`` -- ``Image.open(BytesIO(jpeg)).convert("RGB")`` in the same tight loop: what
  the limit is with PIL (about half the rate; the per-file baseline decodes with PIL).

"Per core": loaders run with ``num_workers=1``: one worker process does all the loading work, the
main process only receives batches (and, for the float32 stream, converts the uint8 clips the
worker ships into normalised float32: that conversion overlaps with the worker's decoding).
Throughput = frames delivered / wall time from ``iter(loader)`` to the last batch: worker start-up
(fresh loaders) and the stream's initial pool read (4P identities before the first batch) are
included, since every tracklet read is used (``steady_s``, from the first batch on, is kept in the
JSON too). CPU time: this process, plus its loader processes (live ones via /proc, reaped ones
via ``RUSAGE_CHILDREN``).
The default data set (128 identities x 4 tracklets, P=8, K=4) makes one pass over the identities
exactly the default 16 batches: one epoch as in real training (MARS: 625 ids / P=16), where each
epoch starts with the loader's initial pool read; with few identities per P the pool would hold
nearly all of them and re-read shards. Cases run interleaved in each repeat;
ratios are taken per repeat and reported as min/median/max. A case's "vs raw_decode" ratios use the
raw decode loop timed right before and after that case (its mean), not the repeat's; each case
runs ``--epochs`` epochs per repeat (3), summed. On a shared machine expect noise.

    python bench/data_throughput.py [--repeats 5] [--json out.json] [--s3]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import io
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
import psutil
import simplejpeg
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline import pack as packmod
from pipeline import s3_client, storage, synthetic
from pipeline.datasets import load_dataset
from pipeline.train import free_port
from pipeline.train_data import train_loader
from pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD, frame_buffer, restricted_indices


# --------------------------------------------------------------------------- per-file baseline
class PerFileClips(Dataset):
    """torchreid's VideoDataset with restricted random sampling: one PIL open per frame file."""

    def __init__(self, tracklets, clip_len, height, width, mean, std):
        self.tracklets, self.clip_len, self.size = tracklets, clip_len, (width, height)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.rng = np.random.default_rng(0)

    def __len__(self):
        return len(self.tracklets)

    def __getitem__(self, i):
        t = self.tracklets[i]
        idx = restricted_indices(len(t.frames), self.clip_len, self.rng)
        flip = self.rng.random() < 0.5  # one coin per clip
        out = []
        for fi in idx:
            img = Image.open(t.frames[fi]).convert("RGB")
            if img.size != self.size:
                img = img.resize(self.size, Image.BILINEAR)
            if flip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            # torchvision ToTensor + Normalize, per frame
            x = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).contiguous()
            x = x.float().div(255).sub_(self.mean).div_(self.std)
            out.append(x)
        return torch.stack(out), t.pid, t.camid


class RandomIdentitySampler(Sampler):
    """torchreid's RandomIdentitySampler (P ids x K instances), repeated to ``num_batches``."""

    def __init__(self, tracklets, p, k, num_batches, seed=0):
        self.index = defaultdict(list)
        for i, t in enumerate(tracklets):
            self.index[t.pid].append(i)
        self.p, self.k, self.num_batches, self.rnd = p, k, num_batches, random.Random(seed)

    def _one_pass(self):
        groups = defaultdict(list)
        for pid, idxs in self.index.items():
            idxs = list(idxs) if len(idxs) >= self.k else self.rnd.choices(idxs, k=self.k)
            self.rnd.shuffle(idxs)
            for j in range(0, len(idxs) - self.k + 1, self.k):
                groups[pid].append(idxs[j:j + self.k])
        avail, out = list(groups), []
        while len(avail) >= self.p:
            for pid in self.rnd.sample(avail, self.p):
                out += groups[pid].pop(0)
                if not groups[pid]:
                    avail.remove(pid)
        return out

    def __iter__(self):
        need, out = self.num_batches * self.p * self.k, []
        while len(out) < need:
            out += self._one_pass()
        return iter(out[:need])

    def __len__(self):
        return self.num_batches * self.p * self.k


# --------------------------------------------------------------------------- timing
def _self_cpu() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


_NOT_LOADERS: set[int] = set()  # child processes that are not the loader's (the S3 server)


def _kids_cpu() -> tuple[float, dict]:
    """CPU seconds of this process's reaped children, and of each live loader process."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    live = {}
    for child in psutil.Process().children():
        if child.pid in _NOT_LOADERS:
            continue
        with contextlib.suppress(psutil.Error):
            live[child.pid] = sum(child.cpu_times()[:2])
    return kids.ru_utime + kids.ru_stime, live


def _kids_cpu_since(start: tuple[float, dict]) -> float:
    """CPU seconds the children used since ``start``: a child live at both ends counts its
    delta; one reaped meanwhile is in RUSAGE_CHILDREN whole, less what it had at ``start``."""
    (c0, live0), (c1, live1) = start, _kids_cpu()
    return c1 - c0 + sum(live1.values()) - sum(live0.values())


def _server_cpu(server) -> float:
    if server is None:
        return 0.0
    return sum(psutil.Process(server.pid).cpu_times()[:2])


def _time_loader(loader, n_batches):
    # CPU: this process from iter() to the last batch (not the measuring code's gc.collect and
    # /proc reads), its loader processes from before iter() to after they were joined
    k0 = _kids_cpu()
    c0 = _self_cpu()
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    t1 = time.perf_counter()
    n = 0
    skipped = int(first.get("skipped", 0)) if isinstance(first, dict) else 0
    for b in it:
        n += 1
        if isinstance(b, dict):
            skipped += int(b["skipped"])
    t2 = time.perf_counter()
    del it, first, b
    main_cpu = _self_cpu() - c0
    gc.collect()  # exhausted DataLoader iterators join their workers: their CPU time is now counted
    loader_cpu = _kids_cpu_since(k0)
    assert n == n_batches - 1, (n, n_batches)
    return {"steady_s": t2 - t1, "total_s": t2 - t0, "cpu_s": main_cpu + loader_cpu, "main_cpu_s": main_cpu,
            "loader_cpu_s": loader_cpu, "batches": n, "skipped": skipped}


def main(argv=None) -> int:
    # bench/ is on sys.path when this runs as a script; tests import this file by path for its helpers
    from _loop_baselines import wds_stock_loader

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per case and repeat (summed)")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--s3", action="store_true", help="include shards served by moto's S3 server")
    ap.add_argument("--workdir", default=None, help="keep data here (default: a temp dir)")
    ap.add_argument("--num-ids", type=int, default=128)
    ap.add_argument("--tracklets-per-id", type=int, default=4)
    ap.add_argument("--frames", type=int, nargs=2, default=[16, 64], metavar=("MIN", "MAX"))
    ap.add_argument("--src-size", type=int, nargs=2, default=[256, 128], metavar=("H", "W"),
                    help="stored frame size (synthetic generation)")
    ap.add_argument("--size", type=int, nargs=2, default=[256, 128], metavar=("H", "W"),
                    help="training clip size")
    ap.add_argument("--clip-len", type=int, default=4)
    ap.add_argument("--p", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--shard-mb", type=float, default=4.0,
                    help="shard size (MARS packed at 256 MB holds ~80 identities; small here so "
                         "that a worker's pool does not hold the whole bench data set)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)

    tmp = tempfile.TemporaryDirectory(prefix="sta-bench-data-")
    work = a.workdir or tmp.name
    t0 = time.perf_counter()
    gen = synthetic.generate(os.path.join(work, "synthetic"), num_ids=a.num_ids,
                             tracklets_per_id=a.tracklets_per_id, frames_per_tracklet=tuple(a.frames),
                             height=a.src_size[0], width=a.src_size[1], num_test_ids=1, seed=0)
    t_gen = time.perf_counter() - t0
    shards_url = os.path.join(work, "shards")
    man = packmod.pack("synthetic", gen["root"], shards_url, shard_bytes=int(a.shard_mb * (1 << 20)), progress=False)
    ds = load_dataset("synthetic", gen["root"])
    train = ds.train
    H, W = a.size
    N, P, K, B, nw = a.clip_len, a.p, a.k, a.batches, a.num_workers
    print(f"data: {len(train)} train tracklets, {sum(len(t.frames) for t in train)} frames "
          f"{a.src_size[0]}x{a.src_size[1]}, {len(man['splits']['train']['shards'])} train shards "
          f"(generated in {t_gen:.0f}s); clips {N}x{H}x{W}, P={P} K={K}, {B} batches, "
          f"num_workers={nw}", flush=True)

    common = dict(clip_len=N, p=P, k=K, height=H, width=W, batches_per_epoch=B, seed=0,
                  num_workers=nw, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    # persistent stream loaders: made once (epoch 0, timed as "first_epoch"), then one epoch a repeat
    persistent = {
        "stream_local": lambda: train_loader(shards_url, epoch=0, persistent=True, **common),
        "stream_local_u8": lambda: train_loader(shards_url, epoch=0, normalize=False, persistent=True, **common),
        "stream_local_jpeg": lambda: train_loader(shards_url, epoch=0, normalize=False, decode="device",
                                                  device="cpu", persistent=True, **common),
        "stream_local_u8_stock_tar": lambda: train_loader(shards_url, epoch=0, normalize=False, persistent=True,
                                                          tar_blocks=False, **common),
        "stream_local_u8_no_ring": lambda: train_loader(shards_url, epoch=0, normalize=False, persistent=True,
                                                        reuse_buffers=False, **common),
    }
    train_shards = [os.path.join(shards_url, sh["name"]) for sh in man["splits"]["train"]["shards"]]
    persistent["wds_stock"] = lambda: wds_stock_loader(train_shards, clip_len=N, p=P, k=K, height=H, width=W,
                                                       batches=B, seed=0, num_workers=nw)
    cases = {
        "stream_local_u8_fresh": lambda r: train_loader(shards_url, epoch=r + 1, normalize=False, **common),
        "per_file": lambda r: DataLoader(
            PerFileClips(train, N, H, W, IMAGENET_MEAN, IMAGENET_STD), batch_size=P * K,
            sampler=RandomIdentitySampler(train, P, K, B, seed=r), num_workers=nw, drop_last=True),
    }
    server = None
    if a.s3:
        # moto's server in a process of its own, as an S3 endpoint is another machine: the
        # stream's CPU is then its own (a Python S3 server costs ~1/3 of the client's CPU here)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-c", "from moto.server import main; main()",
                                   "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _NOT_LOADERS.add(server.pid)
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="testing",
                          AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        for attempt in range(100):  # until the server listens
            try:
                s3_client.client().create_bucket(Bucket="bench")
                break
            except Exception:  # noqa: BLE001 - connection refused while it starts
                if attempt == 99 or server.poll() is not None:
                    raise
                time.sleep(0.1)
        storage.upload_dir(shards_url, "s3://bench/shards")
        persistent["stream_s3"] = lambda: train_loader("s3://bench/shards", epoch=0, normalize=False,
                                                       persistent=True, **common)
        # the node-local shard cache: the first epoch streams and copies, later ones read local disk
        cache_dir = os.path.join(work, "s3-cache")
        shutil.rmtree(cache_dir, ignore_errors=True)
        persistent["stream_s3_cached"] = lambda: train_loader("s3://bench/shards", epoch=0, normalize=False,
                                                              persistent=True, cache_dir=cache_dir, **common)

    # raw decode of the same frames: train frames from memory, one process, tight loop, as many
    # frames as a loader case delivers; measured before and after the loader cases of each
    # repeat (the mean of the two), since a short burst on a shared machine is noisy
    blobs = [open(f, "rb").read() for t in train for f in t.frames]
    sample = [blobs[i % len(blobs)] for i in range(0, B * P * K * N * 7, 7)]
    buf = frame_buffer((a.src_size[0], a.src_size[1], 3)).numpy()
    n_frame = a.src_size[0] * a.src_size[1] * 3
    spare = np.empty(n_frame + 64, np.uint8)
    aligned = spare[(-spare.ctypes.data) % 64:][:n_frame].reshape(buf.shape)
    ring = frame_buffer((5 * P * K * N, a.src_size[0], a.src_size[1], 3)).numpy()
    slot = iter(range(1 << 62))
    raw_cases = {"raw_decode": lambda b: simplejpeg.decode_jpeg(b, "RGB", buffer=buf),
                 "raw_decode_aligned": lambda b: simplejpeg.decode_jpeg(b, "RGB", buffer=aligned),
                 "raw_decode_batches": lambda b: simplejpeg.decode_jpeg(b, "RGB", buffer=ring[next(slot) % len(ring)]),
                 "raw_decode_pil": lambda b: Image.open(io.BytesIO(b)).convert("RGB")}

    def raw(decode):
        t, c = time.perf_counter(), time.process_time()
        for b in sample:
            decode(b)
        return time.perf_counter() - t, time.process_time() - c

    results = defaultdict(list)

    def record(name, res):
        clips = res["batches"] * P * K
        total = (res["batches"] + res.get("epochs", 1)) * P * K  # each epoch's first batch is not in "batches"
        results[name].append({**res, "clips_per_s": total / res["total_s"],
                              "frames_per_s": total * N / res["total_s"],
                              "frames_per_cpu_s": total * N / res["cpu_s"],
                              "steady_frames_per_s": clips * N / res["steady_s"]})

    loaders = {}
    first_epoch = {}
    try:
        for name, make in persistent.items():  # epoch 0: the fork and first buffers
            loaders[name] = make()
            first_epoch[name] = _time_loader(loaders[name], B)
        def adjacent(epoch_fn):
            # --epochs epochs of the case, summed (one epoch is under a second: a shared machine's
            # hiccups move one-epoch ratios by +-20%), and the raw decode loop as many times right
            # before and after: its baseline for the "vs raw decode" rows, measured seconds from it
            # rather than at the ends of a repeat that lasts minutes
            t0, c0 = map(sum, zip(*(raw(raw_cases["raw_decode"]) for _ in range(a.epochs))))
            runs = [epoch_fn() for _ in range(a.epochs)]
            t1, c1 = map(sum, zip(*(raw(raw_cases["raw_decode"]) for _ in range(a.epochs))))
            res = {k: sum(x[k] for x in runs) for k in runs[0]}
            n = len(sample) * a.epochs
            res.update(epochs=a.epochs, raw_adjacent={"frames_per_s": 2 * n / (t0 + t1),
                                                      "frames_per_cpu_s": 2 * n / (c0 + c1)})
            return res

        for r in range(a.repeats):
            before = {name: raw(decode) for name, decode in raw_cases.items()}
            for name, loader in loaders.items():
                s0 = _server_cpu(server)
                record(name, adjacent(functools.partial(_time_loader, loader, B)))
                if server is not None and "s3" in name:
                    results[name][-1]["server_cpu_s"] = _server_cpu(server) - s0
            for name, make in cases.items():
                record(name, adjacent(lambda make=make, r=r: _time_loader(make(r), B)))  # a new loader each epoch
            for name, decode in raw_cases.items():
                (t0, c0), (t1, c1) = before[name], raw(decode)
                n = len(sample)
                results[name].append({"frames_per_s": 2 * n / (t0 + t1), "frames_per_cpu_s": 2 * n / (c0 + c1),
                                      "clips_per_s": 2 * n / (t0 + t1) / N,
                                      "before_after_frames_per_s": [n / t0, n / t1]})
    finally:
        for loader in loaders.values():
            if hasattr(loader, "close"):  # the stock WebLoader's workers go with it
                loader.close()
        if server is not None:
            server.terminate()
            server.wait()

    summary = {name: {"clips_per_s": statistics.median(x["clips_per_s"] for x in runs),
                      "frames_per_s": statistics.median(x["frames_per_s"] for x in runs),
                      "frames_per_cpu_s": statistics.median(x["frames_per_cpu_s"] for x in runs),
                      **({"total_s": statistics.median(x["total_s"] for x in runs),
                          "skipped": sum(x["skipped"] for x in runs)} if "total_s" in runs[0] else {}),
                      **({"server_cpu_s": statistics.median(x["server_cpu_s"] for x in runs),
                          "loader_cpu_s": statistics.median(x["cpu_s"] for x in runs)}
                         if "server_cpu_s" in runs[0] else {})}
               for name, runs in results.items()}
    print(f"\n{'case':<16}{'clips/s':>10}{'frames/s':>11}{'frames/cpu-s':>13}{'total_s':>9}"
          f"   (median of {a.repeats})")
    for name, s in summary.items():
        print(f"{name:<16}{s['clips_per_s']:>10.1f}{s['frames_per_s']:>11.1f}{s['frames_per_cpu_s']:>13.1f}"
              f"{s.get('total_s', float('nan')):>9.2f}")
    def spread(r: list) -> dict:
        return {"min": min(r), "median": statistics.median(r), "max": max(r), "runs": r}

    def per_repeat(num, den, key="frames_per_s"):
        if den == "raw_decode" and "raw_adjacent" in results[num][0]:  # the case's own adjacent baseline
            return spread([x[key] / x["raw_adjacent"][key] for x in results[num]])
        return spread([x[key] / y[key] for x, y in zip(results[num], results[den])])

    # Wall-clock ratios, and CPU-time ratios (frames per CPU-second of loader worker + main
    # process vs. of the decode loop): the per-core efficiency, much less sensitive to other load.
    ratios = {}
    for name in ("stream_local", "stream_local_u8", "stream_local_u8_fresh", "stream_local_jpeg", "stream_s3",
                 "stream_s3_cached", "wds_stock"):
        if name in summary:
            ratios[f"{name}_vs_per_file"] = per_repeat(name, "per_file")
            ratios[f"{name}_vs_raw_decode"] = per_repeat(name, "raw_decode")
            ratios[f"{name}_vs_raw_decode_pil"] = per_repeat(name, "raw_decode_pil")
            # from the first batch on: worker start-up and the initial pool read excluded (training
            # starts the next epoch's loader before the current one ends, so it does not wait on them)
            ratios[f"{name}_vs_raw_decode_steady"] = spread(
                [x["steady_frames_per_s"] / x["raw_adjacent"]["frames_per_s"] for x in results[name]])
            ratios[f"{name}_vs_per_file_cpu"] = per_repeat(name, "per_file", "frames_per_cpu_s")
            ratios[f"{name}_vs_raw_decode_cpu"] = per_repeat(name, "raw_decode", "frames_per_cpu_s")
    # a persistent loader's first epoch (fork, fresh buffers) against the median raw decode rate
    raw_fps = statistics.median(x["frames_per_s"] for x in results["raw_decode"])
    for name, res in first_epoch.items():
        fps = (res["batches"] + 1) * P * K * N / res["total_s"]
        ratios[f"{name}_first_epoch_vs_raw_decode"] = spread([fps / raw_fps])
    ratios["per_file_vs_raw_decode"] = per_repeat("per_file", "raw_decode")
    ratios["per_file_vs_raw_decode_cpu"] = per_repeat("per_file", "raw_decode", "frames_per_cpu_s")
    ratios["raw_decode_pil_vs_raw_decode"] = per_repeat("raw_decode_pil", "raw_decode")
    ratios["raw_decode_aligned_vs_raw_decode"] = per_repeat("raw_decode_aligned", "raw_decode")
    ratios["raw_decode_batches_vs_raw_decode"] = per_repeat("raw_decode_batches", "raw_decode")
    ratios["stream_local_u8_vs_raw_decode_batches"] = per_repeat("stream_local_u8", "raw_decode_batches")
    ratios["stream_local_u8_vs_raw_decode_aligned"] = per_repeat("stream_local_u8", "raw_decode_aligned")
    ratios["stream_local_u8_vs_wds_stock"] = per_repeat("stream_local_u8", "wds_stock")
    ratios["stream_local_u8_vs_wds_stock_cpu"] = per_repeat("stream_local_u8", "wds_stock", "frames_per_cpu_s")
    for ab in ("stock_tar", "no_ring"):  # what the block stage and the ring are worth, same run
        ratios[f"stream_local_u8_vs_{ab}"] = per_repeat("stream_local_u8", f"stream_local_u8_{ab}")
        ratios[f"stream_local_u8_vs_{ab}_cpu"] = per_repeat("stream_local_u8", f"stream_local_u8_{ab}",
                                                            "frames_per_cpu_s")
    for name, v in summary.items():
        if "server_cpu_s" in v:
            print(f"{name}: S3 server (its own process) {v['server_cpu_s']:.2f} CPU-s per epoch, "
                  f"the stream's processes {v['loader_cpu_s']:.2f}")
    print(f"\n{'ratio (per repeat)':<34}{'min':>7}{'median':>8}{'max':>7}")
    for k, v in ratios.items():
        print(f"{k:<34}{v['min']:6.2f}x{v['median']:7.2f}x{v['max']:6.2f}x")
    print("targets: stream >= 2.00x per_file, stream >= 0.70x raw_decode")
    load = os.getloadavg()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"benchmark": "data_throughput", "args": vars(a), "summary": summary,
                       "ratios": ratios, "runs": results, "first_epoch": first_epoch, "cpu_count": os.cpu_count(),
                       "loadavg": load}, f, indent=1)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
