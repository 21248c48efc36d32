"""Talking to S3 so that transient failures are ridden out: the cached boto3 client, HEAD, a read
stream that resumes where a broken connection left it, and the pyarrow filesystem Ray writes through.

:mod:`pipeline.storage` is what the rest of the project calls; this module is its S3 transport.
"""
from __future__ import annotations

import functools
import io
import os
import threading

from pipeline.s3_errors import StorageError, describe
from pipeline.urls import is_s3, local_path, parse_s3

MAX_ATTEMPTS = 10               # botocore retries: throttling, 5xx, connection errors
READ_RETRIES = 5                # re-opens of a broken S3 read stream (resumes with Range)

_clients: dict = {}
_clients_lock = threading.Lock()


# --------------------------------------------------------------------------- boto3 client
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


def head_object(url: str) -> dict | None:
    """The HeadObject response for ``url``, or None when the object does not exist.

    Args:
        url (str): an ``s3://bucket/key`` URL.

    Raises:
        StorageError: one line naming the URL when the store cannot be used (bucket, endpoint,
            credentials).
    """
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


# --------------------------------------------------------------------------- reading
class ResumingReader(io.RawIOBase):
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
        from botocore.exceptions import ConnectionError as BotoConnError
        from botocore.exceptions import ReadTimeoutError
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


# --------------------------------------------------------------------------- pyarrow (Ray's storage)
# Ray Train writes checkpoints and its controller's snapshot through a pyarrow filesystem, and an
# error in the controller ends the run. AWS's legacy backoff waits 25 ms * 2^n before retry n, the
# same every time (the "standard" strategy's jitter makes the window random, and its retry quota
# can run dry under many concurrent uploads): 12 attempts keep trying for ~100 s of refused
# connections, longer when each attempt waits for a timeout.
ARROW_MAX_ATTEMPTS = 12
ARROW_CONNECT_TIMEOUT = 10
ARROW_REQUEST_TIMEOUT = 60


@functools.cache
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
        kw = {"endpoint_override": host or endpoint, "scheme": scheme if host else "https"}
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
        local_path(url)  # an unsupported scheme raises here
        return None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return _arrow_s3(_endpoint(), region, max_attempts, connect_timeout, request_timeout)
