"""One-line errors for stores that cannot be used: ``StorageError`` and the S3 pre-flight check.

botocore reports a missing bucket, an endpoint that is down, missing or wrong credentials as
exceptions whose text names the operation but not the URL (``403 ... HeadObject: Forbidden``), and
its retries make a dead endpoint cost tens of seconds. ``check`` asks the store once, with a short,
bounded client, before anything long starts, and ``describe`` turns what it got into one line that
names the URL, so the CLIs can print it and exit 2.
"""
from __future__ import annotations

import logging
import os

# botocore says "Found credentials in environment variables." at INFO for every client of every
# process; the CLIs log at INFO, so that line would sit next to each one-line error.
logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
# The pre-flight client: one retry and short timeouts, so a dead endpoint is reported in seconds.
CHECK_ATTEMPTS = 2
CHECK_CONNECT_TIMEOUT = 3
CHECK_READ_TIMEOUT = 10


class StorageError(OSError):
    """A store cannot be used as asked (unsupported scheme, missing bucket, endpoint down, no or
    wrong credentials). The message is one line and names the URL."""


class UnsupportedURL(StorageError, ValueError):
    """A URL scheme other than a plain path, ``file://`` or ``s3://`` (also a ``ValueError``)."""


def endpoint() -> str:
    """The S3 endpoint in use, for messages (AWS's own when none is configured)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def describe(url: str, exc: BaseException) -> str | None:
    """One line naming ``url`` for a botocore error that no retry will fix, or None for others.

    Args:
        url (str): the ``s3://`` URL the failed call was about.
        exc (BaseException): what botocore raised.
    """
    from botocore import exceptions as be

    bucket = str(url)[len("s3://"):].partition("/")[0]
    if isinstance(exc, be.NoCredentialsError):
        return (f"{url}: no S3 credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                f"AWS_PROFILE, or ~/.aws/credentials)")
    if isinstance(exc, (be.EndpointConnectionError, be.ConnectTimeoutError, be.ReadTimeoutError,
                        be.ConnectionClosedError)):
        return f"{url}: cannot reach the S3 endpoint {endpoint()} ({type(exc).__name__})"
    if isinstance(exc, be.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket" or (code in ("404", "NotFound") and exc.operation_name == "HeadBucket"):
            return f"{url}: bucket {bucket!r} does not exist at {endpoint()}"
        if status == 403 or code in ("403", "Forbidden", "AccessDenied", "InvalidAccessKeyId",
                                     "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return (f"{url}: access denied ({status or ''} {code}) at {endpoint()}: check the credentials "
                    f"(AWS_ACCESS_KEY_ID / AWS_PROFILE) and the bucket's permissions").replace("( ", "(")
    return None


def check(url: str) -> None:
    """Raise ``StorageError`` (one line naming ``url``) unless ``url`` is usable: a plain path,
    ``file://`` URL, or an ``s3://`` URL whose bucket exists and answers these credentials.

    Args:
        url (str): a dataset, run or checkpoint URL. Local paths are not checked for existence
            (the callers say what they expected to find there).
    """
    url = os.fspath(url)
    if not str(url).startswith("s3://"):
        if "://" in url and not url.startswith("file://"):
            raise UnsupportedURL(f"unsupported URL scheme (plain path, file:// or s3:// only): {url}")
        return
    import boto3
    from botocore import exceptions as be
    from botocore.config import Config

    bucket = url[len("s3://"):].partition("/")[0]
    if not bucket:
        raise StorageError(f"{url}: s3 URL without a bucket")
    cfg = Config(retries={"max_attempts": CHECK_ATTEMPTS, "mode": "standard"},
                 connect_timeout=CHECK_CONNECT_TIMEOUT, read_timeout=CHECK_READ_TIMEOUT)
    ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    try:
        boto3.session.Session().client("s3", endpoint_url=ep, config=cfg).head_bucket(Bucket=bucket)
    except (be.BotoCoreError, be.ClientError) as exc:
        raise StorageError(describe(url, exc) or f"{url}: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
