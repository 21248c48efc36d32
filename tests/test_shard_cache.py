"""Node-local cache of S3 shards (pipeline.shard_cache), against moto's S3 server on 127.0.0.1."""
from __future__ import annotations

import hashlib
import logging
import os
import time

import pytest
import torch

from pipeline import s3_client, shard_cache, storage
from pipeline.eval_data import eval_loader
from pipeline.reading import shard_samples
from pipeline.shards import read_manifest
from pipeline.train_data import train_loader
from tests.fixtures_data import packed_synthetic


def _put(bucket: str, name: str, data: bytes) -> tuple[str, tuple[int, str]]:
    url = f"s3://{bucket}/{name}"
    with storage.open_write(url) as f:
        f.write(data)
    return url, (len(data), hashlib.sha256(data).hexdigest())


def _cache(tmp_path, expected: dict, max_bytes: int = 1 << 30) -> shard_cache.ShardCache:
    return shard_cache.ShardCache(str(tmp_path / "cache"), max_bytes, expected)


def _files(cache) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), cache.root)
                  for d, _, fs in os.walk(cache.root) for f in fs)


def _fill(cache, url, n: int = 10) -> bytes:
    """Read the first ``n`` bytes through the cache, as a tar reader stops before the padding."""
    with cache.filling(url) as f:
        return f.read(n)


def test_first_read_publishes_a_verified_copy_and_later_reads_map_it(s3_bucket, tmp_path):
    data = os.urandom(300_000)
    url, want = _put(s3_bucket, "a.tar", data)
    cache = _cache(tmp_path, {url: want})
    assert cache.map(url) is None  # not cached yet
    assert _fill(cache, url) == data[:10]
    assert _files(cache) == [f"{want[1][:2]}/{want[1]}.tar"]  # the rest was read too, then published
    assert bytes(cache.map(url)) == data
    # the copy is read even once the object is gone
    s3_client.client().delete_object(Bucket=s3_bucket, Key="a.tar")
    assert bytes(cache.map(url)) == data


def test_nothing_is_published_when_the_read_fails_or_the_bytes_differ(s3_bucket, tmp_path, caplog):
    url, (size, digest) = _put(s3_bucket, "b.tar", os.urandom(50_000))
    cache = _cache(tmp_path, {url: (size, digest)})
    with pytest.raises(RuntimeError):
        with cache.filling(url) as f:
            f.read(100)
            raise RuntimeError("reader failed half-way")
    assert _files(cache) == []  # no copy, no temp file
    bad = _cache(tmp_path, {url: (size, "0" * 64)})  # the manifest disagrees with the object
    with caplog.at_level(logging.WARNING, logger="pipeline.shard_cache"):
        assert _fill(bad, url) != b""
    assert _files(bad) == [] and "not caching" in caplog.text
    short = _cache(tmp_path, {url: (size + 1, digest)})
    _fill(short, url)
    assert _files(short) == []


def test_a_damaged_copy_is_not_used_and_is_replaced(s3_bucket, tmp_path):
    data = os.urandom(20_000)
    url, want = _put(s3_bucket, "c.tar", data)
    cache = _cache(tmp_path, {url: want})
    _fill(cache, url)
    path = cache.path(url)
    with open(path, "r+b") as f:
        f.truncate(1000)
    assert cache.map(url) is None
    _fill(cache, url)
    assert bytes(cache.map(url)) == data


def test_least_recently_used_copies_make_room(s3_bucket, tmp_path):
    size = 40_000
    shards = dict(_put(s3_bucket, f"s{i}.tar", os.urandom(size)) for i in range(4))
    urls = list(shards)
    cache = _cache(tmp_path, shards, max_bytes=2 * size + 100)  # room for two
    _fill(cache, urls[0])
    _fill(cache, urls[1])
    old = time.time() - 100
    os.utime(cache.path(urls[0]), (old, old))
    os.utime(cache.path(urls[1]), (old + 1, old + 1))
    assert cache.map(urls[0]) is not None  # a hit: urls[0] is now the most recently used
    _fill(cache, urls[2])
    assert [os.path.exists(cache.path(u)) for u in urls[:3]] == [True, False, True]
    stale = os.path.join(cache.root, "ab", ".tmp-dead.tar")  # left by a killed process
    os.makedirs(os.path.dirname(stale), exist_ok=True)  # a cached copy may already live in ab/
    open(stale, "wb").close()
    os.utime(stale, (old - 7200, old - 7200))
    _fill(cache, urls[3])
    assert not os.path.exists(stale)
    assert sum(os.path.getsize(cache.path(u)) for u in urls if os.path.exists(cache.path(u))) <= cache.max_bytes
    small = shard_cache.ShardCache(str(tmp_path / "small"), size - 1, shards)  # a shard over the limit
    with small.filling(urls[0]) as f:
        assert len(f.read()) == size  # is streamed, and not cached
    assert _files(small) == []


def test_for_manifest_only_caches_remote_prefixes(tmp_path):
    info = {"shards": [{"name": "train-000000.tar", "bytes": 10, "sha256": "ab" * 32}]}
    assert shard_cache.for_manifest(str(tmp_path), info, str(tmp_path / "c"), 1.0) is None
    assert shard_cache.for_manifest("s3://b/p", info, "", 1.0) is None
    c = shard_cache.for_manifest("s3://b/p", info, str(tmp_path / "c"), 0.5)
    assert c.expected == {"s3://b/p/train-000000.tar": (10, "ab" * 32)} and c.max_bytes == 1 << 29
    assert c.path("s3://b/p/other.tar") is None and c.path(str(tmp_path)) is None
    with pytest.raises(ValueError, match="cache_gb"):
        shard_cache.for_manifest("s3://b/p", info, "c", 0)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A packed synthetic dataset's shard directory (2-8 frames a tracklet)."""
    return packed_synthetic(tmp_path_factory, num_ids=8, tracklets_per_id=2, frames_per_tracklet=(2, 8),
                            num_test_ids=3, seed=1)[0]


def test_loaders_read_s3_shards_once_then_from_the_cache(packed, s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/syn"
    storage.upload_dir(packed, url)
    man = read_manifest(url)
    cache_dir = str(tmp_path / "cache")
    kw = dict(clip_len=3, p=3, k=2, height=16, width=8, batches_per_epoch=3, seed=4, num_workers=2)

    def epochs(**extra):
        loader = train_loader(url, epoch=0, persistent=True, **kw, **extra)
        try:
            return [[(b["clips"].clone(), b["pids"].clone(), b["skipped"]) for b in loader] for _ in range(2)]
        finally:
            loader.close()

    streamed = epochs()
    cached = epochs(cache_dir=cache_dir)
    for a, b in zip(streamed, cached, strict=True):  # the same batches, epoch for epoch
        for (ca, pa, sa), (cb, pb, sb) in zip(a, b, strict=True):
            assert torch.equal(ca, cb) and torch.equal(pa, pb) and sa == sb == 0
    c = shard_cache.for_manifest(url, man.raw["splits"]["train"], cache_dir, 100.0)
    read = [u for u in c.expected if os.path.exists(c.path(u))]
    assert read, "the shards the loader read are cached"
    for u in read:  # each copy is the object, verified
        with open(c.path(u), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == c.expected[u][1]
        assert [m for _, m, _ in shard_samples(u, cache=c)] == [m for _, m, _ in shard_samples(u)]
    # evaluation caches its shards too, and then reads nothing from S3
    q = eval_loader(url, "query", clip_len=3, height=16, width=8, num_workers=0, cache_dir=cache_dir)
    first = [(b["index"].clone(), b["clips"].clone()) for b in q]
    for obj in s3_client.client().list_objects_v2(Bucket=s3_bucket, Prefix="syn/query-")["Contents"]:
        s3_client.client().delete_object(Bucket=s3_bucket, Key=obj["Key"])
    q = eval_loader(url, "query", clip_len=3, height=16, width=8, num_workers=0, cache_dir=cache_dir)
    again = [(b["index"].clone(), b["clips"].clone(), b["skipped"]) for b in q]
    assert len(first) == len(again) and all(s == 0 for *_, s in again)
    for (ia, ca), (ib, cb, _) in zip(first, again):
        assert torch.equal(ia, ib) and torch.equal(ca, cb)


def test_an_unusable_cache_only_streams(s3_bucket, tmp_path, caplog, monkeypatch):
    data = os.urandom(30_000)
    url, want = _put(s3_bucket, "d.tar", data)
    (tmp_path / "file").write_text("not a directory")
    blocked = shard_cache.ShardCache(str(tmp_path / "file" / "cache"), 1 << 30, {url: want})
    with caplog.at_level(logging.WARNING, logger="pipeline.shard_cache"):
        with blocked.filling(url) as f:
            assert f.read() == data
    assert "streaming instead" in caplog.text
    # a write that fails half-way (a full disk): the read goes on, nothing is published
    cache = _cache(tmp_path, {url: want})
    real_write, calls = os.write, []

    def full_disk(fd, b):
        calls.append(len(b))
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real_write(fd, b[:1000])  # and a short write first

    monkeypatch.setattr(shard_cache.os, "write", full_disk)
    with cache.filling(url) as f:
        assert f.read(20_000) == data[:20_000]
        assert f.read() == data[20_000:]
    monkeypatch.undo()
    assert _files(cache) == [] and len(calls) == 2
