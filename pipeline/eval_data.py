"""The evaluation stream (contract: docs/interfaces.md): every tracklet of a split, all frames,
cut into consecutive N-frame clips, each tracklet read by exactly one (rank, worker).

Stages per slot: the slot's ``(shard, part, parts)`` units (``reading.eval_assignment``) -> tar to
samples (``reading.shard_samples``) -> decode every frame -> clips -> batches of up to
``clips_per_batch``. A tracklet with a frame that does not decode is counted in ``skipped`` and
dropped (evaluation cannot substitute another tracklet's clips; ``pipeline.distributed_eval.extract``
reports tracklets left without clips).
"""
from __future__ import annotations

import functools

import numpy as np

from pipeline import shard_cache
from pipeline.loader import BatchRing, WorkerStream, make_loader
from pipeline.reading import Skips, eval_assignment, shard_samples
from pipeline.shards import Manifest, as_manifest
from pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD, decode_into, eval_clip_indices, frame_buffer


def _eval_worker(worker: int, num_workers: int, ring: BatchRing, *, manifest: Manifest, split: str, clip_len: int,
                 height: int, width: int, rank: int, world_size: int, clips_per_batch: int, cache=None):
    skips = Skips()
    info = manifest.split(split)
    expected = info.tracklets()
    units = eval_assignment(list(info.urls), rank=rank, world_size=world_size, worker=worker,
                            num_workers=num_workers)
    shape = (clips_per_batch, clip_len, height, width, 3)
    fill = 0
    ready = None  # a full batch is held back until more data (or the end), so that skips met
    #               after it still ride on a batch of this worker

    def new_batch():
        return (*ring.get(shape), *(np.empty(clips_per_batch, dtype=np.int64) for _ in range(3)))

    clips, u8, buffer_id, index, pids, camids = new_batch()

    def emit(n):
        return {"clips": clips[:n], "index": index[:n], "pids": pids[:n], "camids": camids[:n],
                "skipped": 0, "_buffer": buffer_id}

    scratch = frame_buffer((0, height, width, 3)).numpy()  # a tracklet's decoded frames, reused
    for shard, part, parts in units:
        for _, meta, frames in shard_samples(shard, skips, part=part, parts=parts, cache=cache,
                                             expected=expected.get(shard)):
            if len(scratch) < len(frames):
                scratch = frame_buffer((max(len(frames), 2 * len(scratch)), height, width, 3)).numpy()
            decoded = scratch[:len(frames)]
            try:
                for i, fr in enumerate(frames):
                    decode_into(fr, decoded[i])
            except (OSError, ValueError, SyntaxError) as e:
                skips.add("sample", f"{shard} tracklet {meta['index']}", f"a frame does not decode ({e})")
                continue
            for clip in eval_clip_indices(len(decoded), clip_len):
                if fill == clips_per_batch:
                    if ready is not None:
                        ready["skipped"] = skips.take()
                        yield ready
                    ready, fill = emit(fill), 0
                    clips, u8, buffer_id, index, pids, camids = new_batch()
                for n, fi in enumerate(clip):
                    u8[fill, n] = decoded[fi]
                index[fill], pids[fill], camids[fill] = meta["index"], meta["pid"], meta["camid"]
                fill += 1
    if ready is not None:
        ready["skipped"] = skips.take() if fill == 0 else 0
        yield ready
    if fill or skips.pending:  # an empty batch only to deliver skips of a worker with no clips
        last = emit(fill)
        last["skipped"] = skips.take()
        yield last


def eval_loader(source, split: str, *, clip_len: int, height: int, width: int, rank: int = 0,
                world_size: int = 1, num_workers: int = 2, clips_per_batch: int = 32,
                mean=IMAGENET_MEAN, std=IMAGENET_STD, pin_memory: bool = False,
                normalize: bool = True, cache_dir: str | None = None, cache_gb: float = 100.0):
    """Evaluation stream over ``split`` for one rank: dicts ``{"clips": float32 (b, N, 3, H, W),
    "index": long (b,), "pids", "camids", "skipped": int}``, b <= ``clips_per_batch`` (b == 0
    only for a batch that just carries skips).

    Each tracklet is seen once: all its frames in order, resized to H x W, cut into consecutive
    N-frame clips, the last padded by repeating the last frame; its clips are consecutive within
    one worker's output. Batches of different workers interleave: use ``index`` (split order) and
    ``pipeline.distributed_eval.extract`` rather than arrival order.

    Args:
        source: the dataset URL or its Manifest.
        split: "query", "gallery" or "train".
        clip_len, height, width: N, and the frame size.
        rank, world_size: this rank's share.
        num_workers, pin_memory: the DataLoader's.
        clips_per_batch: batch size in clips.
        mean, std, normalize: as ``train_data.LoaderSpec`` (``normalize=False``: uint8 clips).
        cache_dir, cache_gb: node-local copies of s3:// shards.
    """
    for name, v in (("clip_len", clip_len), ("height", height), ("width", width),
                    ("clips_per_batch", clips_per_batch)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} for world_size {world_size}")
    man = as_manifest(source)
    man.split(split)  # an unknown or missing split fails here, not in a worker
    fn = functools.partial(_eval_worker, manifest=man, split=split, clip_len=clip_len, height=height,
                           width=width, rank=rank, world_size=world_size, clips_per_batch=clips_per_batch,
                           cache=shard_cache.for_manifest(man.url, man.raw["splits"][split], cache_dir,
                                                          cache_gb))
    return make_loader(WorkerStream(fn), num_workers, pin_memory, 2, tuple(mean), tuple(std), normalize)
