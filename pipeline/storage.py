"""The one place that opens URLs: plain paths, ``file://`` URLs and ``s3://bucket/key``.

Everything else in the project goes through these functions, so local disks and any
S3-compatible store (endpoint from ``AWS_ENDPOINT_URL``) behave the same:

* reads stream (an S3 object is never downloaded whole into memory);
* writes are atomic: a local file appears via ``os.replace`` of a temp file in the same
  directory, an S3 object via one PUT / completed multipart upload on successful close;
  if the ``with`` block raises, nothing becomes visible;
* a missing object raises ``FileNotFoundError`` naming the URL; a store that cannot be used
  (unsupported scheme, missing bucket, no or wrong credentials, endpoint down) raises
  ``StorageError``, one line naming the URL (``check`` asks for that up front, in seconds).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import mmap
import os
import shutil
import tempfile
import threading
from typing import BinaryIO, Iterator

from pipeline.s3_errors import StorageError, UnsupportedURL, check, describe  # noqa: F401  (re-exported)

MULTIPART_THRESHOLD = 64 << 20  # objects above this size are uploaded in parts
MULTIPART_CHUNKSIZE = 64 << 20
MAX_ATTEMPTS = 10               # botocore retries: throttling, 5xx, connection errors
READ_RETRIES = 5                # re-opens of a broken S3 read stream (resumes with Range)
_CHUNK = 1 << 20
SHA256_META = "sha256"          # S3 user metadata written by open_write (see sha256())

_clients: dict = {}
_clients_lock = threading.Lock()


# --------------------------------------------------------------------------- URL helpers
def is_s3(url: str) -> bool:
    """True for ``s3://`` URLs."""
    return str(url).startswith("s3://")


def parse_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; the key may be empty."""
    if not is_s3(url):
        raise ValueError(f"not an s3:// URL: {url!r}")
    rest = str(url)[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URL without a bucket: {url!r}")
    return bucket, key


def _local(url) -> str:
    url = os.fspath(url)
    if url.startswith("file://"):
        return url[len("file://"):]
    if "://" in url:
        raise UnsupportedURL(f"unsupported URL scheme (plain path, file:// or s3:// only): {url}")
    return url


def join(url, *parts: str) -> str:
    """Join path components onto a URL (``/`` for URLs, ``os.path.join`` for plain paths)."""
    url = os.fspath(url)
    if is_s3(url) or url.startswith("file://"):
        out = url.rstrip("/")
        for p in parts:
            p = str(p).strip("/")
            if p:
                out = f"{out}/{p}"
        return out
    return os.path.join(url, *map(str, parts))


# --------------------------------------------------------------------------- S3 client
def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def client():
    """A boto3 S3 client cached per (process, endpoint); clients are thread-safe once built."""
    endpoint = _endpoint()
    key = (os.getpid(), endpoint)
    c = _clients.get(key)
    if c is None:
        with _clients_lock:  # boto3's default session is not thread-safe while building clients
            c = _clients.get(key)
            if c is None:
                import boto3
                from botocore.config import Config

                cfg = Config(retries={"max_attempts": MAX_ATTEMPTS, "mode": "adaptive"},
                             connect_timeout=10, read_timeout=120, max_pool_connections=32)
                c = boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg)
                _clients[key] = c
    return c


def _is_missing(err) -> bool:
    code = str(err.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


def _head(url: str) -> dict | None:
    from botocore.exceptions import ClientError

    bucket, key = parse_s3(url)
    try:
        return client().head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if _is_missing(e):
            return None
        why = describe(url, e)  # botocore's text names the operation, not the URL
        if why:
            raise StorageError(why) from None
        raise


# --------------------------------------------------------------------------- pyarrow (Ray's storage)
# Ray Train writes checkpoints and its controller's snapshot through a pyarrow filesystem, and an
# error in the controller ends the run. AWS's legacy backoff waits 25 ms * 2^n before retry n, the
# same every time (the "standard" strategy's jitter makes the window random, and its retry quota
# can run dry under many concurrent uploads): 12 attempts keep trying for ~100 s of refused
# connections, longer when each attempt waits for a timeout.
ARROW_MAX_ATTEMPTS = 12
ARROW_CONNECT_TIMEOUT = 10
ARROW_REQUEST_TIMEOUT = 60


@functools.lru_cache(maxsize=None)
def _retrying_s3_class():
    import pyarrow.fs

    class RetryingS3FileSystem(pyarrow.fs.S3FileSystem):
        # pyarrow's pickle drops retry_strategy, and Ray pickles the filesystem into its controller
        # and workers: rebuild it there with the same settings.
        def __reduce__(self):
            return _arrow_s3, self._sta_args

    return RetryingS3FileSystem


def _arrow_s3(endpoint: str | None, region: str, max_attempts: int, connect_timeout: float,
              request_timeout: float):
    import pyarrow.fs

    kw = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kw = dict(endpoint_override=host or endpoint, scheme=scheme if host else "https")
    # No keys passed: every process resolves its own credentials (env, profile, instance role), so
    # no secret travels inside the pickled filesystem.
    fs = _retrying_s3_class()(
        region=region, allow_bucket_creation=False, connect_timeout=connect_timeout,
        request_timeout=request_timeout,
        retry_strategy=pyarrow.fs.AwsDefaultS3RetryStrategy(max_attempts=max_attempts), **kw)
    fs._sta_args = (endpoint, region, max_attempts, connect_timeout, request_timeout)
    return fs


def arrow_filesystem(url, *, max_attempts: int = ARROW_MAX_ATTEMPTS,
                     connect_timeout: float = ARROW_CONNECT_TIMEOUT,
                     request_timeout: float = ARROW_REQUEST_TIMEOUT):
    """A ``pyarrow.fs.S3FileSystem`` for an ``s3://`` URL (None for local paths) that retries
    through outages of about a minute and keeps those settings when pickled.

    Args:
        url (str): the URL the filesystem will serve (endpoint from ``AWS_ENDPOINT_URL``).
        max_attempts (int): attempts per request (legacy AWS backoff, see ``ARROW_MAX_ATTEMPTS``).
        connect_timeout (float): seconds to wait for a TCP connection.
        request_timeout (float): seconds without progress before a request is abandoned and retried.
    """
    if not is_s3(url):
        _local(url)  # an unsupported scheme raises here
        return None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return _arrow_s3(_endpoint(), region, max_attempts, connect_timeout, request_timeout)


# --------------------------------------------------------------------------- reading
class _S3Raw(io.RawIOBase):
    """Raw stream over a GetObject body; on a broken connection it re-opens at the current
    offset with a Range request, so long streaming reads survive transient failures."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.name = url
        self._bucket, self._key = parse_s3(url)
        self._pos = 0
        self._body = None
        self._etag = None
        self._size = None
        self._open(0)

    def _open(self, offset: int):
        from botocore.exceptions import ClientError

        kw = {"Bucket": self._bucket, "Key": self._key}
        if offset:
            kw["Range"] = f"bytes={offset}-"
            if self._etag:
                kw["IfMatch"] = self._etag  # never splice two versions of an object
        try:
            resp = client().get_object(**kw)
        except ClientError as e:
            if _is_missing(e):
                raise FileNotFoundError(f"no such object: {self.url}") from None
            raise
        self._body = resp["Body"]
        if self._etag is None:
            self._etag = resp.get("ETag")
            self._size = resp.get("ContentLength")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        from botocore.exceptions import ConnectionError as BotoConnError, ReadTimeoutError
        from urllib3.exceptions import ProtocolError

        if self._size is not None and self._pos >= self._size:
            return 0
        for attempt in range(READ_RETRIES + 1):
            try:
                data = self._body.read(len(b))
                break
            except (BotoConnError, ReadTimeoutError, ProtocolError, ConnectionError):
                if attempt == READ_RETRIES:
                    raise
                self._body.close()
                self._open(self._pos)
        n = len(data)
        b[:n] = data
        self._pos += n
        return n

    def close(self):
        if self._body is not None:
            self._body.close()
            self._body = None
        super().close()


def open_read(url) -> BinaryIO:
    """Open ``url`` for streaming binary reading (buffered; usable by ``tarfile`` mode ``r|*``).

    Raises FileNotFoundError naming the URL when the object/file does not exist."""
    if is_s3(url):
        return io.BufferedReader(_S3Raw(url), buffer_size=_CHUNK)
    path = _local(url)
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
        with open(_local(url), "rb") as f:
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
    path = _local(url)
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
        if key and not key.endswith("/") and _head(url) is not None:
            return True
        prefix = key.rstrip("/") + "/" if key else ""
        resp = client().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        return resp.get("KeyCount", 0) > 0
    return os.path.exists(_local(url))


def size(url) -> int:
    """Size in bytes; FileNotFoundError naming the URL if missing."""
    if is_s3(url):
        head = _head(url)
        if head is None:
            raise FileNotFoundError(f"no such object: {url}")
        return int(head["ContentLength"])
    try:
        return os.path.getsize(_local(url))
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
    path = _local(url)
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
    root = _local(url)
    out = []
    for d, _, files in os.walk(root):
        for f in files:
            out.append(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"))
    return sorted(out)


def remove(url, *, missing_ok: bool = False) -> None:
    """Delete one file/object; FileNotFoundError naming the URL if missing (unless missing_ok)."""
    if is_s3(url):
        if _head(url) is None:
            if missing_ok:
                return
            raise FileNotFoundError(f"no such object: {url}")
        bucket, key = parse_s3(url)
        client().delete_object(Bucket=bucket, Key=key)
        return
    try:
        os.remove(_local(url))
    except FileNotFoundError:
        if not missing_ok:
            raise FileNotFoundError(f"no such file: {url}") from None


def sha256(url) -> str:
    """Hex sha256 of the content, streamed. For S3 objects written by ``open_write`` the digest
    stored in the object's metadata at upload time is used (an overwrite replaces it)."""
    if is_s3(url):
        head = _head(url)
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
    local_dir = _local(local_dir)
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
    local_dir = _local(local_dir)
    for rel in rels:
        with open_read(join(url, rel)) as src, \
                open_write(os.path.join(local_dir, *rel.split("/"))) as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
    return len(rels)
