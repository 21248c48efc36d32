"""pipeline.eval_data: every tracklet of a split, all frames, exactly once over ranks x workers;
bad input counted; S3; shards written by pipeline.pack."""
from __future__ import annotations

import io
import math
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipeline import storage, urls
from pipeline.eval_data import eval_loader  # noqa: F401 (used through shard_writer._eval)
from pipeline.reading import eval_assignment, shard_samples
from pipeline.train_data import train_loader
from shard_writer import (H, LAYOUTS, W, _corrupt_dataset, _decode, _eval, _eval_frames, _jpeg,  # noqa: F401
                          _make_tracklets, _write_dataset, eval_set)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_round_trip_local(tmp_path, eval_set, num_workers, layout):
    url = str(tmp_path)
    _write_dataset(url, eval_set, layout=layout)
    for split in ("query", "gallery"):
        batches = _eval(url, split, num_workers=num_workers, clips_per_batch=3)
        assert all(0 < len(b["clips"]) <= 3 for b in batches)
        per, meta, skipped = _eval_frames(batches, 4)
        assert skipped == 0
        tracks = eval_set[split]
        assert sorted(per) == list(range(len(tracks)))
        for i, tr in enumerate(tracks):
            T = len(tr["frames"])
            clips = np.concatenate(per[i])  # (n_clips*N, H, W, 3)
            assert len(per[i]) == math.ceil(T / 4)
            src = np.stack([_decode(f) for f in tr["frames"]])
            np.testing.assert_array_equal(clips[:T], src)  # every frame, in order, exact pixels
            np.testing.assert_array_equal(clips[T:], np.repeat(src[-1:], len(clips) - T, 0))  # padding
            assert meta[i] == (tr["pid"], tr["camid"])


def test_eval_round_trip_s3(s3_bucket, eval_set):
    url = f"s3://{s3_bucket}/ds"
    _write_dataset(url, eval_set)
    per, meta, skipped = _eval_frames(_eval(url, "gallery", num_workers=2, clips_per_batch=5), 4)
    assert skipped == 0 and sorted(per) == list(range(len(eval_set["gallery"])))
    for i, tr in enumerate(eval_set["gallery"]):
        src = np.stack([_decode(f) for f in tr["frames"]])
        np.testing.assert_array_equal(np.concatenate(per[i])[:len(src)], src)


@pytest.mark.parametrize("tracklets_per_shard", [1, 4])  # 10 shards (>= 4 slots) and 3 shards (<)
def test_eval_disjoint_and_complete_over_ranks(tmp_path, eval_set, tracklets_per_shard):
    url = str(tmp_path)
    man = _write_dataset(url, eval_set, tracklets_per_shard=tracklets_per_shard)
    names = [s["name"] for s in man["splits"]["gallery"]["shards"]]
    units = [u for r in range(2) for w in range(2)
             for u in eval_assignment(names, rank=r, world_size=2, worker=w, num_workers=2)]
    assert all(len(eval_assignment(names, rank=r, world_size=2, worker=w, num_workers=2)) > 0
               for r in range(2) for w in range(2))
    assert len(units) == len(set(units))
    parts = units[0][2]
    assert {(s, q) for s, q, _ in units} == {(s, q) for s in names for q in range(parts)}
    seen = []
    for rank in range(2):
        per, _, skipped = _eval_frames(_eval(url, "gallery", rank=rank, world_size=2, num_workers=2), 4)
        assert skipped == 0 and per
        seen.append(set(per))
        for i, clips in per.items():
            assert len(clips) == math.ceil(len(eval_set["gallery"][i]["frames"]) / 4)  # exactly once
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(len(eval_set["gallery"])))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 2)])
def test_eval_corrupt_jpeg_and_truncated_tar_are_counted(tmp_path, eval_set, world_size, num_workers, layout):
    url = str(tmp_path)
    tracks, man = _corrupt_dataset(url, eval_set["gallery"], "gallery", bad_index=1,
                                   trunc_shard=2, tracklets_per_shard=3, layout=layout)
    lost = {1} | {7, 8}  # garbage frame; shard 2 = tracklets 6, 7, 8 cut inside tracklet 7
    seen, skipped = set(), 0
    for rank in range(world_size):
        per, _, sk = _eval_frames(_eval(url, "gallery", rank=rank, world_size=world_size,
                                        num_workers=num_workers), 4)
        assert not seen & set(per)
        seen |= set(per)
        skipped += sk
    assert seen == set(range(len(tracks))) - lost
    assert skipped == 2  # one corrupt sample + one truncated shard, each counted exactly once


@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_bad_json_and_frame_count_are_counted(tmp_path, eval_set, layout):
    # block layout: a missing frame breaks the json's frame_bytes promise -> read member by member
    url = str(tmp_path)
    tracks = [dict(t) for t in eval_set["query"]]
    _write_dataset(url, {"query": tracks}, tracklets_per_shard=10, layout=layout)
    raw = storage.read_bytes(urls.join(url, "query-000000.tar"))
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(raw)) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name == "query_0000000.json":
                data = b"{not json"
            if m.name == "query_0000002.000.jpg":
                continue  # frame missing: n_frames disagrees
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    storage.write_bytes(urls.join(url, "query-000000.tar"), out.getvalue())
    per, _, skipped = _eval_frames(_eval(url, "query", num_workers=0), 4)
    assert sorted(per) == [1, 3] and skipped == 2


def test_eval_missing_shard_counted(tmp_path, eval_set):
    url = str(tmp_path)
    _write_dataset(url, {"gallery": eval_set["gallery"]}, tracklets_per_shard=5)
    storage.remove(urls.join(url, "gallery-000001.tar"))
    per, _, skipped = _eval_frames(_eval(url, "gallery", num_workers=0), 4)
    assert sorted(per) == [0, 1, 2, 3, 4] and skipped == 1


def test_block_layout_damaged_frame_header_drops_only_its_sample(tmp_path):
    url = str(tmp_path)
    rng = np.random.default_rng(12)
    tracks = [{"pid": i, "camid": 0, "frames": [_jpeg(rng) for _ in range(5)]} for i in range(4)]
    _write_dataset(url, {"gallery": tracks}, tracklets_per_shard=4)
    surl = urls.join(url, "gallery-000000.tar")
    raw = bytearray(storage.read_bytes(surl))
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tf:
        m = tf.getmember("gallery_0000001.002.jpg")  # a middle frame: only its own check sees it
        cut = tf.getmember("gallery_0000003.001.jpg").offset_data + 100
    raw[m.offset + 10] ^= 0x01
    storage.write_bytes(surl, bytes(raw))
    per, _, skipped = _eval_frames(_eval(url, "gallery", num_workers=0), 4)
    assert sorted(per) == [0, 2, 3] and skipped == 1
    for i in (0, 2, 3):
        np.testing.assert_array_equal(np.concatenate(per[i])[:5], np.stack([_decode(f) for f in tracks[i]["frames"]]))
    # a cut inside a block is a truncated shard, counted once; samples before it are kept
    storage.write_bytes(surl, bytes(raw[:cut]))
    per, _, skipped = _eval_frames(_eval(url, "gallery", num_workers=0), 4)
    assert sorted(per) == [0, 2] and skipped == 2


def _check_eval_against_source(url, ds, split, **kw):
    per, meta, skipped = _eval_frames(_eval(url, split, **kw), 4)
    tracks = ds.split(split)
    assert skipped == 0 and sorted(per) == list(range(len(tracks)))
    for i, t in enumerate(tracks):
        src = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in t.frames])
        clips = np.concatenate(per[i])
        np.testing.assert_array_equal(clips[:len(src)], src)
        np.testing.assert_array_equal(clips[len(src):], np.repeat(src[-1:], len(clips) - len(src), 0))
        assert meta[i] == (t.pid, t.camid)


def test_pack_round_trip_local(packed_small):
    url, man, ds = packed_small
    assert len(man["splits"]["gallery"]["shards"]) > 1
    for split in ("query", "gallery"):
        _check_eval_against_source(url, ds, split, num_workers=2, clips_per_batch=3)
    # byte-equal at the tar level: the raw frames are the source files
    raw = {}
    for sh in man["splits"]["train"]["shards"]:
        for _, meta, frames in shard_samples(urls.join(url, sh["name"])):
            raw[meta["index"]] = frames
    assert len(raw) == len(ds.train)
    for i, t in enumerate(ds.train):
        assert list(raw[i]) == [open(f, "rb").read() for f in t.frames]
    b = list(train_loader(url, clip_len=4, p=3, k=2, height=H, width=W, batches_per_epoch=2,
                          epoch=0, seed=0, num_workers=0))
    assert len(b) == 2 and all(sorted(Counter(x["pids"].tolist()).values()) == [2, 2, 2] for x in b)


def test_pack_round_trip_s3(packed_small, s3_bucket):
    url, _, ds = packed_small
    s3 = f"s3://{s3_bucket}/syn"
    storage.upload_dir(url, s3)
    _check_eval_against_source(s3, ds, "gallery", num_workers=2, world_size=1)
