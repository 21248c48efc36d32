"""Node-local disk cache of remote (``s3://``) shards, keyed by the manifest's sha256.

Training reads every shard once per epoch, for hundreds of epochs. Streamed from object storage,
each read moves the whole shard through HTTP, ~10 bytes for each byte of the frames it decodes
(a sample is a whole tracklet, training decodes N of its frames): measured here, that nearly
doubles the loader's CPU per frame. With a cache, the first read of a shard streams it as before
and writes it to local disk on the way (no second download, no wait for a whole shard; hashing
and writing make that first epoch ~30% slower here); later reads map the local copy like any
local shard (``storage.map_local``).

* Content-addressed: a shard is stored as ``<dir>/<sha256[:2]>/<sha256>.tar``, the digest from
  ``manifest.json``. A re-packed dataset (new digests) never reads stale bytes, identical shards
  of two prefixes share a file, and only shards the manifest describes are cached.
* Nothing partial is ever published: the copy is written to a temp file and renamed into place
  only after the whole object was read and its size and sha256 match the manifest. A read that
  fails or stops early, or a mismatch (logged), leaves nothing behind.
* Bounded: before a copy is published, the least recently used files are removed until the
  cache fits ``max_bytes`` (a hit refreshes a file's mtime). Processes sharing a directory may
  download the same shard at once: the renames are atomic, both copies equal.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from pipeline import storage, urls

log = logging.getLogger(__name__)

_STALE_TEMP_S = 3600.0  # temp files older than this were left by a killed process


@dataclass(frozen=True)
class ShardCache:
    """Cache of the remote shards listed in ``expected`` (URL -> ``(bytes, sha256)``) under
    ``root``, holding at most ``max_bytes``. Picklable (loader workers get a copy)."""

    root: str
    max_bytes: int
    expected: dict = field(default_factory=dict)

    def path(self, url: str) -> str | None:
        """Where ``url``'s copy lives (whether or not it is there yet); None if not cacheable."""
        want = self.expected.get(url) if urls.is_s3(url) else None
        if want is None:
            return None
        digest = want[1]
        return os.path.join(self.root, digest[:2], f"{digest}.tar")

    def map(self, url: str) -> memoryview | None:
        """The cached copy of ``url`` mapped into memory, or None (not cacheable, not cached)."""
        path = self.path(url)
        if path is None:
            return None
        try:
            if os.path.getsize(path) != self.expected[url][0]:
                return None  # verified when published: only a foreign file could differ
            with contextlib.suppress(PermissionError):  # a cache filled by another user
                os.utime(path)  # recently used: evicted last
            return storage.map_local(path)
        except FileNotFoundError:  # not cached, or evicted by another process just now
            return None

    @contextlib.contextmanager
    def filling(self, url: str) -> Iterator[BinaryIO]:
        """``storage.open_read(url)`` that also writes what is read to the cache: when the
        ``with`` block ends without an exception, the rest of the object is read too (a tar
        reader stops at the end-of-archive block, before the padding), checked against the
        manifest and published. On an exception nothing is published."""
        path, tmp = self.path(url), None
        if path is not None and self.expected[url][0] <= self.max_bytes:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".tar")
            except OSError as e:  # not writable here (a path meant for other nodes): just stream
                _warn_once(self.root, f"shard cache {self.root} unusable, streaming instead: {e}")
        if tmp is None:  # not cached: a plain read
            with storage.open_read(url) as f:
                yield f
            return
        try:
            with storage.open_read(url) as src:
                tee = _Tee(src, fd)
                yield tee
                while tee.fd is not None and tee.read(1 << 20):  # the rest: padding after the tar's end
                    pass
            size, digest = self.expected[url]
            if tee.failed is not None:  # the disk filled up, say: the read itself went on
                _warn_once(self.root, f"shard cache {self.root}: not caching {url}: {tee.failed}")
                return
            if tee.n != size or tee.hash.hexdigest() != digest:
                log.warning("not caching %s: read %d bytes with sha256 %s, the manifest says %d bytes, %s",
                            url, tee.n, tee.hash.hexdigest(), size, digest)
                return
            self._make_room(size, tmp)
            os.replace(tmp, path)
            tmp = None
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def _make_room(self, need: int, own: str) -> None:
        """Remove least recently used copies until ``need`` more bytes (our temp file ``own``)
        fit in ``max_bytes``, and temp files a killed process left."""
        files, total, now = [], 0, time.time()
        for sub in _scandir(self.root):
            if not sub.is_dir():
                continue
            for e in _scandir(sub.path):
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                if e.path == own:
                    continue
                if e.name.startswith(".tmp-"):
                    if now - st.st_mtime > _STALE_TEMP_S:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(e.path)
                    else:
                        total += st.st_size  # another process's download in progress
                    continue
                files.append((st.st_mtime, st.st_size, e.path))
                total += st.st_size
        files.sort()
        for _, size, path in files:
            if total + need <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                total -= size


def _scandir(path: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except FileNotFoundError:
        return []


class _Tee:
    """A readable file that copies what it hands out to file descriptor ``fd`` and hashes it. A failed write
    stops the copying (``failed``), never the reading."""

    def __init__(self, src: BinaryIO, fd: int):
        self.src, self.fd, self.n, self.hash = src, fd, 0, hashlib.sha256()
        self.failed: OSError | None = None

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        if data and self.fd is not None:
            try:
                view = memoryview(data)
                while view:  # unbuffered: nothing is left to fail at close
                    view = view[os.write(self.fd, view):]
            except OSError as e:
                self.failed, self.fd = e, None
                return data
            self.hash.update(data)
            self.n += len(data)
        return data


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def for_manifest(url, split_info: dict, cache_dir: str | None, max_gb: float) -> ShardCache | None:
    """The cache for one split's shards at ``url`` (None without ``cache_dir`` or for a local
    prefix, which needs none)."""
    if not max_gb > 0:
        raise ValueError(f"cache_gb must be > 0, got {max_gb}")
    if not cache_dir or not urls.is_s3(url):
        return None
    expected = {urls.join(url, s["name"]): (int(s["bytes"]), str(s["sha256"]))
                for s in split_info["shards"] if s.get("sha256") and s.get("bytes") is not None}
    return ShardCache(os.path.abspath(cache_dir), int(max_gb * (1 << 30)), expected)
