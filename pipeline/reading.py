"""Reading shards: the stages between a shard URL and validated tracklets.

    open (storage / shard cache / memory map) -> tar to samples -> validate -> (pos, meta, frames)

Tar to samples is webdataset's own stage (``tar_file_expander`` + ``group_by_keys``, i.e.
``tarfile_to_samples`` over streams we open) with handlers that feed ``Skips``, except for
shards in memory (local, or a verified copy in the shard cache) whose samples carry
``frame_bytes``: there ``block_samples`` takes each tracklet's frames as one block and slices a
frame out only when it is used (training decodes ~1 frame in 10; docs/performance.md §2 has the
bench that keeps this stage). A sample that does not fit that layout hands the rest of the shard
to the stock stage.

Bad input never crashes a reader and is never lost silently: each of these counts 1 in ``Skips``
(and is logged): a bad sample (missing/invalid json, frame count != ``n_frames``); the rest of a
truncated or corrupt shard (samples completed before the damage are kept), also where ``tarfile``
itself would just stop (a shard cut at a member boundary, a corrupt header mid-shard: the
manifest's sample count tells); a shard that cannot be opened.
"""
from __future__ import annotations

import io
import json
import logging
import math
import tarfile
from typing import Iterator

from webdataset import tariterators

from pipeline import storage
from pipeline.shard_cache import ShardCache
from pipeline.shards import BLOCK, check_meta, frame_layout, make_sample, member_bytes

log = logging.getLogger(__name__)

try:  # S3 read failures surface as botocore errors, not OSError
    from botocore.exceptions import BotoCoreError, ClientError
    READ_ERRORS: tuple = (OSError, EOFError, ValueError, tarfile.TarError, BotoCoreError, ClientError)
except ImportError:  # pragma: no cover - boto3 is a dependency
    READ_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError)

_ZERO_BLOCK = bytes(BLOCK)


class Skips:
    """A slot's count of skipped inputs, handed out with its next batch."""

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


def eval_assignment(shards: list, *, rank: int, world_size: int, worker: int,
                    num_workers: int) -> list[tuple[str, int, int]]:
    """The ``(shard, part, parts)`` units slot (rank, worker) reads for evaluation.

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


class Frames:
    """A tracklet's encoded frames as one block of tar members: frame i is sliced out when
    accessed, after checking that its tar header names it. Bytes-like items, like a list."""

    __slots__ = ("key", "prefix", "block", "offsets", "sizes")

    def __init__(self, key: str, block, sizes: list[int], offsets: list[int]):
        self.key, self.block, self.sizes, self.offsets = key, memoryview(block), sizes, offsets
        self.prefix = key.encode()

    def __len__(self) -> int:
        return len(self.sizes)

    def name_ok(self, i: int) -> bool:
        name = b"%s.%03d.jpg\0" % (self.prefix, i)
        off = self.offsets[i]
        return self.block[off:off + len(name)] == name

    def __getitem__(self, i: int):
        if not -len(self.sizes) <= i < len(self.sizes):
            raise IndexError(i)
        i %= len(self.sizes)
        if not self.name_ok(i):
            raise ValueError(f"sample {self.key!r}: frame {i} is not where the json's frame_bytes put it")
        start = self.offsets[i] + BLOCK
        return self.block[start:start + self.sizes[i]]

    def __iter__(self):
        return (self[i] for i in range(len(self.sizes)))


class _Fallback(Exception):
    """The sample at byte ``offset`` does not fit the block layout."""

    def __init__(self, offset: int):
        self.offset = offset


def block_samples(view) -> Iterator[tuple[str, dict, Frames]]:
    """``(key, meta, frames)`` of a shard in memory whose samples carry ``frame_bytes``: one tar
    header parsed per tracklet (``tarfile.TarInfo.frombuf``, checksum included), its frames one
    block. Raises ``_Fallback(offset)`` at the first sample that does not fit (no json first, no
    ``frame_bytes``, pax or long-name headers, a frame not where the json says) and TarError
    where the shard ends without its end-of-archive block."""
    off, n = 0, len(view)
    while True:
        hdr = bytes(view[off:off + BLOCK])
        if len(hdr) < BLOCK:
            raise tarfile.ReadError(f"truncated: ends at byte {n} without end-of-archive")
        if hdr == _ZERO_BLOCK:
            return
        try:
            info = tarfile.TarInfo.frombuf(hdr, "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            raise _Fallback(off) from None
        key, dot, ext = info.name.partition(".")
        if not (info.isreg() and dot and ext == "json") or off + BLOCK + info.size > n:
            raise _Fallback(off)
        try:
            meta = json.loads(bytes(view[off + BLOCK:off + BLOCK + info.size]))
        except ValueError:
            raise _Fallback(off) from None
        if (layout := frame_layout(meta)) is None:
            raise _Fallback(off)
        sizes, offsets, total = layout
        start = off + member_bytes(info.size)
        frames = Frames(key, view[start:start + total], sizes, offsets)
        if start + total > n or not (frames.name_ok(0) and frames.name_ok(len(sizes) - 1)):
            raise _Fallback(off)  # a frame missing, extra headers, a cut shard...
        yield key, meta, frames
        off = start + total


class _ViewReader(io.RawIOBase):
    """A file over a memoryview, for the stock stage after a fallback (no copy of the shard)."""

    def __init__(self, view):
        self.view, self.pos = view, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = min(len(b), len(self.view) - self.pos)
        b[:k] = self.view[self.pos:self.pos + k]
        self.pos += k
        return k


def stock_samples(f, url: str, on_error) -> Iterator[dict]:
    """webdataset's tar-to-samples stage over one opened shard: dicts ``{"__key__", ext: bytes}``.
    ``on_error(exc)`` gets the tar-level errors; the stage stops the shard after one."""
    files = tariterators.tar_file_expander([{"url": url, "stream": f}], handler=on_error)
    return tariterators.group_by_keys(files, handler=on_error)


def shard_samples(url, skips: Skips | None = None, *, part: int = 0, parts: int = 1,
                  cache: ShardCache | None = None, expected: int | None = None,
                  blocks: bool = True) -> Iterator[tuple[int, dict, object]]:
    """The valid samples of one shard as ``(position, meta, frames)``: ``frames`` the encoded
    frames in temporal order (bytes-like), ``position`` counting every sample of the shard.

    Args:
        url: the shard (local path or s3://).
        skips: counts bad input (see the module docstring); None: errors raise instead.
        part, parts: only positions with ``position % parts == part`` are validated and yielded
            (co-readers of a shard split it so); shard-level damage is counted by part 0 only.
        cache: a remote shard is read from its verified local copy, else streamed and copied.
        expected: the manifest's sample count for the shard: fewer samples seen is damage.
        blocks: use the block stage for shards in memory (False: the stock stage only).
    """
    where = str(url)
    pos, failed = 0, []

    def shard_error(e) -> bool:  # webdataset handler: count, then stop this shard
        if skips is None:
            raise e
        failed.append(e)
        return False

    def take(key: str, members: dict):
        nonlocal pos
        mine, pos = pos % parts == part, pos + 1
        if not mine:
            return None
        try:
            return make_sample(key, members)
        except ValueError as e:
            if skips is None:
                raise
            skips.add("sample", where, e)
            return None

    def stock(f) -> Iterator:
        held = None  # a sample is kept until the next one: the one in progress at an error is lost
        for s in stock_samples(f, where, shard_error):
            if held is not None and (got := take(*held)) is not None:
                yield (pos - 1, *got)
            held = None if failed else (s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
        if held is None:
            return
        if expected is not None and pos + 1 < expected:  # tarfile stops silently where a shard is
            #  cut at a header or a header is corrupt: the sample in progress there is lost too
            shard_error(EOFError(f"the tar ends after {pos + 1} of the manifest's {expected} samples "
                                 "(cut short, or a corrupt header)"))
        elif (got := take(*held)) is not None:
            yield (pos - 1, *got)

    try:
        view = storage.map_local(url)  # local shards: only the pages used are touched
        if view is None and cache is not None:
            view = cache.map(url)
        if view is not None and blocks:
            it = block_samples(view)
            try:
                for key, meta, frames in it:
                    mine, pos = pos % parts == part, pos + 1
                    if mine:
                        try:
                            check_meta(key, meta)
                        except ValueError as e:
                            if skips is None:
                                raise
                            skips.add("sample", where, e)
                            continue
                        yield pos - 1, meta, frames
            except _Fallback as fb:  # the rest as any WebDataset shard
                yield from stock(io.BufferedReader(_ViewReader(view[fb.offset:]), 1 << 20))
        elif view is not None:
            yield from stock(io.BufferedReader(_ViewReader(view), 1 << 20))
        else:
            with cache.filling(url) if cache is not None else storage.open_read(url) as f:
                yield from stock(f)
    except READ_ERRORS as e:
        if skips is None:
            raise
        failed.append(e)
    if skips is None or part != 0:
        return
    if failed:
        skips.add("rest of shard", where, failed[0])
    elif expected is not None and pos < expected:
        skips.add("rest of shard", where, f"the tar ends after {pos} of the manifest's {expected} samples")
