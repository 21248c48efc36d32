"""pipeline.storage against the local filesystem and a real S3 server (moto on loopback)."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile

import pytest

from pipeline import s3_client, storage, urls


@pytest.fixture(params=["local", "file", "s3"])
def base(request, tmp_path):
    """A writable prefix URL of each kind."""
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "file":
        return "file://" + str(tmp_path / "store")
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    assert server.startswith("http://127.0.0.1")
    return f"s3://{bucket}/pre/fix"


def test_open_read_refuses_other_schemes():
    with pytest.raises(ValueError):
        storage.open_read("http://example.invalid/x")


def test_round_trip_listdir_size_remove(base):
    a = urls.join(base, "a.bin")
    storage.write_bytes(a, b"hello")
    storage.write_bytes(urls.join(base, "sub", "b.bin"), b"xyz" * 1000)
    assert storage.exists(a) and storage.exists(urls.join(base, "sub"))
    assert not storage.exists(urls.join(base, "nope.bin"))
    assert storage.read_bytes(a) == b"hello"
    assert storage.size(urls.join(base, "sub", "b.bin")) == 3000
    assert storage.listdir(base) == ["a.bin", "sub"]
    assert storage.listdir(urls.join(base, "sub")) == ["b.bin"]
    assert storage.listdir(urls.join(base, "missing")) == []
    assert storage.sha256(a) == hashlib.sha256(b"hello").hexdigest()
    storage.write_bytes(a, b"changed")  # overwrite replaces content and digest
    assert storage.read_bytes(a) == b"changed"
    assert storage.sha256(a) == hashlib.sha256(b"changed").hexdigest()
    storage.remove(a)
    assert not storage.exists(a)
    assert storage.listdir(base) == ["sub"]
    storage.remove(a, missing_ok=True)


def test_missing_objects_raise_clear_errors(base):
    url = urls.join(base, "missing.tar")
    for fn in (storage.open_read, storage.read_bytes, storage.size, storage.sha256, storage.remove):
        with pytest.raises(FileNotFoundError, match="missing.tar"):
            fn(url)


def test_atomic_write_leaves_nothing_on_exception(base):
    url = urls.join(base, "out.bin")
    storage.write_bytes(urls.join(base, "keep.bin"), b"k")
    with pytest.raises(RuntimeError):
        with storage.open_write(url) as f:
            f.write(b"partial" * 1000)
            raise RuntimeError("crash mid-write")
    assert not storage.exists(url)
    assert storage.listdir(base) == ["keep.bin"]  # no temp file left behind either
    # an existing object is not clobbered by a failed overwrite
    storage.write_bytes(url, b"old")
    with pytest.raises(RuntimeError):
        with storage.open_write(url) as f:
            f.write(b"new")
            raise RuntimeError
    assert storage.read_bytes(url) == b"old"


def test_streaming_tar_read(base):
    """open_read gives a stream tarfile can read in pipe mode ('r|*')."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            data = os.urandom(1000 + i)
            ti = tarfile.TarInfo(f"k{i}.bin")
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    url = urls.join(base, "s.tar")
    storage.write_bytes(url, buf.getvalue())
    with storage.open_read(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        names = [m.name for m in tar]
    assert names == ["k0.bin", "k1.bin", "k2.bin"]


def test_s3_multipart_upload_and_streaming_read(s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/big/object.bin"
    data = os.urandom(12 << 20)  # 12 MiB with a 5 MiB threshold -> 3 parts
    with storage.open_write(url, multipart_threshold=5 << 20, multipart_chunksize=5 << 20) as f:
        for i in range(0, len(data), 1 << 20):
            f.write(data[i:i + (1 << 20)])
    head = s3_client.client().head_object(Bucket=s3_bucket, Key="big/object.bin")
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # multipart ETag: md5-<parts>
    assert storage.size(url) == len(data)
    # streaming: the first bytes arrive without pulling the object into the buffer
    with storage.open_read(url) as f:
        assert f.read(16) == data[:16]
        raw = f.raw
        assert raw._pos <= 2 << 20, raw._pos
    assert storage.read_bytes(url) == data
    expected = hashlib.sha256(data).hexdigest()
    assert storage.sha256(url) == expected


def test_s3_sha256_without_metadata_streams(s3_server, s3_bucket):
    s3_client.client().put_object(Bucket=s3_bucket, Key="raw.bin", Body=b"plain put")
    assert storage.sha256(f"s3://{s3_bucket}/raw.bin") == hashlib.sha256(b"plain put").hexdigest()


def test_upload_and_download_dir(s3_server, s3_bucket, tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"A")
    (src / "d" / "b.txt").write_bytes(b"B" * 10)
    url = f"s3://{s3_bucket}/tree"
    assert storage.upload_dir(str(src), url) == 2
    assert storage.listdir(url) == ["a.txt", "d"]
    dst = tmp_path / "dst"
    assert storage.download_dir(url, str(dst)) == 2
    assert (dst / "a.txt").read_bytes() == b"A" and (dst / "d" / "b.txt").read_bytes() == b"B" * 10
    with pytest.raises(FileNotFoundError):
        storage.download_dir(f"s3://{s3_bucket}/empty", str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError):
        storage.upload_dir(str(tmp_path / "nope"), url)


def test_map_local_views_local_files_only(tmp_path, s3_bucket):
    data = os.urandom(3 * 4096 + 5)
    path = tmp_path / "shard.tar"
    path.write_bytes(data)
    for url in (str(path), f"file://{path}"):
        view = storage.map_local(url)
        assert view.readonly and len(view) == len(data) and view[4000:4100] == data[4000:4100]
    # replaced atomically (as our writers do) while mapped: the old view keeps the old bytes
    storage.write_bytes(str(path), b"new")
    assert bytes(view[-5:]) == data[-5:] and bytes(storage.map_local(str(path))) == b"new"
    (tmp_path / "empty").write_bytes(b"")
    assert storage.map_local(str(tmp_path / "empty")) is None
    with pytest.raises(FileNotFoundError, match="no such file"):
        storage.map_local(str(tmp_path / "missing"))
    storage.write_bytes(f"s3://{s3_bucket}/x", data)
    assert storage.map_local(f"s3://{s3_bucket}/x") is None
