"""pipeline.s3_errors: the pre-flight ``check`` and one-line errors that name the URL."""
from __future__ import annotations

import pytest

from pipeline import s3_errors, storage


def test_check_missing_bucket_and_bad_scheme(s3_server, s3_bucket, tmp_path):
    s3_errors.check(f"s3://{s3_bucket}/data")
    s3_errors.check(str(tmp_path / "nowhere"))  # local paths: the callers say what they expected
    with pytest.raises(s3_errors.StorageError, match=r"s3://no-such-bucket/x: bucket 'no-such-bucket' does not exist"):
        s3_errors.check("s3://no-such-bucket/x")
    with pytest.raises(s3_errors.StorageError, match="unsupported URL scheme.*gs://b/shards") as e:
        s3_errors.check("gs://b/shards")
    assert isinstance(e.value, ValueError)


def test_check_endpoint_down_is_quick(monkeypatch):
    import time

    from pipeline.train import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    t = time.monotonic()
    with pytest.raises(s3_errors.StorageError, match=r"s3://b/p: cannot reach the S3 endpoint http://127.0.0.1:\d+"):
        s3_errors.check("s3://b/p")
    assert time.monotonic() - t < 10


def test_check_no_credentials(s3_server, monkeypatch, tmp_path):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(s3_errors.StorageError, match="s3://b/p: no S3 credentials found"):
        s3_errors.check("s3://b/p")


def test_wrong_credentials_name_the_url(s3_auth_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_auth_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(s3_errors.StorageError, match=r"s3://b/p: access denied \(403.*check the credentials"):
        s3_errors.check("s3://b/p")
    # and any later call that reaches the store names the URL too
    with pytest.raises(s3_errors.StorageError, match=r"s3://b/p/manifest.json: access denied"):
        storage.exists("s3://b/p/manifest.json")
