"""Streaming loaders over WebDataset-style tracklet shards (contract: docs/interfaces.md).

Training (`train_loader`): each (rank, DataLoader worker) reads its own shards, keeps the raw
bytes of whole identities in a small pool, and emits P x K batches; only the N sampled frames of
a tracklet are ever decoded. Evaluation (`eval_loader`): every tracklet of a split, all frames,
cut into consecutive N-frame clips, each tracklet read by exactly one (rank, worker).

Shards are parsed by a small streaming tar reader (`_TarReader`) over `pipeline.storage.open_read`
(local files and S3 alike), one pass, no seeking, no temp files.

Bad input never crashes a loader and is never lost silently. Each of these counts 1 in the
``skipped`` field of the next batch of the worker that met it (and is logged as a warning):
  * a bad sample: missing/invalid JSON, frame count != ``n_frames``, a frame that does not decode
    (the whole tracklet is dropped; a tracklet's frames are never silently thinned);
  * a truncated or corrupt shard: the rest of that shard is skipped, the worker goes on with its
    next shard (samples completed before the damage are kept);
  * a shard that cannot be opened.
In training, JPEGs are only decoded when sampled, so a tracklet with a bad frame is detected
(and dropped for the rest of the epoch) when one of its bad frames is first drawn.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import re
import weakref
import zlib
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import shard_cache, storage
from pipeline.transforms import (IMAGENET_MEAN, IMAGENET_STD, check_jpeg, decode_clips, decode_into, erase_box,
                                 eval_clip_indices, frame_buffer, mean_fill, normalize_clips,
                                 restricted_indices)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "normalize_clips", "read_manifest", "split_counts", "train_loader",
           "eval_loader", "train_shard_assignment", "eval_assignment",
           "iter_tar", "iter_samples", "TarError"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "sta-reid-shards/1"
SPLITS = ("train", "query", "gallery")
POOL_FACTOR = 4   # a training worker keeps >= POOL_FACTOR * P identities buffered to draw from
_TAG_SHARDS, _TAG_SAMPLES = 0x5AD, 0x5A3  # RNG stream tags (shard order vs. sampling)

try:  # S3 read failures surface as botocore errors, not OSError
    from botocore.exceptions import BotoCoreError, ClientError
    _READ_ERRORS: tuple = (OSError, EOFError, ValueError, BotoCoreError, ClientError)
except ImportError:  # pragma: no cover - boto3 is a dependency
    _READ_ERRORS = (OSError, EOFError, ValueError)


# =========================================================================== manifest
def read_manifest(url) -> dict:
    """The dataset's ``manifest.json``; ``FileNotFoundError`` "not a dataset (no manifest.json)"
    if absent, ``ValueError`` if it is not a ``sta-reid-shards/1`` manifest."""
    murl = storage.join(url, MANIFEST)
    try:
        raw = storage.read_bytes(murl)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: not a dataset (no {MANIFEST})") from None
    try:
        man = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{murl}: unreadable manifest ({e})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT or not isinstance(man.get("splits"), dict):
        raise ValueError(f"{murl}: not a {FORMAT} manifest (format={man.get('format') if isinstance(man, dict) else None!r})")
    return man


def _split(man: dict, split: str, url) -> dict:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected one of {SPLITS})")
    if split not in man["splits"]:
        raise ValueError(f"{url}: the manifest has no {split!r} split")
    return man["splits"][split]


def split_counts(url, split: str) -> dict:
    """``{"num_tracklets", "num_identities", "num_frames", "num_shards"}`` of a split, from the
    manifest: what an evaluator should expect to see (``pipeline.evaluation`` sizes its buffers with it)."""
    s = _split(read_manifest(url), split, url)
    return {"num_tracklets": int(s["num_tracklets"]), "num_identities": int(s["num_identities"]),
            "num_frames": int(s["num_frames"]), "num_shards": len(s["shards"])}


# =========================================================================== tar reading
class TarError(ValueError):
    """A shard is truncated or its tar structure is corrupt."""


_ZERO_BLOCK = bytes(512)


def _tar_number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for big values
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _signed_checksum_ok(hdr: bytes, stored: int) -> bool:
    """The exact unsigned sum, or the signed-byte sum some old writers store."""
    unsigned = sum(hdr) - sum(hdr[148:156]) + 256
    return stored in (unsigned, unsigned - 256 * sum(1 for b in hdr[:148] + hdr[156:] if b > 127))


def _tar_str(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax(data: bytes) -> dict:
    out, pos = {}, 0
    while pos < len(data):
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        key, _, value = data[sp + 1:pos + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


class _Chunks:
    """Sequential reads of ~``chunk`` bytes; ``take(n)`` hands out the next n bytes as a zero-copy
    memoryview of the current chunk (a copy only for the few members that straddle two chunks)."""

    def __init__(self, f, chunk: int, data=None):
        self.f, self.chunk = f, chunk
        self.buf, self.view, self.pos, self.base = b"", memoryview(b""), 0, 0  # base: offset of buf[0]
        if data is not None:  # the start of the stream is already in memory (a mapped file)
            self.buf = self.view = memoryview(data)

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def take(self, n: int):
        """The next ``n`` bytes (fewer only at the end of the stream)."""
        if self.pos + n <= len(self.buf):
            self.pos += n
            return self.view[self.pos - n:self.pos]
        parts = [self.view[self.pos:]]
        have = len(parts[0])
        while have < n:
            data = self.f.read(max(self.chunk, n - have))
            self.base += len(self.buf)
            self.buf, self.view, self.pos = data, memoryview(data), 0
            if not data:
                break
            k = min(n - have, len(data))
            parts.append(self.view[:k])
            have, self.pos = have + k, k
        return b"".join(parts)

    def unread(self, data) -> None:
        """Put back the bytes the last ``take`` handed out, so they are read again."""
        n = len(data)
        if self.pos >= n:  # still in the current read
            self.pos -= n
        else:
            self.base += self.pos - n
            self.buf = bytes(data) + bytes(self.view[self.pos:])
            self.view, self.pos = memoryview(self.buf), 0

    def skip(self, n: int) -> int:
        """Advance ``n`` bytes without handing them out; the number skipped (fewer at the end)."""
        done = 0
        while done < n:
            if self.pos == len(self.buf):
                data = self.f.read(self.chunk)
                self.base += len(self.buf)
                self.buf, self.view, self.pos = data, memoryview(data), 0
                if not data:
                    break
            k = min(n - done, len(self.buf) - self.pos)
            self.pos, done = self.pos + k, done + k
        return done


class _TarReader:
    """Streaming tar parser over a file object: ``next()`` returns the next regular file member
    as ``(name, data)`` or None at the end-of-archive block; ``block(n)`` consumes ``n`` raw bytes
    (a run of members whose layout the caller already knows) and ``unread`` puts them back when
    the layout turns out not to be the expected one.

    Handles ustar, GNU long names and pax headers. Raises ``TarError`` on a bad header checksum,
    a member cut short, or a stream that ends without the end-of-archive block (a shard truncated
    at a member boundary). Reads ~``chunk`` bytes at a time and hands out member data as
    read-only memoryviews into those reads (bytes-like; ``bytes(data)`` for a copy)."""

    def __init__(self, f, chunk: int = 1 << 20, data=None):
        self.src = _Chunks(f, chunk, data)

    def next(self):
        src, long_name, pax = self.src, None, {}
        while True:
            at = src.offset
            hdr = bytes(src.take(512))
            if len(hdr) < 512:
                raise TarError(f"truncated: stream ends at byte {at + len(hdr)} without end-of-archive")
            if hdr == _ZERO_BLOCK:
                return None
            # Fast path for the common "%011o\0" / "%06o\0 " fields; anything else (base-256,
            # other padding) goes through _tar_number.
            try:
                size = int(hdr[124:135], 8) if hdr[135] in (0, 32) else _tar_number(hdr[124:136])
                stored = int(hdr[148:154], 8) if hdr[154] in (0, 32) else _tar_number(hdr[148:156])
            except ValueError:
                try:
                    stored, size = _tar_number(hdr[148:156]), _tar_number(hdr[124:136])
                except ValueError:
                    raise TarError(f"corrupt header at byte {at}") from None
            # Byte sum of the header from adler32 (C speed; sum(hdr) was a quarter of the parsing
            # time): its low half is 1 + sum mod 65521, and a 512-byte sum is < 2 * 65521, so the
            # sum is one of two candidates; a stored checksum matching either is the exact check.
            low = (zlib.adler32(hdr) & 0xFFFF) - 1 - sum(hdr[148:156]) + 256
            if stored != low and stored != low + 65521 and not _signed_checksum_ok(hdr, stored):
                raise TarError(f"corrupt header at byte {at} (checksum mismatch)")
            kind = hdr[156:157]
            if pax and kind not in (b"x", b"g", b"L") and "size" in pax:
                size = int(pax["size"])
            data = src.take(size)
            if len(data) < size:
                raise TarError(f"truncated inside member {_tar_str(hdr[:100])!r} "
                               f"(stream ends at byte {src.offset})")
            if size % 512:
                src.skip(512 - size % 512)  # padding; a short read surfaces at the next header
            if kind == b"0" or kind == b"\0" or kind == b"7":
                if pax and "path" in pax:
                    return pax["path"], data
                if long_name is not None:
                    return long_name, data
                name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if hdr[345] and hdr[257:262] == b"ustar":
                    name = f"{_tar_str(hdr[345:500])}/{name}"
                return name, data
            if kind == b"x":
                pax = _pax(bytes(data))
            elif kind == b"L":
                long_name = _tar_str(bytes(data))
            elif kind != b"g":
                long_name, pax = None, {}

    def block(self, n: int):
        """The next ``n`` raw bytes (fewer only where the stream ends)."""
        return self.src.take(n)

    def unread(self, data) -> None:
        self.src.unread(data)


def iter_tar(f, chunk: int = 1 << 20) -> Iterator[tuple[str, memoryview | bytes]]:
    """Stream ``(name, data)`` of the regular files of a tar archive read from file object ``f``
    (see ``_TarReader`` for the formats handled and the errors raised)."""
    r = _TarReader(f, chunk)
    while (m := r.next()) is not None:
        yield m


# =========================================================================== samples
class _Skips:
    """Per-worker count of skipped inputs, handed out with the next batch."""

    def __init__(self):
        self.pending = 0
        self.total = 0

    def add(self, what: str, where: str, why) -> None:
        self.pending += 1
        self.total += 1
        log.warning("skipped %s in %s: %s", what, where, why)

    def take(self) -> int:
        n, self.pending = self.pending, 0
        return n


_FRAME = re.compile(r"(\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)


def _check_meta(key: str, meta) -> dict:
    if not isinstance(meta, dict):
        raise ValueError(f"sample {key!r}: json is not an object")
    for field in ("pid", "camid", "n_frames", "index"):
        if not isinstance(meta.get(field), int):
            raise ValueError(f"sample {key!r}: json field {field!r} missing or not an int")
    return meta


def _make_sample(key: str, members: dict, where: str, meta=None) -> tuple[dict, list[bytes]]:
    """Validate one tracklet's members -> (meta, frames in order); ValueError says why not.
    ``meta``: the json member already parsed."""
    if "json" not in members:
        raise ValueError(f"sample {key!r} has no {key}.json")
    raw = members.pop("json")
    if meta is None:
        try:
            meta = json.loads(bytes(raw))
        except ValueError as e:
            raise ValueError(f"sample {key!r}: bad json ({e})") from None
    _check_meta(key, meta)
    frames = sorted((int(m.group(1)), data) for ext, data in members.items()
                    if (m := _FRAME.fullmatch(ext)))
    if len(frames) != meta["n_frames"] or [i for i, _ in frames] != list(range(len(frames))):
        raise ValueError(f"sample {key!r}: {len(frames)} frames, json says n_frames={meta['n_frames']}")
    if not frames:
        raise ValueError(f"sample {key!r}: no frames")
    return meta, [d for _, d in frames]


def _frame_layout(meta) -> tuple[list[int], list[int], int] | None:
    """The json's ``frame_bytes`` (``pipeline.pack`` writes it) when usable: the frames follow the
    json as plain ustar members ``<key>.NNN.jpg`` of these sizes, one header block each. Returns
    ``(sizes, offsets, total)``: frame i's member starts at ``offsets[i]`` in the sample's block of
    ``total`` bytes. (Plain Python: for ~40 ints it is twice as fast as numpy.)"""
    sizes = meta.get("frame_bytes") if isinstance(meta, dict) else None
    if not (isinstance(sizes, list) and sizes and len(sizes) == meta.get("n_frames")):
        return None
    offsets, end = [], 0
    for size in sizes:
        if type(size) is not int or size < 0:  # bools and floats too
            return None
        offsets.append(end)
        end += (size + 1023) >> 9 << 9  # a 512-byte header, then the data padded to 512-byte blocks
    return sizes, offsets, end


class _Frames:
    """A tracklet's encoded frames read as one block of tar members: frame i is sliced out when
    accessed, after checking its tar header names it, so the 90% of frames that training never
    samples cost no parsing at all. Bytes-like items, like a list of memoryviews."""

    __slots__ = ("key", "prefix", "block", "offsets", "sizes")

    def __init__(self, key: str, block, sizes: list[int], offsets: list[int]):
        self.key, self.block, self.sizes, self.offsets = key, memoryview(block), sizes, offsets
        self.prefix = key.encode()

    def __len__(self) -> int:
        return len(self.sizes)

    def _name_ok(self, i: int) -> bool:
        name = b"%s.%03d.jpg\0" % (self.prefix, i)
        off = self.offsets[i]
        return self.block[off:off + len(name)] == name

    def __getitem__(self, i: int):
        if not -len(self.sizes) <= i < len(self.sizes):
            raise IndexError(i)
        i %= len(self.sizes)
        if not self._name_ok(i):
            raise ValueError(f"sample {self.key!r}: frame {i} is not where the json's frame_bytes put it")
        start = self.offsets[i] + 512
        return self.block[start:start + self.sizes[i]]

    def __iter__(self):
        return (self[i] for i in range(len(self.sizes)))


def iter_samples(shard_url, skips: _Skips | None = None, *, part: int = 0, parts: int = 1,
                 cache: shard_cache.ShardCache | None = None) -> Iterator[tuple[int, dict, list[bytes]]]:
    """Stream the valid samples of one shard as ``(position, meta, frames)``; ``frames`` is a
    sequence of the raw encoded frames (bytes-like, see ``_TarReader``) in temporal order,
    ``position`` counts every sample of the shard.

    Samples whose json comes first and lists ``frame_bytes`` (what ``pipeline.pack`` writes) are
    read as one block without parsing their frames' headers (``_Frames``); any other layout is
    grouped member by member. Only positions with ``position % parts == part`` are validated and
    yielded (co-readers of a shard split it this way). A bad
    sample is counted in ``skips`` by its owner; a truncated or corrupt shard, or one that cannot
    be opened, ends the iteration after counting 1 (by the ``part == 0`` reader only). Without
    ``skips``, errors raise instead. ``cache``: a remote shard is read from its local copy
    when there is one, else streamed and copied there (``pipeline.shard_cache``)."""
    pos, key, members, meta = 0, None, {}, None  # meta: the current sample's json, once parsed
    where = str(shard_url)

    def bad(e):
        if skips is None:
            raise e
        skips.add("sample", where, e)

    def finish():
        try:
            return _make_sample(key, members, where, meta)
        except ValueError as e:
            bad(e)
            return None

    try:
        mapped = storage.map_local(shard_url)  # local shards: only the pages used are touched
        if mapped is None and cache is not None:
            mapped = cache.map(shard_url)
        with (contextlib.nullcontext(io.BytesIO()) if mapped is not None
              else cache.filling(shard_url) if cache is not None else storage.open_read(shard_url)) as f:
            tar = _TarReader(f, 4 << 20, mapped)  # a tracklet's block rarely straddles two 4 MiB reads
            while (m := tar.next()) is not None:
                name, data = m
                k, dot, ext = name.partition(".")
                if not dot:
                    continue  # not a sample member
                if k == key:
                    members[ext] = data
                    continue
                if key is not None:
                    if pos % parts == part and (sample := finish()) is not None:
                        yield (pos, *sample)
                    pos += 1
                key, members, meta = k, {ext: data}, None
                if ext != "json":
                    continue
                try:
                    meta = json.loads(bytes(data))
                except ValueError:
                    continue  # reported by the member-by-member path
                if (layout := _frame_layout(meta)) is None:
                    continue
                sizes, offsets, n = layout
                block = tar.block(n)
                frames = _Frames(k, block, sizes, offsets)
                if len(block) < n or not (frames._name_ok(0) and frames._name_ok(len(sizes) - 1)):
                    # not the promised layout (a frame missing, extra headers, a cut shard...):
                    # read this sample member by member, as any other WebDataset sample
                    tar.unread(block)
                    continue
                if pos % parts == part:
                    try:
                        _check_meta(k, meta)
                    except ValueError as e:
                        bad(e)
                    else:
                        yield pos, meta, frames
                pos, key, members, meta = pos + 1, None, {}, None
            if key is not None and pos % parts == part and (sample := finish()) is not None:
                yield (pos, *sample)
    except _READ_ERRORS as e:
        if skips is None:
            raise
        if part == 0:
            skips.add("rest of shard", where, e)


# =========================================================================== assignment
def _epoch_order(n: int, seed: int, epoch: int, rnd: int) -> list[int]:
    return np.random.default_rng([_TAG_SHARDS, seed, epoch, rnd]).permutation(n).tolist()


def train_shard_assignment(shards: list[str], *, seed: int, epoch: int, rank: int, world_size: int,
                           worker: int, num_workers: int, round: int = 0) -> list[str]:
    """The shards (rank, worker) reads in resampling round ``round`` of an epoch (pure function).

    All slots shuffle the shard list with the same (seed, epoch, round) permutation; slot
    ``rank * num_workers + worker`` takes every (world_size*num_workers)-th shard of it, so within
    a round the slots' sets are disjoint and together cover every shard. Round r+1 (a worker ran
    out) reshuffles with a new sub-seed. With fewer shards than slots, a slot without a share
    reads one shard chosen from the permutation (not disjoint; pack more shards to avoid it)."""
    slots = world_size * num_workers
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ValueError(f"bad slot rank={rank}/{world_size} worker={worker}/{num_workers}")
    if not shards:
        return []
    order = _epoch_order(len(shards), seed, epoch, round)
    slot = rank * num_workers + worker
    mine = order[slot::slots] or [order[slot % len(shards)]]
    return [shards[i] for i in mine]


def eval_assignment(shards: list[str], *, rank: int, world_size: int, worker: int,
                    num_workers: int) -> list[tuple[str, int, int]]:
    """The ``(shard, part, parts)`` units (rank, worker) reads for evaluation (pure function).

    With at least as many shards as slots, ``parts`` is 1 and slot j takes shards j, j+S, ...
    Otherwise every shard is split by sample position (position % parts == part), so all slots
    get work. Either way each tracklet belongs to exactly one slot."""
    slots = world_size * num_workers
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ValueError(f"bad slot rank={rank}/{world_size} worker={worker}/{num_workers}")
    if not shards:
        return []
    parts = max(1, math.ceil(slots / len(shards)))
    units = [(s, q, parts) for s in shards for q in range(parts)]
    return units[rank * num_workers + worker::slots]


# =========================================================================== loaders (shared)
class _WorkerStream(IterableDataset):
    """Calls ``fn(worker, num_workers, ring)`` in each DataLoader worker (0, 1 in-process), ``ring``
    being that worker's ``_BatchRing`` over ``flags`` (set by ``_make_loader`` before any fork).

    ``epoch`` given (persistent loaders): the i-th ``iter()`` in a worker process runs
    ``fn(..., epoch=epoch + i)``, and the worker keeps its ring across epochs. Each DataLoader
    epoch calls ``iter()`` once per worker, so the count is the same in every worker."""

    def __init__(self, fn, length: int | None = None, epoch: int | None = None):
        self.fn, self.length, self.epoch = fn, length, epoch
        self.flags, self.ring_size = None, 0
        self.by_slot = False  # ship batches in ring buffers the consumer holds as (slot, shape)
        self.ring: _BatchRing | None = None

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if self.ring is None or self.epoch is None:
            self.ring = _BatchRing(self.flags, worker * self.ring_size, self.ring_size, info is not None)
        if self.epoch is None:
            batches = self.fn(worker, workers, self.ring)
        else:
            self.epoch += 1
            batches = self.fn(worker, workers, self.ring, epoch=self.epoch - 1)
        return _ship_by_slot(batches, self.ring) if self.by_slot and info is not None else iter(batches)

    def __len__(self):
        if self.length is None:
            raise TypeError("this stream has no fixed length")
        return self.length


class _BatchRing:
    """Batch buffers a worker reuses once the consumer has let go of them.

    A fresh 12.6 MB batch costs ~3,000 page faults (4-5 ms on the development VM, ~35 us per
    frame) where refilling a used one costs ~0.8 ms. ``flags`` is a small int32 tensor shared by
    the worker and the consuming process: the worker sets a buffer's flag when it hands the buffer
    out; the consumer clears it when its own storage of that batch dies (a finalizer on the
    storage, which fires only once no tensor, view or numpy array refers to it: see
    ``_Normalized.convert``). A flagged buffer is never written; with all flagged (a consumer that
    keeps its batches) the worker allocates a new one, as without a ring. In a worker process the
    buffers live in shared memory, so the DataLoader passes a handle instead of copying them."""

    def __init__(self, flags: torch.Tensor | None, base: int, size: int, shared: bool):
        self.flags = flags.numpy() if flags is not None else None  # None: no reuse
        self.base, self.size, self.shared = base, size, shared
        self.bufs: list[torch.Tensor] = []
        self.sent: set[int] = set()  # slots whose buffer the consumer has received (_ship_by_slot)

    def get(self, shape) -> tuple[torch.Tensor, np.ndarray, int]:
        """``(tensor, numpy view, slot)``; slot -1: a buffer outside the ring."""
        if self.flags is not None:
            for i, t in enumerate(self.bufs):
                if self.flags[self.base + i] == 0 and t.shape == shape:
                    self.flags[self.base + i] = 1
                    return t, t.numpy(), self.base + i
        t = frame_buffer(shape, shared=self.shared)  # off-aligned: cached stores when decoding into it
        slot = -1
        if self.flags is not None and len(self.bufs) < self.size:
            slot = self.base + len(self.bufs)
            self.bufs.append(t)
            self.flags[slot] = 1
        return t, t.numpy(), slot


def _release(flags: np.ndarray, slot: int) -> None:
    flags[slot] = 0


def _ship_by_slot(batches, ring: _BatchRing):
    """Worker side of shipping by slot: a batch in a ring buffer carries ``_shape`` and ``_offset``
    (its clips are the buffer's leading rows, at that offset in its storage); once the consumer has been sent a buffer, later batches in it
    travel without the tensor. Sending a shared-memory tensor again would cost a file-descriptor
    hand-over (a socket connection with an authentication round trip) and a fresh mapping in the
    consumer for every batch; ``_Normalized.convert`` keeps each buffer mapped instead."""
    for b in batches:
        slot = b.get("_slot", -1)
        if slot >= 0:
            clips = b["clips"]
            buf = ring.bufs[slot - ring.base]
            assert clips.data_ptr() == buf.data_ptr() and clips.is_contiguous(), "clips must lead their buffer"
            b["_shape"], b["_offset"] = tuple(clips.shape), clips.storage_offset()
            if slot in ring.sent:
                del b["clips"]
            else:
                ring.sent.add(slot)
            del clips, buf
        yield b


class _Normalized:
    """Iterable over a DataLoader of uint8 ``(B, N, H, W, 3)`` batches that hands out float32
    ``(B, N, 3, H, W)`` normalised clips: workers ship 4x fewer bytes, and the conversion is
    one vectorised pass in the consumer (or, with ``normalize=False``, on the GPU via
    ``normalize_clips``). ``iter()`` starts the DataLoader, i.e. forks its workers, which begin
    reading shards at once (training starts the next epoch's iterator before this one ends).

    ``persistent``: the workers are forked once and serve epoch after epoch: each ``iter()``
    hands out exactly ``len()`` batches of the next epoch (and makes the workers start it, so
    call it once the previous epoch's batches are all taken); ``close()`` stops them."""

    def __init__(self, loader: DataLoader, mean, std, normalize: bool, pin: bool, decode=None,
                 persistent: bool = False):
        self.loader, self.mean, self.std, self.normalize, self.pin = loader, mean, std, normalize, pin
        self.decode = decode  # kwargs of decode_clips for batches shipped as JPEG bytes
        self.persistent = persistent
        flags = getattr(loader.dataset, "flags", None)  # _BatchRing's flags, shared with the workers
        self.flags = flags.numpy() if flags is not None else None
        self.slots: dict[int, np.ndarray] = {}  # shipping by slot: each ring buffer, mapped once
        self._running = None  # a persistent loader's one DataLoader iterator (torch reuses it)

    def __len__(self):
        return len(self.loader)

    def __iter__(self) -> "_Batches":
        it = iter(self.loader)
        if not self.persistent:
            return _Batches(self, it)
        self._running = it
        # Stop at len(): the DataLoader iterator must not be asked for more, since the
        # next iter() resets it for the next epoch while this epoch's last batch is in use.
        return _Batches(self, it, left=len(self))

    def close(self) -> None:
        """Stop a persistent loader's worker processes (a no-op for others: see ``_Batches.close``)."""
        running, self._running = self._running, None
        shutdown = getattr(running, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.slots.clear()  # batches handed out keep their buffers mapped (their arrays refer to them)

    def convert(self, b: dict) -> dict:
        slot, shape, off = b.pop("_slot", -1), b.pop("_shape", None), b.pop("_offset", 0)
        if shape is not None:  # shipped by slot (_ship_by_slot): a fresh array over the buffer
            if "clips" in b:  # the buffer's first batch brings the buffer
                storage = b.pop("clips").untyped_storage()
                self.slots[slot] = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
            arr = self.slots[slot][off:off + math.prod(shape)].reshape(shape)
            b["clips"] = torch.from_numpy(arr)  # its storage holds ``arr``: arr dies with the last view
            weakref.finalize(arr, _release, self.flags, slot)
        elif slot >= 0:  # the worker may refill this buffer once nothing here refers to it any more
            weakref.finalize(b["clips"].untyped_storage(), _release, self.flags, slot)
        if "jpegs" in b:
            clips, replaced = decode_clips(np.require(b.pop("jpegs"), requirements="W"), b.pop("offsets"),
                                           b.pop("flips"), b.pop("erase"), pids=b["pids"], **self.decode)
            b = {"clips": clips, **b, "skipped": b["skipped"] + replaced}
            if self.normalize:
                b["clips"] = normalize_clips(clips, self.mean, self.std)  # on the device
        for key, v in b.items():  # small id arrays travel pickled, not as shared-memory tensors
            if isinstance(v, np.ndarray):
                b[key] = torch.from_numpy(v)
        if self.normalize and b["clips"].dtype == torch.uint8:
            u8 = b["clips"]
            out = torch.empty(u8.shape[:-3] + (3, *u8.shape[-3:-1]), dtype=torch.float32,
                              pin_memory=self.pin)
            b["clips"] = normalize_clips(u8, self.mean, self.std, out=out)
        return b


class _Batches:
    """A running stream: ``dataloader_iter`` is the started DataLoader iterator; ``close()`` stops
    its worker processes now instead of when the last reference goes (a persistent loader's
    workers outlive its epochs: ``_Normalized.close()`` stops those). ``left``: batches still to
    hand out (None: until the DataLoader ends)."""

    def __init__(self, owner: _Normalized, it, left: int | None = None):
        self.owner, self.dataloader_iter, self.left = owner, it, left

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.left is not None:
            if self.left <= 0:
                raise StopIteration
            self.left -= 1
        return self.owner.convert(next(self.dataloader_iter))

    def __len__(self):
        return len(self.owner)

    def close(self) -> None:
        if self.owner.persistent:
            self.left = 0
            return
        shutdown = getattr(self.dataloader_iter, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _as_is(batch):
    """No conversion in the worker: torch's default would turn every numpy array into a tensor,
    and each tensor crosses to the consumer as its own shared-memory segment plus an fd handshake."""
    return batch


def _make_loader(ds, num_workers, pin_memory, prefetch_factor, mean, std, normalize, decode=None,
                 persistent=False) -> _Normalized:
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    pin = bool(pin_memory) and torch.cuda.is_available()
    if num_workers > 0:
        # batch buffers each worker may reuse: those in flight (prefetch) + the one being filled +
        # two the consumer may hold (the current batch and one it fetched ahead). None in-process:
        # there the consumer's batch *is* the ring's tensor, so its storage never dies while the
        # ring holds it (malloc recycles that memory instead).
        ds.ring_size = prefetch_factor + 3
        ds.flags = torch.zeros(num_workers * ds.ring_size, dtype=torch.int32).share_memory_()
        # the pin-memory thread copies each batch: the consumer never sees the shared buffer
        ds.by_slot = not (pin and not normalize)
    loader = DataLoader(ds, batch_size=None, collate_fn=_as_is, num_workers=num_workers,
                        pin_memory=pin and not normalize,
                        prefetch_factor=prefetch_factor if num_workers > 0 else None,
                        persistent_workers=persistent and num_workers > 0)
    return _Normalized(loader, mean, std, normalize, pin and normalize, decode, persistent)


def _shard_urls(url, split_info: dict) -> list[str]:
    return [storage.join(url, s["name"]) for s in split_info["shards"]]


# =========================================================================== training
def _train_worker(worker: int, num_workers: int, ring: _BatchRing, *, shards, shard_ids, num_ids, num_classes, clip_len, p, k,
                  height, width, batches_per_epoch, epoch, seed, rank, world_size, hflip,
                  random_erasing, mean, encoded=False, cache=None):
    n_batches = batches_per_epoch // num_workers + (worker < batches_per_epoch % num_workers)
    if n_batches == 0:
        return
    rng = np.random.default_rng([_TAG_SAMPLES, seed, epoch, rank, world_size, worker, num_workers])
    skips = _Skips()
    fill = mean_fill(mean)
    pool: dict[int, list] = {}  # pid -> [(meta, frames)], insertion order = read order
    groups: dict[int, list] = {}  # pid -> its unused K-tracklet groups (indices into pool[pid])

    def make_groups(n: int) -> list:
        # torchreid's RandomIdentitySampler: floor(n/K) disjoint groups a pass; n < K: one group
        # drawn with replacement. An identity stays pooled until its groups are used up, so every
        # tracklet read is used (shards are read whole, reading is not free).
        if n < k:
            return [rng.choice(n, k, replace=True)]
        perm = rng.permutation(n)
        return [perm[i:i + k] for i in range(0, n - k + 1, k)]

    target = min(POOL_FACTOR * p, num_ids)

    def assigned(rnd):
        return train_shard_assignment(shards, seed=seed, epoch=epoch, rank=rank,
                                      world_size=world_size, worker=worker,
                                      num_workers=num_workers, round=rnd)

    own = assigned(0)[::-1]  # this epoch's disjoint share, popped from the end
    resampled = (s for rnd in range(1, 1 << 30) for s in assigned(rnd))
    resampling = False

    def refill(need: int):
        """Read shards until the pool holds `target` identities. Past its own share, a worker
        only resamples once it cannot make a batch (pool < `need`): read-ahead alone must not
        make slots' shard sets overlap."""
        nonlocal target, resampling
        fruitless = 0
        while len(pool) < target:
            if own:
                shard = own.pop()
            elif len(pool) >= need and not resampling:
                return
            else:
                resampling = True
                shard = next(resampled)
            new = []
            ids = shard_ids.get(shard)
            # A shard whose identities are all pooled would bring nothing (a pooled pid's data is
            # the same): not reading it avoids most of the reading when the pool holds nearly every
            # identity (few identities per P).
            if not (ids and ids.issubset(pool)):
                got: dict[int, list] = {}
                for _, meta, frames in iter_samples(shard, skips, cache=cache):
                    if not 0 <= meta["pid"] < num_classes:
                        skips.add("sample", shard, f"pid {meta['pid']} outside 0..{num_classes - 1}")
                        continue
                    got.setdefault(meta["pid"], []).append((meta, frames))
                new = [pid for pid in got if pid not in pool]
                for pid in new:
                    pool[pid] = got[pid]
                    groups[pid] = make_groups(len(got[pid]))
            fruitless = 0 if new else fruitless + 1
            if fruitless > 2 * len(shards):  # two rounds brought nothing new: take what we have
                if len(pool) >= need:  # fewer usable ids than the manifest says: settle
                    target = len(pool)
                    return
                raise RuntimeError(f"only {len(pool)} usable identities in the training shards, "
                                   f"a batch needs P={need} ({skips.total} inputs skipped)")

    shape = (p * k, clip_len, height, width, 3)
    for _ in range(n_batches):
        if encoded:  # the sampled JPEGs themselves, decoded by the consumer (decode="device")
            jpegs: list = [b""] * (p * k * clip_len)
            flips = np.zeros(p * k, dtype=bool)
            erase = np.zeros((p * k, 4), dtype=np.int64)
        else:
            clips, u8, slot_id = ring.get(shape)
        pids = np.empty(p * k, dtype=np.int64)
        camids = np.empty(p * k, dtype=np.int64)
        refill(p)
        order = list(pool)
        chosen = [order[i] for i in rng.choice(len(order), p, replace=False)]
        spare = [pid for pid in order if pid not in chosen]
        slot = 0
        while chosen:
            pid = chosen.pop(0)
            tracks = pool[pid]
            picks = groups[pid][-1]
            ok = True
            for j, t in enumerate(picks):
                meta, frames = tracks[t]
                idx = restricted_indices(len(frames), clip_len, rng)
                flip = hflip and rng.random() < 0.5
                try:
                    for n, fi in enumerate(idx):
                        if encoded:
                            check_jpeg(frames[fi])
                            jpegs[(slot + j) * clip_len + n] = frames[fi]
                        else:
                            decode_into(frames[fi], u8[slot + j, n], flip)
                except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad data
                    skips.add("sample", f"tracklet {meta.get('tracklet', meta['index'])}",
                              f"frame {fi} does not decode ({e})")
                    tracks.pop(t)
                    groups[pid] = make_groups(len(tracks)) if tracks else []
                    ok = False
                    break
                if random_erasing > 0 and rng.random() < random_erasing:
                    box = erase_box(height, width, rng)
                    if box is not None:  # same rectangle on every frame of the clip
                        y, x, h, w = box
                        if encoded:
                            erase[slot + j] = box
                        else:
                            u8[slot + j, :, y:y + h, x:x + w] = fill
                if encoded:
                    flips[slot + j] = flip
                pids[slot + j], camids[slot + j] = meta["pid"], meta["camid"]
            if ok:
                groups[pid].pop()
                if not groups[pid]:
                    del pool[pid], groups[pid]
                slot += k
                continue
            if tracks:  # redraw this identity from its remaining tracklets
                chosen.insert(0, pid)
                continue
            del pool[pid], groups[pid]  # identity unusable: replace it by another pooled one
            if not spare:
                refill(len(chosen) + 1 + slot // k)
                spare = [q for q in pool if q not in chosen and q not in pids[:slot]]
                if not spare:
                    raise RuntimeError(f"not enough usable identities for a P={p} batch "
                                       f"({skips.total} inputs skipped)")
            chosen.append(spare.pop(int(rng.integers(len(spare)))))
        if encoded:  # one buffer + bounds: a single pickled object, not B*N small ones
            offsets = np.zeros(len(jpegs) + 1, dtype=np.int64)
            np.cumsum([len(b) for b in jpegs], out=offsets[1:])
            yield {"jpegs": np.frombuffer(b"".join(jpegs), dtype=np.uint8), "offsets": offsets,
                   "flips": flips, "erase": erase, "pids": pids, "camids": camids, "skipped": skips.take()}
        else:
            yield {"clips": clips, "pids": pids, "camids": camids, "skipped": skips.take(), "_slot": slot_id}
            clips = u8 = None  # the consumer's now: no reference from here may keep it alive


def train_loader(url, *, clip_len: int, p: int, k: int, height: int, width: int,
                 batches_per_epoch: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, hflip: bool = True, random_erasing: float = 0.0,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, pin_memory: bool = False,
                 prefetch_factor: int = 2, normalize: bool = True, decode: str = "loader",
                 device=None, persistent: bool = False, cache_dir: str | None = None,
                 cache_gb: float = 100.0):
    """Training stream for one rank: exactly ``batches_per_epoch`` P x K batches
    ``{"clips": float32 (P*K, N, 3, H, W), "pids": long, "camids": long, "skipped": int}``.

    Shards are assigned by ``train_shard_assignment`` (disjoint across ranks x workers within an
    epoch, reshuffled per (seed, epoch), resampled when a worker runs out); batches are split
    among workers (worker w makes ``B//W + (w < B%W)``). A worker pools up to 4P identities (whole
    identities: train shards never split one) and draws P distinct ones per batch, K tracklets
    each, like torchreid's RandomIdentitySampler: an identity's tracklets are shuffled into
    floor(n/K) disjoint groups (one group drawn with replacement if n < K), and the identity stays
    pooled until its groups are used up.
    Clips: restricted random sampling of N frames, then per clip one horizontal-flip coin and
    (with probability ``random_erasing``) one erased rectangle shared by all its frames, filled
    with the mean. Output is a deterministic function of (seed, epoch, rank, world_size,
    num_workers); ``num_workers=0`` runs in-process and equals ``num_workers=1``.

    Workers ship uint8 clips; the returned iterable (``len()`` = ``batches_per_epoch``) converts
    them to normalised float32 in the consuming process. ``normalize=False`` (an extension of the
    interface) hands out the uint8 ``(P*K, N, H, W, 3)`` clips instead, for
    ``normalize_clips(clips.to(device), mean, std)`` on the GPU (4x less host-to-device traffic).

    ``decode="device"``: workers sample, validate the JPEG headers and draw the augmentation as
    above but ship the sampled frames undecoded; the iterating process decodes each batch on
    ``device`` (``pipeline.transforms.decode_clips``: nvJPEG on a GPU, libjpeg-turbo on CPU,
    where the batches equal ``decode="loader"``'s exactly) and hands out clips on ``device``.

    ``persistent=True``: one loader for many epochs. Its worker processes are forked once and
    keep their batch buffers; its i-th ``iter()`` hands out the ``batches_per_epoch`` batches of
    epoch ``epoch + i``, equal to those of ``train_loader(epoch=epoch + i)``, and makes the
    workers start that epoch (the previous epoch's batches must all have been taken: the
    workers move on). ``close()`` stops the workers (else they go with the loader). This saves
    each epoch's fork, the copy-on-write faults it causes and fresh batch buffers:
    ``pipeline.worker.epoch_batches`` uses it.

    ``cache_dir`` (s3:// shards; None or "" for none): each shard is copied to this local
    directory on its first read, checked against the manifest's sha256, and read from there
    afterwards, up to ``cache_gb`` (least recently used copies go first; ``pipeline.shard_cache``)."""
    if decode not in ("loader", "device"):
        raise ValueError(f"decode must be 'loader' or 'device', got {decode!r}")
    for name, v in (("clip_len", clip_len), ("p", p), ("k", k), ("height", height), ("width", width)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if batches_per_epoch < 0 or not 0 <= rank < world_size or not 0.0 <= random_erasing <= 1.0:
        raise ValueError(f"bad arguments: batches_per_epoch={batches_per_epoch}, rank={rank}, "
                         f"world_size={world_size}, random_erasing={random_erasing}")
    man = read_manifest(url)
    tr = _split(man, "train", url)
    num_ids = int(tr["num_identities"])
    if num_ids < p:
        raise ValueError(f"{url}: {num_ids} training identities, fewer than P={p}")
    if not tr["shards"]:
        raise ValueError(f"{url}: no training shards")
    shards = _shard_urls(url, tr)
    fn = functools.partial(
        _train_worker, shards=shards, num_ids=num_ids,
        shard_ids={u: frozenset(s.get("identities") or ()) for u, s in zip(shards, tr["shards"])},
        num_classes=int(man.get("num_classes") or num_ids), clip_len=clip_len, p=p, k=k,
        height=height, width=width, batches_per_epoch=batches_per_epoch, epoch=epoch, seed=seed,
        rank=rank, world_size=world_size, hflip=hflip, random_erasing=random_erasing,
        mean=tuple(mean), encoded=decode == "device",
        cache=shard_cache.for_manifest(url, tr, cache_dir, cache_gb))
    dec = None
    if decode == "device":
        dec = dict(clip_len=clip_len, height=height, width=width, fill=mean_fill(mean),
                   device=torch.device(device if device is not None else "cpu"))
    return _make_loader(_WorkerStream(fn, batches_per_epoch, epoch if persistent else None), num_workers,
                        pin_memory, prefetch_factor, tuple(mean), tuple(std), normalize, dec, persistent)


# =========================================================================== evaluation
def _eval_worker(worker: int, num_workers: int, ring: _BatchRing, *, shards, clip_len, height, width, rank,
                 world_size, clips_per_batch, cache=None):
    skips = _Skips()
    units = eval_assignment(shards, rank=rank, world_size=world_size, worker=worker,
                            num_workers=num_workers)
    shape = (clips_per_batch, clip_len, height, width, 3)
    fill = 0
    ready = None  # a full batch is held back until more data (or the end) so that skips met
    #               after it still ride on a batch of this worker

    def new_batch():
        return (*ring.get(shape), *(np.empty(clips_per_batch, dtype=np.int64) for _ in range(3)))

    clips, u8, slot_id, index, pids, camids = new_batch()

    def emit(n):
        return {"clips": clips[:n], "index": index[:n], "pids": pids[:n], "camids": camids[:n],
                "skipped": 0, "_slot": slot_id}

    scratch = frame_buffer((0, height, width, 3)).numpy()  # a tracklet's decoded frames, reused
    for shard, part, parts in units:
        for _, meta, frames in iter_samples(shard, skips, part=part, parts=parts, cache=cache):
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
                    clips, u8, slot_id, index, pids, camids = new_batch()
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


def eval_loader(url, split: str, *, clip_len: int, height: int, width: int, rank: int = 0,
                world_size: int = 1, num_workers: int = 2, clips_per_batch: int = 32,
                mean=IMAGENET_MEAN, std=IMAGENET_STD, pin_memory: bool = False,
                normalize: bool = True, cache_dir: str | None = None, cache_gb: float = 100.0):
    """Evaluation stream over ``split`` ("query"/"gallery"/"train") for one rank: dicts
    ``{"clips": float32 (b, N, 3, H, W), "index": long (b,), "pids", "camids", "skipped": int}``
    with b <= ``clips_per_batch`` (b == 0 only for a batch that just carries skips).

    Every tracklet belongs to exactly one (rank, worker) (``eval_assignment``) and is seen once:
    all its frames in order, resized to H x W, cut into consecutive N-frame clips, the last padded
    by repeating the last frame. Its clips are consecutive within one worker's output; batches of
    different workers interleave, so use ``index`` (split order, see ``split_counts``) and
    ``pipeline.evaluation.extract`` (per-tracklet sums) rather than arrival order. ``normalize=False``: uint8 clips
    ``(b, N, H, W, 3)`` as in ``train_loader``; ``cache_dir``/``cache_gb`` as there."""
    for name, v in (("clip_len", clip_len), ("height", height), ("width", width),
                    ("clips_per_batch", clips_per_batch)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} for world_size {world_size}")
    info = _split(read_manifest(url), split, url)
    fn = functools.partial(_eval_worker, shards=_shard_urls(url, info), clip_len=clip_len,
                           height=height, width=width, rank=rank, world_size=world_size,
                           clips_per_batch=clips_per_batch,
                           cache=shard_cache.for_manifest(url, info, cache_dir, cache_gb))
    return _make_loader(_WorkerStream(fn), num_workers, pin_memory, 2, tuple(mean), tuple(std),
                        normalize)
