"""pipeline.urls: telling plain paths, file:// and s3:// URLs apart, and joining them."""
from __future__ import annotations

import os

import pytest

from pipeline import urls


def test_url_helpers():
    assert urls.is_s3("s3://b/k") and not urls.is_s3("/tmp/x") and not urls.is_s3("file:///x")
    assert urls.parse_s3("s3://bucket/a/b.tar") == ("bucket", "a/b.tar")
    assert urls.parse_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError):
        urls.parse_s3("/not/s3")
    with pytest.raises(ValueError):
        urls.parse_s3("s3:///key")
    assert urls.join("s3://b/p/", "x", "/y.tar") == "s3://b/p/x/y.tar"
    assert urls.join("file:///d", "a") == "file:///d/a"
    assert urls.join("/d", "a", "b") == os.path.join("/d", "a", "b")


def test_local_path_accepts_plain_and_file_urls_only():
    assert urls.local_path("/d/a") == "/d/a" and urls.local_path("file:///d/a") == "/d/a"
    with pytest.raises(ValueError, match="unsupported URL scheme"):
        urls.local_path("gs://b/x")
