"""Storage URLs: plain paths, ``file://`` URLs and ``s3://bucket/key``, told apart and joined.

No I/O here: :mod:`pipeline.storage` opens what these name, :mod:`pipeline.s3_client` talks to S3.
"""
from __future__ import annotations

import os

from pipeline.s3_errors import UnsupportedURL


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


def local_path(url) -> str:
    """The filesystem path of a plain path or ``file://`` URL.

    Args:
        url (str or os.PathLike): a plain path or a ``file://`` URL.

    Raises:
        UnsupportedURL: for any other scheme (``s3://`` included: callers check :func:`is_s3` first).
    """
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
