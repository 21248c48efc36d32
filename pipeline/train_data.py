"""The training stream (contract: docs/interfaces.md): P x K batches of N-frame clips per rank.

Per slot (rank x DataLoader worker), as named stages, after open_clip's ``get_wds_dataset``:

    shards of the epoch (seeded shuffle, split by node and worker: ``sampling.slot_shards``)
    -> tar to samples (``reading.shard_samples``: webdataset's stage, or the block stage)
    -> identity pool and P x K draw (``sampling.identity_batches``)
    -> clip sampling and decode of only the sampled frames (``_fill``)
    -> the consumer (``loader.make_loader``: uint8 over shared memory, normalised or decoded there)

Bad input is counted in each batch's ``skipped`` (``reading``); a frame that does not decode
replaces its clip (``transforms.replace_bad_clips``), with either decode path.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import shard_cache
from pipeline.loader import BatchRing, WorkerStream, make_loader
from pipeline.reading import Skips, shard_samples
from pipeline.sampling import identity_batches, sample_rng, slot_shards
from pipeline.shards import Manifest, as_manifest
from pipeline.transforms import (IMAGENET_MEAN, IMAGENET_STD, decode_into, erase_box, mean_fill, replace_bad_clips,
                                 restricted_indices)


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a training stream depends on but the epoch (``LoaderSpec.from_config`` builds it
    from ``cfg.data``). ``p`` is this rank's identities per batch.

    Args:
        clip_len, p, k, height, width: N frames per clip, identities per batch, tracklets each, size.
        batches_per_epoch: batches this rank hands out per epoch (split among its workers).
        seed: shuffle and sampling seed; rank, world_size: this rank's slot in the shard split.
        num_workers, prefetch_factor, pin_memory: the DataLoader's.
        hflip, random_erasing: per clip, a flip coin and (with this probability) one erased box.
        mean, std: ImageNet statistics (erasing fill, normalisation).
        normalize: float32 normalised clips; False: uint8 ``(B, N, H, W, 3)`` for the GPU, which also
            applies their flips and erasing (``transforms.augment_clips``).
        decode: "loader" (workers decode) or "device" (the consumer decodes, ``decode_clips``).
        persistent: one loader for many epochs (workers forked once, see ``train_loader``).
        cache_dir, cache_gb: node-local copies of s3:// shards (``pipeline.shard_cache``).
        reuse_buffers: workers reuse batch buffers (``loader``); tar_blocks: the block stage for
            shards in memory (False: webdataset's stage only). Both for the bench's A/B.
    """

    clip_len: int
    p: int
    k: int
    height: int
    width: int
    batches_per_epoch: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 2
    hflip: bool = True
    random_erasing: float = 0.0
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    pin_memory: bool = False
    prefetch_factor: int = 2
    normalize: bool = True
    decode: str = "loader"
    persistent: bool = False
    cache_dir: str | None = None
    cache_gb: float = 100.0
    reuse_buffers: bool = True
    tar_blocks: bool = True

    def __post_init__(self):
        if self.decode not in ("loader", "device"):
            raise ValueError(f"decode must be 'loader' or 'device', got {self.decode!r}")
        for name in ("clip_len", "p", "k", "height", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if (self.batches_per_epoch < 0 or not 0 <= self.rank < self.world_size
                or not 0.0 <= self.random_erasing <= 1.0):
            raise ValueError(f"bad arguments: batches_per_epoch={self.batches_per_epoch}, rank={self.rank}, "
                             f"world_size={self.world_size}, random_erasing={self.random_erasing}")
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))

    @classmethod
    def from_config(cls, cfg, *, rank: int, world_size: int, batches_per_epoch: int,
                    pin_memory: bool = False) -> "LoaderSpec":
        """The spec of one rank: ``cfg.data.p`` is the global identities per batch, each rank
        draws ``p // world_size`` (the config requires p divisible by the number of ranks).

        Args:
            cfg: the run's Config.
            rank, world_size: this rank and the number of ranks.
            batches_per_epoch: this rank's batches per epoch (``pipeline.epoch.batches_per_epoch``).
            pin_memory: pin batches (a CUDA device).
        """
        d = cfg.data
        if d.p % world_size:
            raise ValueError(f"data.p={d.p} is not divisible by {world_size} ranks")
        return cls(clip_len=d.clip_len, p=d.p // world_size, k=d.k, height=d.height, width=d.width,
                   batches_per_epoch=batches_per_epoch, seed=cfg.seed, rank=rank, world_size=world_size,
                   num_workers=d.num_workers, hflip=d.hflip, random_erasing=d.random_erasing,
                   pin_memory=pin_memory, prefetch_factor=d.prefetch_factor, normalize=False,
                   decode=d.decode, persistent=d.persistent_workers, cache_dir=d.cache_dir or None,
                   cache_gb=d.cache_gb)


def _fill(batch: list, ring: BatchRing, spec: LoaderSpec, rng: np.random.Generator, skips: Skips, fill) -> dict:
    """Decode stage: one P x K batch from its ``(pid, (meta, frames))`` tracklets. Per clip,
    restricted sampling of N frames, a flip coin and an erasing draw (the same draws with either
    decode path and whatever decodes, so both give equal model inputs); only sampled frames are read.
    The draws travel with the batch: the device applies them (``transforms.augment_clips``)."""
    n, clip_len = len(batch), spec.clip_len
    encoded = spec.decode == "device"
    pids = np.fromiter((pid for pid, _ in batch), np.int64, n)
    camids = np.fromiter((meta["camid"] for _, (meta, _) in batch), np.int64, n)
    flips, erase = np.zeros(n, dtype=bool), np.zeros((n, 4), dtype=np.int64)
    jpegs: list = [b""] * (n * clip_len)
    bad: list[int] = []
    if not encoded:
        clips, u8, buffer_id = ring.get((n, clip_len, spec.height, spec.width, 3))
    for j, (_, (meta, frames)) in enumerate(batch):
        idx = restricted_indices(len(frames), clip_len, rng)
        flips[j] = spec.hflip and rng.random() < 0.5
        if spec.random_erasing > 0 and rng.random() < spec.random_erasing:
            box = erase_box(spec.height, spec.width, rng)
            if box is not None:  # same rectangle on every frame of the clip
                erase[j] = box
        try:
            for i, fi in enumerate(idx):
                if encoded:
                    jpegs[j * clip_len + i] = frames[fi]
                else:
                    decode_into(frames[fi], u8[j, i])
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad data; a misplaced frame
            if encoded:  # the consumer's decode meets the empty frame, counts and replaces the clip
                continue
            skips.add("clip", f"tracklet {meta.get('tracklet', meta['index'])}", f"frame {fi} does not decode ({e})")
            bad.append(j)
            continue
    if encoded:  # one buffer + bounds: a single pickled object, not B*N small ones
        offsets = np.zeros(len(jpegs) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in jpegs], out=offsets[1:])
        return {"jpegs": np.frombuffer(b"".join(jpegs), dtype=np.uint8), "offsets": offsets, "flips": flips,
                "erase": erase, "pids": pids, "camids": camids, "skipped": skips.take()}
    replace_bad_clips(u8, bad, pids, fill, flips, erase)
    # flips and erasing travel with the batch, applied by the consumer (on the GPU: augment_clips)
    return {"clips": clips, "flips": flips, "erase": erase, "pids": pids, "camids": camids,
            "skipped": skips.take(), "_buffer": buffer_id}


def _train_worker(worker: int, num_workers: int, ring: BatchRing, *, spec: LoaderSpec, manifest: Manifest,
                  epoch: int, cache=None):
    b = spec.batches_per_epoch
    n_batches = b // num_workers + (worker < b % num_workers)
    if n_batches == 0:
        return
    slot = dict(seed=spec.seed, epoch=epoch, rank=spec.rank, world_size=spec.world_size, worker=worker,
                num_workers=num_workers)
    rng = sample_rng(**slot)
    skips = Skips()
    fill = mean_fill(spec.mean)
    train = manifest.split("train")
    num_classes, expected = manifest.num_classes, train.tracklets()

    def read(shard):  # tar to samples -> (pid, tracklet), labels checked
        for _, meta, frames in shard_samples(shard, skips, cache=cache, expected=expected.get(shard),
                                             blocks=spec.tar_blocks):
            if 0 <= meta["pid"] < num_classes:
                yield meta["pid"], (meta, frames)
            else:
                skips.add("sample", shard, f"pid {meta['pid']} outside 0..{num_classes - 1}")

    own, more = slot_shards(list(train.urls), **slot)
    batches = identity_batches(read, own, more, p=spec.p, k=spec.k, n_batches=n_batches, rng=rng,
                               num_ids=train.num_identities, shard_ids=train.identities(),
                               total_shards=len(train.urls))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except RuntimeError as e:
            raise RuntimeError(f"{e} ({skips.total} inputs skipped)") from None
        out = _fill(batch, ring, spec, rng, skips, fill)
        yield out
        out = None  # the consumer's now: no reference from here may keep its buffer alive


def train_loader(source, spec: LoaderSpec | None = None, *, epoch: int = 0, device=None, **fields):
    """Training stream for one rank: exactly ``spec.batches_per_epoch`` P x K batches
    ``{"clips": float32 (P*K, N, 3, H, W), "pids": long, "camids": long, "skipped": int}``
    (uint8 ``(P*K, N, H, W, 3)`` with ``normalize=False``; with ``decode="loader"`` those come
    with ``"flips"`` and ``"erase"``, the clips' draws still to apply on the device, where they are
    free: ``transforms.model_input(..., flips=, erase=)``).

    Shards: disjoint across ranks x workers within an epoch, reshuffled per (seed, epoch),
    resampled when a worker runs out (``sampling.train_shard_assignment``); batches split among
    workers (worker w makes ``B//W + (w < B%W)``). Output is a deterministic function of (seed,
    epoch, rank, world_size, num_workers); ``num_workers=0`` runs in-process and equals 1.

    ``decode="device"``: workers ship the sampled JPEGs, the iterating process decodes each batch
    on ``device`` (``transforms.decode_clips``: nvJPEG on a GPU, libjpeg-turbo on CPU, where the
    batches equal ``decode="loader"``'s exactly).

    ``persistent``: one loader for many epochs: worker processes forked once, keeping their
    batch buffers; its i-th ``iter()`` hands out epoch ``epoch + i`` (equal to
    ``train_loader(epoch=epoch + i)``; the previous epoch's batches must all have been taken);
    ``close()`` stops the workers. ``pipeline.prefetch.epoch_batches`` uses it.

    Args:
        source: the dataset URL or its Manifest (read once by the caller).
        spec: the stream's settings; None: built from ``fields`` (LoaderSpec's fields).
        epoch: the (first) epoch.
        device: where ``decode="device"`` decodes (default CPU).
    """
    if spec is None:
        spec = LoaderSpec(**fields)
    elif fields:
        spec = dataclasses.replace(spec, **fields)
    man = as_manifest(source)
    train = man.split("train")
    if train.num_identities < spec.p:
        raise ValueError(f"{man.url}: {train.num_identities} training identities, fewer than P={spec.p}")
    if not train.urls:
        raise ValueError(f"{man.url}: no training shards")
    fn = functools.partial(_train_worker, spec=spec, manifest=man,
                           cache=shard_cache.for_manifest(man.url, man.raw["splits"]["train"], spec.cache_dir,
                                                          spec.cache_gb))
    if not spec.persistent:
        fn = functools.partial(fn, epoch=epoch)
    dec = None
    if spec.decode == "device":
        dec = dict(clip_len=spec.clip_len, height=spec.height, width=spec.width, fill=mean_fill(spec.mean),
                   device=torch.device(device if device is not None else "cpu"))
    ds = WorkerStream(fn, spec.batches_per_epoch, epoch if spec.persistent else None)
    return make_loader(ds, spec.num_workers, spec.pin_memory, spec.prefetch_factor, spec.mean, spec.std,
                       spec.normalize, dec, spec.persistent, reuse=spec.reuse_buffers)
