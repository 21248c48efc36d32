"""The one place that opens URLs: plain paths, ``file://`` URLs and ``s3://bucket/key``.

Everything else in the project goes through these functions, so local disks and any
S3-compatible store (endpoint from ``AWS_ENDPOINT_URL``) behave the same:

* reads stream (an S3 object is never downloaded whole into memory);
* writes are atomic: a local file appears via ``os.replace`` of a temp file in the same
  directory, an S3 object via one PUT / completed multipart upload on successful close;
  if the ``with`` block raises, nothing becomes visible;
* a missing object raises ``FileNotFoundError`` naming the URL; a store that cannot be used
  (unsupported scheme, missing bucket, no or wrong credentials, endpoint down) raises
  ``StorageError``, one line naming the URL (:func:`pipeline.s3_errors.check` asks for that up
  front, in seconds).

URLs are told apart and joined in :mod:`pipeline.urls`; S3 itself (the retrying client, resumed
reads, Ray's pyarrow filesystem) is :mod:`pipeline.s3_client`.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from pipeline.s3_client import ResumingReader, client, head_object
from pipeline.urls import is_s3, join, local_path, parse_s3

MULTIPART_THRESHOLD = 64 << 20  # objects above this size are uploaded in parts
MULTIPART_CHUNKSIZE = 64 << 20
_CHUNK = 1 << 20
SHA256_META = "sha256"          # S3 user metadata written by open_write (see sha256())


# --------------------------------------------------------------------------- reading
def open_read(url) -> BinaryIO:
    """Open ``url`` for streaming binary reading (buffered; usable by ``tarfile`` mode ``r|*``).

    Raises FileNotFoundError naming the URL when the object/file does not exist."""
    if is_s3(url):
        return io.BufferedReader(ResumingReader(url), buffer_size=_CHUNK)
    path = local_path(url)
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {url}") from None


def map_local(url) -> memoryview | None:
    """A read-only memoryview of a local file mapped into memory, or None for remote URLs and
    empty files (read those with ``open_read``).

    Readers that use a small part of a large file (the training stream decodes ~1 frame in 10
    of a shard) then touch only the pages they use: no copy out of the page cache, no reads of
    the rest. The file must not be truncated in place while mapped (our writers replace files
    atomically, which keeps the old mapping valid). FileNotFoundError names the URL."""
    if is_s3(url):
        return None
    try:
        with open(local_path(url), "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return None
            return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {url}") from None


def read_bytes(url) -> bytes:
    """Whole content of ``url``."""
    with open_read(url) as f:
        return f.read()


# --------------------------------------------------------------------------- writing
def _file_sha256(f) -> str:
    h = hashlib.sha256()
    f.seek(0)
    for chunk in iter(lambda: f.read(_CHUNK), b""):
        h.update(chunk)
    f.seek(0)
    return h.hexdigest()


@contextlib.contextmanager
def open_write(url, *, multipart_threshold: int | None = None,
               multipart_chunksize: int | None = None) -> Iterator[BinaryIO]:
    """Context manager yielding a binary file; the content appears at ``url`` atomically on
    successful exit and not at all if the block raises.

    Local: temp file in the destination directory, fsync, ``os.replace``.
    S3: spooled to a local temp file, then ``upload_fileobj`` (multipart above
    ``multipart_threshold``, default ``MULTIPART_THRESHOLD``); the object's sha256 is stored
    as user metadata so ``sha256()`` need not download it again."""
    if is_s3(url):
        bucket, key = parse_s3(url)
        if not key or key.endswith("/"):
            raise ValueError(f"cannot write to an s3 prefix: {url!r}")
        with tempfile.TemporaryFile(prefix="sta-s3-upload-") as tmp:
            yield tmp
            tmp.flush()
            digest = _file_sha256(tmp)
            from boto3.s3.transfer import TransferConfig

            threshold = multipart_threshold or MULTIPART_THRESHOLD
            # S3 parts must be >= 5 MiB (except the last)
            chunk = max(multipart_chunksize or min(threshold, MULTIPART_CHUNKSIZE), 5 << 20)
            cfg = TransferConfig(multipart_threshold=threshold, multipart_chunksize=chunk,
                                 max_concurrency=4, use_threads=True)
            client().upload_fileobj(tmp, bucket, key, Config=cfg,
                                    ExtraArgs={"Metadata": {SHA256_META: digest}})
        return
    path = local_path(url)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o644)  # mkstemp makes 0600 files; shards must be readable by others
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise


def write_bytes(url, data: bytes) -> None:
    """Atomically write ``data`` to ``url``."""
    with open_write(url) as f:
        f.write(data)


# --------------------------------------------------------------------------- metadata
def exists(url) -> bool:
    """True if ``url`` is an existing file/object, or a directory/non-empty S3 prefix."""
    if is_s3(url):
        bucket, key = parse_s3(url)
        if key and not key.endswith("/") and head_object(url) is not None:
            return True
        prefix = key.rstrip("/") + "/" if key else ""
        resp = client().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        return resp.get("KeyCount", 0) > 0
    return os.path.exists(local_path(url))


def size(url) -> int:
    """Size in bytes; FileNotFoundError naming the URL if missing."""
    if is_s3(url):
        head = head_object(url)
        if head is None:
            raise FileNotFoundError(f"no such object: {url}")
        return int(head["ContentLength"])
    try:
        return os.path.getsize(local_path(url))
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {url}") from None


def listdir(url) -> list[str]:
    """Sorted names directly under the prefix ``url`` (files and sub-"directories", without
    trailing slash). A missing prefix lists as empty (S3 cannot tell it from an empty one)."""
    if is_s3(url):
        bucket, key = parse_s3(url)
        prefix = key.rstrip("/") + "/" if key else ""
        names = set()
        for page in client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, Delimiter="/"):
            for cp in page.get("CommonPrefixes", []):
                names.add(cp["Prefix"][len(prefix):].rstrip("/"))
            for obj in page.get("Contents", []):
                name = obj["Key"][len(prefix):]
                if name:
                    names.add(name)
        return sorted(names)
    path = local_path(url)
    if not os.path.exists(path):
        return []
    return sorted(os.listdir(path))


def _walk(url) -> list[str]:
    """All file paths under ``url``, relative to it, '/'-separated, sorted."""
    if is_s3(url):
        bucket, key = parse_s3(url)
        prefix = key.rstrip("/") + "/" if key else ""
        out = []
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"][len(prefix):] for o in page.get("Contents", [])
                    if not o["Key"].endswith("/")]
        return sorted(out)
    root = local_path(url)
    out = []
    for d, _, files in os.walk(root):
        for f in files:
            out.append(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"))
    return sorted(out)


def remove(url, *, missing_ok: bool = False) -> None:
    """Delete one file/object; FileNotFoundError naming the URL if missing (unless missing_ok)."""
    if is_s3(url):
        if head_object(url) is None:
            if missing_ok:
                return
            raise FileNotFoundError(f"no such object: {url}")
        bucket, key = parse_s3(url)
        client().delete_object(Bucket=bucket, Key=key)
        return
    try:
        os.remove(local_path(url))
    except FileNotFoundError:
        if not missing_ok:
            raise FileNotFoundError(f"no such file: {url}") from None


def sha256(url) -> str:
    """Hex sha256 of the content, streamed. For S3 objects written by ``open_write`` the digest
    stored in the object's metadata at upload time is used (an overwrite replaces it)."""
    if is_s3(url):
        head = head_object(url)
        if head is None:
            raise FileNotFoundError(f"no such object: {url}")
        meta = head.get("Metadata", {}).get(SHA256_META)
        if meta:
            return meta
    h = hashlib.sha256()
    with open_read(url) as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- trees
def upload_dir(local_dir, url) -> int:
    """Copy every file under ``local_dir`` to ``url`` (keeping relative paths); returns count."""
    local_dir = local_path(local_dir)
    if not os.path.isdir(local_dir):
        raise FileNotFoundError(f"no such directory: {local_dir}")
    rels = _walk(local_dir)
    for rel in rels:
        with open(os.path.join(local_dir, *rel.split("/")), "rb") as src, \
                open_write(join(url, rel)) as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
    return len(rels)


def download_dir(url, local_dir) -> int:
    """Copy every file under the prefix ``url`` into ``local_dir``; returns count.

    FileNotFoundError if the prefix holds nothing."""
    rels = _walk(url)
    if not rels:
        raise FileNotFoundError(f"nothing under {url}")
    local_dir = local_path(local_dir)
    for rel in rels:
        with open_read(join(url, rel)) as src, \
                open_write(os.path.join(local_dir, *rel.split("/"))) as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
    return len(rels)
