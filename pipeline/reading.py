"""Reading shards: the stages between a shard URL and validated tracklets.

    open (storage / shard cache / memory map) -> tar to samples -> validate -> (pos, meta, frames)

Tar to samples is webdataset's own stage (``tar_file_expander`` + ``group_by_keys``, i.e.
``tarfile_to_samples`` over streams we open) with handlers that feed ``Skips``, except for
samples that carry ``frame_bytes`` (``pipeline.pack``'s layout): there ``block_samples`` takes
each tracklet's frames as one block and slices a frame out only when it is used (training
decodes ~1 frame in 10; docs/performance.md §2 has the bench that keeps this stage). Shards in
memory (local, or a verified copy in the shard cache) give it slices of the mapping; streamed
shards (S3 without the cache) one read per block. A sample that does not fit that layout hands
itself and the rest of the shard to the stock stage.

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
    """The sample that starts with ``taken`` (the bytes read of it so far) does not fit the
    block layout: the reader hands ``taken`` plus the rest of the shard to the stock stage."""

    def __init__(self, taken: list):
        self.taken = taken


# size, checksum, then the other numeric fields frombuf parses (mode, uid, gid, mtime, devmajor/minor)
_OCTAL_FIELDS = ((124, 136), (148, 156), (100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))


def _json_member(hdr: bytes) -> tuple[str, int] | None:
    """``(key, size)`` when ``hdr`` is the header of a ``<key>.json`` regular file (checksummed).

    The header ``pipeline.pack`` writes (POSIX ustar magic, an ASCII name without prefix, type
    ``0``, octal size and checksum) is read here from its fixed fields; every other header goes
    through ``tarfile.TarInfo.frombuf``. The short path answers only where ``frombuf`` would give
    the same answer (tested on mutated headers): it exists because ``frombuf`` decodes every field
    of the header, ~8x the time, once per tracklet read (docs/performance.md §2, eighth round)."""
    if len(hdr) == BLOCK and hdr[156:157] == b"0" and hdr[257:265] == b"ustar\x0000" and hdr[345] == 0:
        try:  # the numeric fields as tarfile reads them (octal, NUL-terminated); base-256 goes to tarfile
            size, stored, *_ = (int(hdr[a:b].split(b"\0", 1)[0].strip() or b"0", 8) for a, b in _OCTAL_FIELDS)
        except ValueError:
            size = stored = -1
        name = hdr[:100].split(b"\0", 1)[0]
        if stored == sum(hdr) - sum(hdr[148:156]) + 256 and size >= 0 and name.isascii():
            key, dot, ext = name.decode("ascii").partition(".")
            return (key, size) if dot and ext == "json" else None
    return _json_member_tarfile(hdr)


def _json_member_tarfile(hdr: bytes) -> tuple[str, int] | None:
    try:
        info = tarfile.TarInfo.frombuf(hdr, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return None
    key, dot, ext = info.name.partition(".")
    return (key, info.size) if info.isreg() and dot and ext == "json" else None


def block_samples(read) -> Iterator[tuple[str, dict, Frames]]:
    """``(key, meta, frames)`` of a shard whose samples carry ``frame_bytes``: one tar header
    parsed per tracklet (checksum included), its frames one block, sliced when used.

    ``read(n)`` returns the shard's next ``n`` bytes (fewer only at its end): memoryview slices
    of a shard in memory (no copy) or a stream's ``read``. Raises ``_Fallback`` at the first
    sample that does not fit (no json first, no ``frame_bytes``, pax or long-name headers, a
    frame not where the json says, a cut shard, a shard that ends without its end-of-archive
    block): the stock stage then reads that sample and the rest, and reports the damage."""
    while True:
        hdr = read(BLOCK)
        taken = [hdr]
        if len(hdr) < BLOCK:
            raise _Fallback(taken)  # the stock stage reports the truncation
        hdr = bytes(hdr)
        if hdr == _ZERO_BLOCK:
            return
        if (member := _json_member(hdr)) is None:
            raise _Fallback(taken)
        key, size = member
        data = read(member_bytes(size) - BLOCK)
        taken.append(data)
        try:
            meta = json.loads(bytes(data[:size])) if len(data) >= size else None
        except ValueError:
            meta = None
        if (layout := frame_layout(meta)) is None:
            raise _Fallback(taken)
        sizes, offsets, total = layout
        block = read(total)
        taken.append(block)
        frames = Frames(key, block, sizes, offsets)
        if len(block) < total or not (frames.name_ok(0) and frames.name_ok(len(sizes) - 1)):
            raise _Fallback(taken)  # a frame missing, extra headers, a cut shard...
        yield key, meta, frames


def _view_read(view):
    """``read(n)`` over a memoryview: slices, no copies."""
    pos = 0

    def read(n: int):
        nonlocal pos
        out = view[pos:pos + n]
        pos += len(out)
        return out
    return read, lambda: view[pos:]


class _ChainReader(io.RawIOBase):
    """A file that reads ``parts`` (bytes-likes), then ``rest`` (a file): the stock stage's input
    after a fallback, starting at the sample the block stage gave back."""

    def __init__(self, parts: list, rest=None):
        self.parts, self.rest = [memoryview(p) for p in parts if len(p)], rest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self.parts:
            head = self.parts[0]
            k = min(len(b), len(head))
            b[:k] = head[:k]
            if k == len(head):
                self.parts.pop(0)
            else:
                self.parts[0] = head[k:]
            if k:
                return k
        if self.rest is None:
            return 0
        data = self.rest.read(len(b))
        b[:len(data)] = data
        return len(data)


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

    def blocks_then_stock(read, rest) -> Iterator:
        """The block stage; from a sample that does not fit, the stock stage."""
        nonlocal pos
        try:
            for key, meta, frames in block_samples(read):
                mine, pos = pos % parts == part, pos + 1
                if not mine:
                    continue
                try:
                    check_meta(key, meta)
                except ValueError as e:
                    if skips is None:
                        raise
                    skips.add("sample", where, e)
                    continue
                yield pos - 1, meta, frames
        except _Fallback as fb:  # the rest as any WebDataset shard
            yield from stock(io.BufferedReader(_ChainReader(fb.taken, rest()), 1 << 20))

    try:
        view = storage.map_local(url)  # local shards: only the pages used are touched
        if view is None and cache is not None:
            view = cache.map(url)
        if view is not None:
            if blocks:
                read, rest = _view_read(view)
                yield from blocks_then_stock(read, lambda: _ChainReader([rest()]))
            else:
                yield from stock(io.BufferedReader(_ChainReader([view]), 1 << 20))
        else:
            with cache.filling(url) if cache is not None else storage.open_read(url) as f:
                if blocks:  # a streamed shard: each tracklet's block is one read
                    yield from blocks_then_stock(f.read, lambda: f)
                else:
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
