"""Streaming loaders (pipeline.stream) against local shards and moto's S3 server.

Shards are written by `_write_dataset`, a small writer that follows the shard contract of
docs/interfaces.md exactly (tracklet = `<split>_<7-digit index>` with `.json` + `.NNN.jpg` members,
identities never split across train shards, split order kept, manifest written last).
"""
from __future__ import annotations

import io
import json
import math
import os
import tarfile
import types
import time
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import storage
from pipeline.stream import (IMAGENET_MEAN, IMAGENET_STD, TarError,
                             eval_assignment, eval_loader, iter_samples, iter_tar, normalize_clips,
                             read_manifest, split_counts, train_loader, train_shard_assignment)

H, W = 16, 8


# --------------------------------------------------------------------------- fixtures / helpers
def _jpeg(rng) -> bytes:
    arr = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _make_tracklets(seed, num_ids, per_id, frames=(1, 9), cams=3):
    """[{pid, camid, frames}] grouped by identity; per_id may be an int or a list per pid."""
    rng = np.random.default_rng(seed)
    out = []
    for pid in range(num_ids):
        n = per_id[pid] if isinstance(per_id, (list, tuple)) else per_id
        for _ in range(n):
            t = int(rng.integers(frames[0], frames[1] + 1))
            out.append({"pid": pid, "camid": int(rng.integers(cams)),
                        "frames": [_jpeg(rng) for _ in range(t)]})
    return out


LAYOUTS = ("block", "members")


def _tar_bytes(split, items, layout="block") -> bytes:
    """``block``: pipeline.pack's layout (ustar members, ``frame_bytes`` in the json);
    ``members``: any WebDataset writer's (here pax records on every member, no ``frame_bytes``)."""
    buf = io.BytesIO()
    fmt = tarfile.USTAR_FORMAT if layout == "block" else tarfile.PAX_FORMAT
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for index, tr in items:
            key = f"{split}_{index:07d}"
            meta = {"pid": tr["pid"], "camid": tr["camid"], "dataset": "test", "split": split,
                    "n_frames": len(tr["frames"]), "index": index, "tracklet": f"t{index}"}
            if layout == "block":
                meta["frame_bytes"] = [len(f) for f in tr["frames"]]
            members = [(f"{key}.json", json.dumps(meta).encode())]
            members += [(f"{key}.{i:03d}.jpg", fr) for i, fr in enumerate(tr["frames"])]
            for name, data in members:
                ti = tarfile.TarInfo(name)
                # a float mtime makes tarfile write a pax record per member
                ti.size, ti.mtime = len(data), (946684800 if layout == "block" else time.time())
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _write_dataset(url, splits: dict, *, ids_per_shard=2, tracklets_per_shard=3, shard_ids=None,
                   layout="block"):
    """Write shards + manifest (last). Train: `ids_per_shard` identities a shard, or explicit
    `shard_ids` (list of pid lists); query/gallery: `tracklets_per_shard` consecutive tracklets."""
    man = {"format": "sta-reid-shards/1", "dataset": "test", "created": "now", "resize": None,
           "num_classes": len({t["pid"] for t in splits.get("train", [])}), "splits": {},
           "skipped": {"corrupt_images": 0, "tracklets_dropped": 0, "examples": []}}
    for split, tracks in splits.items():
        items = list(enumerate(tracks))
        if split == "train":
            pids = sorted({t["pid"] for t in tracks})
            groups = shard_ids or [pids[i:i + ids_per_shard] for i in range(0, len(pids), ids_per_shard)]
            chunks = [[it for it in items if it[1]["pid"] in g] for g in groups]
        else:
            chunks = [items[i:i + tracklets_per_shard] for i in range(0, len(items), tracklets_per_shard)]
        shards = []
        for n, chunk in enumerate(chunks):
            name = f"{split}-{n:06d}.tar"
            data = _tar_bytes(split, chunk, layout)
            storage.write_bytes(storage.join(url, name), data)
            shards.append({"name": name, "bytes": len(data), "sha256": "",
                           "identities": sorted({t["pid"] for _, t in chunk}),
                           "num_tracklets": len(chunk),
                           "num_frames": sum(len(t["frames"]) for _, t in chunk)})
        man["splits"][split] = {"num_tracklets": len(tracks),
                                "num_identities": len({t["pid"] for t in tracks}),
                                "num_frames": sum(len(t["frames"]) for t in tracks), "shards": shards}
    storage.write_bytes(storage.join(url, "manifest.json"), json.dumps(man).encode())
    return man


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _eval_frames(batches, clip_len):
    """index -> list of clips (N, H, W, 3) uint8 in arrival order, plus total skipped."""
    per, skipped, meta = defaultdict(list), 0, {}
    for b in batches:
        skipped += b["skipped"]
        u8 = torch.round(b["clips"] * 255).to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
        assert b["clips"].shape[1:] == (clip_len, 3, H, W)
        for clip, i, p, c in zip(u8, b["index"].tolist(), b["pids"].tolist(), b["camids"].tolist()):
            per[i].append(clip)
            meta[i] = (p, c)
    return per, meta, skipped


def _eval(url, split, **kw):
    kw = {"clip_len": 4, "height": H, "width": W, "mean": (0, 0, 0), "std": (1, 1, 1), **kw}
    return list(eval_loader(url, split, **kw))


@pytest.fixture(scope="module")
def eval_set():
    return {"query": _make_tracklets(1, 4, 1, frames=(1, 10)),
            "gallery": _make_tracklets(2, 5, 2, frames=(1, 10))}


# --------------------------------------------------------------------------- manifest
def test_read_manifest_missing_and_bad(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not a dataset \(no manifest.json\)"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a sta-reid-shards/1 manifest"):
        read_manifest(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a dataset"):
        train_loader(str(tmp_path / "nothing"), clip_len=2, p=1, k=1, height=H, width=W,
                     batches_per_epoch=1, epoch=0, seed=0)


def test_split_counts(tmp_path, eval_set):
    _write_dataset(str(tmp_path), eval_set)
    c = split_counts(str(tmp_path), "gallery")
    assert c == {"num_tracklets": 10, "num_identities": 5,
                 "num_frames": sum(len(t["frames"]) for t in eval_set["gallery"]), "num_shards": 4}
    with pytest.raises(ValueError, match="no 'train' split"):
        split_counts(str(tmp_path), "train")


# --------------------------------------------------------------------------- tar reader
def test_iter_tar_matches_tarfile_including_long_names_and_empty_members():
    buf = io.BytesIO()
    members = [("a.json", b"{}"), ("x" * 150 + ".bin", b"long name"), ("empty.txt", b""),
               ("d" * 90 + "/" + "y" * 90 + ".jpg", bytes(range(256)) * 5)]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            for name, data in members:
                if fmt == tarfile.USTAR_FORMAT and len(name) > 100 and "/" not in name:
                    continue  # ustar cannot store it (the other long name uses the prefix field)
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime = len(data), 1.5
                tf.addfile(ti, io.BytesIO(data))
            d = tarfile.TarInfo("somedir")
            d.type = tarfile.DIRTYPE
            tf.addfile(d)  # not a regular file: skipped
        raw = buf.getvalue()
        with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
            ref = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
        for chunk in (1 << 20, 513, 700):  # tiny reads exercise refills mid-header/data/padding
            assert list(iter_tar(io.BytesIO(raw), chunk=chunk)) == ref
        assert len(ref) >= 3


def test_iter_tar_detects_truncation_and_corruption():
    raw = _tar_bytes("train", [(0, {"pid": 0, "camid": 0, "frames": [b"\xff\xd8" + b"1" * 700]})])
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        ms = tf.getmembers()
        first_end = ms[0].offset_data + 512  # json data fits one block
        last_end = ms[-1].offset_data + -(-ms[-1].size // 512) * 512
    # inside a header, inside data, at member boundaries (no end-of-archive block)
    for cut in (100, first_end - 10, first_end, first_end + 512 + 100, last_end):
        with pytest.raises(TarError, match="truncated"):
            list(iter_tar(io.BytesIO(raw[:cut])))
    bad = bytearray(raw)
    bad[first_end + 10] ^= 0xFF  # inside the next header (its pax record header)
    with pytest.raises(TarError, match="corrupt"):
        list(iter_tar(io.BytesIO(bytes(bad))))


# --------------------------------------------------------------------------- evaluation stream
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


def test_raw_samples_are_byte_equal(tmp_path, eval_set):
    url = str(tmp_path)
    man = _write_dataset(url, eval_set)
    got = []
    for sh in man["splits"]["gallery"]["shards"]:
        got += [(meta, frames) for _, meta, frames in iter_samples(storage.join(url, sh["name"]))]
    assert [m["index"] for m, _ in got] == list(range(len(eval_set["gallery"])))
    for (meta, frames), tr in zip(got, eval_set["gallery"]):
        assert list(frames) == tr["frames"] and meta["pid"] == tr["pid"] and meta["n_frames"] == len(frames)


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


def _corrupt_dataset(url, tracks, split, bad_index, trunc_shard, tracklets_per_shard, layout="block"):
    """Replace one tracklet's frame 0 by garbage and cut one shard in the middle of a sample."""
    tracks = [dict(t) for t in tracks]
    tracks[bad_index]["frames"] = [b"\xff\xd8garbage"] + tracks[bad_index]["frames"][1:]
    man = _write_dataset(url, {split: tracks}, tracklets_per_shard=tracklets_per_shard, layout=layout)
    sh = man["splits"][split]["shards"][trunc_shard]
    surl = storage.join(url, sh["name"])
    raw = storage.read_bytes(surl)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        keys = [m for m in tf.getmembers() if m.name.endswith(".json")]
        cut = keys[1].offset_data + 700  # inside the 2nd sample of the shard
    storage.write_bytes(surl, raw[:cut])
    return tracks, man


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
    raw = storage.read_bytes(storage.join(url, "query-000000.tar"))
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
    storage.write_bytes(storage.join(url, "query-000000.tar"), out.getvalue())
    per, _, skipped = _eval_frames(_eval(url, "query", num_workers=0), 4)
    assert sorted(per) == [1, 3] and skipped == 2


def test_eval_missing_shard_counted(tmp_path, eval_set):
    url = str(tmp_path)
    _write_dataset(url, {"gallery": eval_set["gallery"]}, tracklets_per_shard=5)
    storage.remove(storage.join(url, "gallery-000001.tar"))
    per, _, skipped = _eval_frames(_eval(url, "gallery", num_workers=0), 4)
    assert sorted(per) == [0, 1, 2, 3, 4] and skipped == 1


# --------------------------------------------------------------------------- training stream
TRAIN_KW = dict(clip_len=4, height=H, width=W, seed=7)


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    """12 identities in 6 uneven shards (1-3 ids each); pid 5 has a single tracklet."""
    url = str(tmp_path_factory.mktemp("train"))
    per_id = [3, 2, 4, 1, 2, 1, 3, 2, 2, 5, 2, 3]
    tracks = _make_tracklets(3, 12, per_id, frames=(2, 12))
    _write_dataset(url, {"train": tracks}, shard_ids=[[0], [1, 2, 3], [4, 5], [6, 7, 8], [9], [10, 11]])
    return url, tracks


def _run_train(url, **kw):
    kw = {**TRAIN_KW, "p": 3, "k": 2, "batches_per_epoch": 4, "epoch": 0, "num_workers": 0, **kw}
    return list(train_loader(url, **kw))


def test_train_pk_batches(train_dir):
    url, tracks = train_dir
    pid_cams = defaultdict(set)
    for t in tracks:
        pid_cams[t["pid"]].add(t["camid"])
    batches = _run_train(url, p=4, k=3, batches_per_epoch=6, num_workers=2, random_erasing=0.5)
    assert len(batches) == 6
    for b in batches:
        assert b["clips"].shape == (12, 4, 3, H, W) and b["clips"].dtype == torch.float32
        assert b["pids"].dtype == torch.long and b["camids"].dtype == torch.long
        counts = Counter(b["pids"].tolist())
        assert len(counts) == 4 and set(counts.values()) == {3}  # P distinct ids x K each
        assert all(c in pid_cams[p] for p, c in zip(b["pids"].tolist(), b["camids"].tolist()))
        assert b["skipped"] == 0 and torch.isfinite(b["clips"]).all()
    # ImageNet-normalised uniform noise: values span roughly [-2.1, 2.6]
    allc = torch.cat([b["clips"] for b in batches])
    assert -2.2 < allc.min() < -1.5 and 2.0 < allc.max() < 2.7


def test_train_clips_are_sampled_frames_in_order(train_dir):
    url, tracks = train_dir
    by_pid = defaultdict(list)
    for t in tracks:
        by_pid[t["pid"]].append([_decode(f) for f in t["frames"]])
    b = _run_train(url, hflip=False, mean=(0, 0, 0), std=(1, 1, 1), batches_per_epoch=1)[0]
    u8 = torch.round(b["clips"] * 255).to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
    for clip, pid in zip(u8, b["pids"].tolist()):
        # the clip is N frames of one tracklet of that identity, in temporal order
        matches = []
        for frames in by_pid[pid]:
            pos = [[j for j, f in enumerate(frames) if np.array_equal(f, c)] for c in clip]
            if all(pos):
                matches.append(pos)
        assert matches, "clip frames not found in any tracklet of its identity"
        pos = matches[0]
        assert all(min(pos[i]) <= max(pos[i + 1]) for i in range(len(pos) - 1))


def test_train_shard_assignment_disjoint_and_resampled():
    shards = [f"s{i}" for i in range(10)]
    kw = dict(seed=3, world_size=2, num_workers=2)
    for epoch in range(3):
        sets = [set(train_shard_assignment(shards, epoch=epoch, rank=r, worker=w, **kw))
                for r in range(2) for w in range(2)]
        assert sum(map(len, sets)) == 10 and set().union(*sets) == set(shards)  # disjoint, complete
    a = train_shard_assignment(shards, epoch=0, rank=1, worker=0, **kw)
    assert a == train_shard_assignment(shards, epoch=0, rank=1, worker=0, **kw)  # pure
    assert a != train_shard_assignment(shards, epoch=1, rank=1, worker=0, **kw)  # new epoch
    assert a != train_shard_assignment(shards, epoch=0, rank=1, worker=0, round=1, **kw)  # resample
    few = [train_shard_assignment(shards[:3], epoch=0, rank=r, worker=w, **kw)
           for r in range(2) for w in range(2)]
    assert all(len(f) >= 1 for f in few)  # fewer shards than slots: everyone still reads


def test_train_two_ranks_two_workers_read_their_own_shards(tmp_path):
    url = str(tmp_path)
    tracks = _make_tracklets(5, 16, 2, frames=(2, 5))
    man = _write_dataset(url, {"train": tracks}, ids_per_shard=2)  # 8 shards, 2 per slot
    shard_of = {pid: s["name"] for s in man["splits"]["train"]["shards"] for pid in s["identities"]}
    names = [s["name"] for s in man["splits"]["train"]["shards"]]
    seen_shards = {}
    for rank in range(2):
        # one batch per worker; P*K = 4 ids = exactly the 2 shards of the worker's round 0
        batches = _run_train(url, p=4, k=1, batches_per_epoch=2, epoch=2, rank=rank, world_size=2,
                             num_workers=2)
        for w, b in enumerate(batches):  # the DataLoader alternates workers: batch w is worker w's
            got = {shard_of[p] for p in b["pids"].tolist()}
            want = set(train_shard_assignment(names, seed=7, epoch=2, rank=rank, world_size=2,
                                              worker=w, num_workers=2))
            assert got == want
            seen_shards[(rank, w)] = got
    all_sets = list(seen_shards.values())
    assert sum(map(len, all_sets)) == 8 == len(set().union(*all_sets))


@pytest.mark.parametrize("batches,workers", [(5, 2), (3, 2), (7, 0), (1, 2)])
def test_train_epoch_length_exact(train_dir, batches, workers):
    url, _ = train_dir
    loader = train_loader(url, **TRAIN_KW, p=2, k=2, batches_per_epoch=batches, epoch=1,
                          num_workers=workers)
    assert len(loader) == batches
    assert len(list(loader)) == batches


def test_train_deterministic_from_seed(train_dir):
    url, _ = train_dir
    a = _run_train(url, num_workers=2, epoch=3, random_erasing=0.5)
    b = _run_train(url, num_workers=2, epoch=3, random_erasing=0.5)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["clips"], y["clips"]) and torch.equal(x["pids"], y["pids"])
    c = _run_train(url, num_workers=2, epoch=4, random_erasing=0.5)
    assert any(not torch.equal(x["clips"], y["clips"]) for x, y in zip(a, c))
    d = _run_train(url, num_workers=2, epoch=3, seed=8, random_erasing=0.5)
    assert any(not torch.equal(x["clips"], y["clips"]) for x, y in zip(a, d))
    # in-process equals one worker process
    e0 = _run_train(url, num_workers=0, epoch=3)
    e1 = _run_train(url, num_workers=1, epoch=3)
    for x, y in zip(e0, e1, strict=True):
        assert torch.equal(x["clips"], y["clips"]) and torch.equal(x["pids"], y["pids"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_corrupt_jpeg_and_truncated_tar_skipped_and_counted(tmp_path, layout):
    url = str(tmp_path)
    tracks = _make_tracklets(6, 8, 2, frames=(2, 6))
    for t in tracks:
        if t["pid"] == 0:  # identity 0: every frame of every tracklet is garbage
            t["frames"] = [b"\xff\xd8garbage"] * len(t["frames"])
    man = _write_dataset(url, {"train": tracks}, ids_per_shard=2, layout=layout)
    # cut shard 3 (pids 6, 7) inside pid 6's second tracklet: pid 7 is lost, pid 6 keeps one
    surl = storage.join(url, man["splits"]["train"]["shards"][3]["name"])
    raw = storage.read_bytes(surl)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        js = [m for m in tf.getmembers() if m.name.endswith(".json")]
    storage.write_bytes(surl, raw[:js[1].offset_data + 600])
    batches = _run_train(url, p=3, k=2, batches_per_epoch=12, num_workers=2)
    assert len(batches) == 12
    pids = Counter(p for b in batches for p in b["pids"].tolist())
    assert 0 not in pids and 7 not in pids and 6 in pids
    for b in batches:
        c = Counter(b["pids"].tolist())
        assert len(c) == 3 and set(c.values()) == {2}
    assert sum(b["skipped"] for b in batches) >= 2  # both kinds met; each read of them counts


@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_skips_exact_single_worker(tmp_path, layout):
    # one worker, every shard read exactly once in round 0: skipped equals the damage exactly
    url = str(tmp_path)
    tracks = _make_tracklets(9, 6, 2, frames=(2, 4))
    tracks[0]["frames"] = [b"junk"] * len(tracks[0]["frames"])  # pid 0 keeps its 2nd tracklet
    _write_dataset(url, {"train": tracks}, ids_per_shard=6, layout=layout)  # a single shard
    batches = _run_train(url, p=6, k=2, batches_per_epoch=1, num_workers=0)
    b = batches[0]
    assert Counter(b["pids"].tolist()) == {p: 2 for p in range(6)}
    assert b["skipped"] == (1 if 0 in b["pids"].tolist() else 0) == 1


def test_train_s3(s3_bucket, train_dir):
    _, tracks = train_dir
    url = f"s3://{s3_bucket}/train"
    _write_dataset(url, {"train": tracks}, ids_per_shard=3)
    batches = _run_train(url, num_workers=2, batches_per_epoch=3)
    assert len(batches) == 3
    for b in batches:
        assert b["clips"].shape == (6, 4, 3, H, W) and len(set(b["pids"].tolist())) == 3
    local = _run_train(train_dir[0], num_workers=2, batches_per_epoch=3)
    assert all(b["skipped"] == 0 for b in batches + local)


def test_train_rejects_bad_arguments(train_dir):
    url, _ = train_dir
    with pytest.raises(ValueError, match="fewer than P"):
        _run_train(url, p=13)
    with pytest.raises(ValueError):
        _run_train(url, clip_len=0)
    with pytest.raises(ValueError):
        _run_train(url, rank=2, world_size=2)


def test_train_uint8_output_matches_normalized(train_dir):
    url, _ = train_dir
    f = _run_train(url, num_workers=2, batches_per_epoch=2)
    u = _run_train(url, num_workers=2, batches_per_epoch=2, normalize=False)
    for x, y in zip(f, u, strict=True):
        assert y["clips"].dtype == torch.uint8 and y["clips"].shape == (6, 4, H, W, 3)
        assert torch.equal(normalize_clips(y["clips"], IMAGENET_MEAN, IMAGENET_STD), x["clips"])


# --------------------------------------------------------------------------- with the real packer
@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A tiny synthetic dataset packed by pipeline.pack into several shards per split."""
    pack = pytest.importorskip("pipeline.pack")
    from pipeline import synthetic
    from pipeline.datasets import load_dataset

    root = str(tmp_path_factory.mktemp("syn"))
    synthetic.generate(root, num_ids=6, tracklets_per_id=2, frames_per_tracklet=(1, 7), height=16,
                       width=8, num_test_ids=3, seed=0)
    out = str(tmp_path_factory.mktemp("shards"))
    man = pack.pack("synthetic", root, out, shard_bytes=8 << 10, progress=False)
    return out, man, load_dataset("synthetic", root)


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


def test_pack_round_trip_local(packed):
    url, man, ds = packed
    assert len(man["splits"]["gallery"]["shards"]) > 1
    for split in ("query", "gallery"):
        _check_eval_against_source(url, ds, split, num_workers=2, clips_per_batch=3)
    # byte-equal at the tar level: the raw frames are the source files
    raw = {}
    for sh in man["splits"]["train"]["shards"]:
        for _, meta, frames in iter_samples(storage.join(url, sh["name"])):
            raw[meta["index"]] = frames
    assert len(raw) == len(ds.train)
    for i, t in enumerate(ds.train):
        assert list(raw[i]) == [open(f, "rb").read() for f in t.frames]
    b = list(train_loader(url, clip_len=4, p=3, k=2, height=H, width=W, batches_per_epoch=2,
                          epoch=0, seed=0, num_workers=0))
    assert len(b) == 2 and all(sorted(Counter(x["pids"].tolist()).values()) == [2, 2, 2] for x in b)


def test_pack_round_trip_s3(packed, s3_bucket):
    url, _, ds = packed
    s3 = f"s3://{s3_bucket}/syn"
    storage.upload_dir(url, s3)
    _check_eval_against_source(s3, ds, "gallery", num_workers=2, world_size=1)


def test_iter_tar_accepts_signed_checksum_and_rejects_wrong_one():
    # old writers store the sum of *signed* header bytes; a name with bytes > 127 makes it differ
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT, encoding="latin-1") as tf:
        info = tarfile.TarInfo("\xe9" * 90)
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    raw = bytearray(buf.getvalue())
    hdr = raw[:512]
    signed = sum(b - 256 if b > 127 else b for b in hdr[:148] + hdr[156:]) + 256
    raw[148:156] = b"%06o\0 " % signed
    assert [d for _, d in iter_tar(io.BytesIO(bytes(raw)))] == [b"abc"]
    raw[148:156] = b"%06o\0 " % (signed + 1)
    with pytest.raises(TarError):
        list(iter_tar(io.BytesIO(bytes(raw))))


# --------------------------------------------------------------------------- block layout (frame_bytes)
def test_block_and_member_layouts_read_alike(tmp_path, eval_set):
    tracks = _make_tracklets(11, 6, 2, frames=(1, 9))
    urls = {}
    for layout in LAYOUTS:
        urls[layout] = str(tmp_path / layout)
        _write_dataset(urls[layout], {"train": tracks, **eval_set}, ids_per_shard=2, layout=layout)
    a, b = (_run_train(urls[lay], p=3, k=2, batches_per_epoch=5, epoch=2) for lay in LAYOUTS)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["clips"], y["clips"]) and torch.equal(x["pids"], y["pids"])
        assert x["skipped"] == y["skipped"] == 0
    for split in ("query", "gallery"):
        ea, eb = (_eval(urls[lay], split, num_workers=0, clips_per_batch=4) for lay in LAYOUTS)
        for x, y in zip(ea, eb, strict=True):
            assert torch.equal(x["clips"], y["clips"]) and torch.equal(x["index"], y["index"])


@pytest.mark.parametrize("layout,headers", [("block", "one per sample"), ("members", "one per member")])
def test_block_layout_parses_one_header_per_sample(tmp_path, eval_set, monkeypatch, layout, headers):
    from pipeline import stream
    url = str(tmp_path)
    _write_dataset(url, {"gallery": eval_set["gallery"]}, tracklets_per_shard=100, layout=layout)
    calls = []
    real = stream._TarReader.next
    monkeypatch.setattr(stream._TarReader, "next", lambda self: calls.append(1) or real(self))
    got = list(iter_samples(storage.join(url, "gallery-000000.tar")))
    assert [list(f) for _, _, f in got] == [t["frames"] for t in eval_set["gallery"]]
    n_samples = len(eval_set["gallery"])
    n_members = n_samples + sum(len(t["frames"]) for t in eval_set["gallery"])
    assert len(calls) == (n_samples if layout == "block" else n_members) + 1  # + end-of-archive


def test_block_layout_damaged_frame_header_drops_only_its_sample(tmp_path):
    url = str(tmp_path)
    rng = np.random.default_rng(12)
    tracks = [{"pid": i, "camid": 0, "frames": [_jpeg(rng) for _ in range(5)]} for i in range(4)]
    _write_dataset(url, {"gallery": tracks}, tracklets_per_shard=4)
    surl = storage.join(url, "gallery-000000.tar")
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


def test_chunks_unread_across_reads():
    from pipeline.stream import _Chunks
    data = bytes(range(100))
    c = _Chunks(io.BytesIO(data), 7)
    assert bytes(c.take(5)) == data[:5]
    got = c.take(20)  # spans several 7-byte reads
    assert bytes(got) == data[5:25] and c.offset == 25
    c.unread(got)
    assert c.offset == 5 and bytes(c.take(30)) == data[5:35]
    x = c.take(3)
    c.unread(x)  # within the current read
    assert c.offset == 35 and bytes(c.take(65)) == data[35:] and bytes(c.take(1)) == b""


# --------------------------------------------------------------------------- decode="device"
@pytest.mark.parametrize("num_workers,normalize", [(0, False), (2, True)])
def test_train_device_decode_equals_loader_decode_on_cpu(train_dir, num_workers, normalize):
    url, _ = train_dir
    kw = dict(num_workers=num_workers, normalize=normalize, random_erasing=0.5, batches_per_epoch=5)
    a = _run_train(url, **kw)
    b = _run_train(url, decode="device", device="cpu", **kw)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["clips"], y["clips"]) and torch.equal(x["pids"], y["pids"])
        assert torch.equal(x["camids"], y["camids"]) and x["skipped"] == y["skipped"] == 0
        assert set(y) == {"clips", "pids", "camids", "skipped"}
    with pytest.raises(ValueError, match="decode must be"):
        _run_train(url, decode="gpu")


def test_train_device_decode_bad_frames(tmp_path):
    url = str(tmp_path)
    tracks = _make_tracklets(13, 4, 2, frames=(3, 3))
    tracks[0]["frames"] = [b"junk"] * 3  # no JPEG header: caught in the loader, tracklet dropped
    cut = tracks[2]["frames"][1]
    tracks[2]["frames"][1] = cut[:len(cut) // 2]  # valid header, truncated data: only decode sees it
    _write_dataset(url, {"train": tracks}, ids_per_shard=4)
    batches = _run_train(url, p=4, k=2, batches_per_epoch=1, decode="device", device="cpu",
                         normalize=False, clip_len=3)
    b = batches[0]
    assert Counter(b["pids"].tolist()) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert b["skipped"] == 2  # one dropped by the loader, one clip replaced by the consumer
    pid1 = np.flatnonzero(b["pids"].numpy() == 1)
    # tracklet 2 (pid 1) was replaced by its identity's other clip in the batch
    assert torch.equal(b["clips"][pid1[0]], b["clips"][pid1[1]])


# --------------------------------------------------------------------------- batch buffer reuse
def _shm_inode(t: torch.Tensor) -> int:
    """The shared-memory file behind a batch received from a loader process, from the mapping
    that holds its data in /proc/self/maps (tmpfs numbers inodes from an increasing counter, so
    a repeated number is the same file)."""
    addr = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            span, _perms, _off, _dev, inode, *_ = line.split()
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= addr < hi:
                assert int(inode) != 0, f"batch not in a shared-memory file: {line}"
                return int(inode)
    raise AssertionError("no mapping holds the batch")


def test_batch_buffers_reused_once_released_never_while_held(train_dir):
    url, _ = train_dir
    kw = dict(batches_per_epoch=12, normalize=False, random_erasing=0.3, num_workers=1)
    inodes = []
    for b in _loader_iter(url, **kw):
        inodes.append(_shm_inode(b["clips"]))
        del b  # released: the loader process may refill its buffer
    assert len(set(inodes)) <= 5 < len(inodes)  # at most prefetch_factor + 3 buffers
    kept = _run_train(url, **kw)  # every batch held: never refilled, a buffer each
    assert len({_shm_inode(b["clips"]) for b in kept}) == 12


@pytest.mark.parametrize("num_workers", [0, 2])
def test_held_batches_and_views_survive_buffer_reuse(train_dir, eval_set, tmp_path, num_workers):
    url, _ = train_dir
    kw = dict(batches_per_epoch=12, normalize=False, num_workers=num_workers)
    ref = _run_train(url, **kw)  # all held: no reuse possible
    views, whole = [], {}
    for i, b in enumerate(_loader_iter(url, **kw)):
        views.append(b["clips"][1, 2])  # a view keeps the buffer's storage alive
        if i % 5 == 0:
            whole[i] = b
        del b
    for i, v in enumerate(views):
        assert torch.equal(v, ref[i]["clips"][1, 2]), i
    for i, b in whole.items():
        assert torch.equal(b["clips"], ref[i]["clips"])
    # eval batches: clips are views of the worker's buffer
    eurl = str(tmp_path)
    _write_dataset(eurl, eval_set, tracklets_per_shard=2)
    eref = _eval(eurl, "gallery", num_workers=num_workers, clips_per_batch=2)
    held = [b["clips"][0] for b in eval_loader(eurl, "gallery", clip_len=4, height=H, width=W, mean=(0, 0, 0),
                                                std=(1, 1, 1), num_workers=num_workers, clips_per_batch=2)]
    assert len(held) == len(eref) and all(torch.equal(h, r["clips"][0]) for h, r in zip(held, eref))


def test_ring_buffers_shipped_once_then_by_slot():
    """After a ring buffer's first batch, its batches travel as (slot, shape) without the tensor;
    the consumer hands out arrays over the buffer it mapped once, releases the buffer when the
    last of them (or of their views) dies, and batches outside the ring still bring their tensor."""
    from pipeline.stream import _BatchRing, _Normalized, _ship_by_slot

    flags = torch.zeros(4, dtype=torch.int32)
    ring = _BatchRing(flags, 2, 2, shared=False)  # this worker's slots: 2 and 3
    loader = types.SimpleNamespace(dataset=types.SimpleNamespace(flags=flags))
    consumer = _Normalized(loader, (0, 0, 0), (1, 1, 1), normalize=False, pin=False)

    def produce(i, rows=2):
        t, u8, slot = ring.get((2, 3))
        u8[:] = i
        return next(_ship_by_slot(iter([{"clips": t[:rows], "_slot": slot}]), ring))

    b0 = produce(0)
    assert b0["_slot"] == 2 and "clips" in b0 and b0["_shape"] == (2, 3)  # brings its buffer
    c0 = consumer.convert(b0).pop("clips")
    ptr = c0.data_ptr()
    assert int(flags[2]) == 1
    del c0
    assert int(flags[2]) == 0  # released: the worker may refill it
    b1 = produce(1)
    assert b1["_slot"] == 2 and "clips" not in b1 and b1["_shape"] == (2, 3)  # by slot
    c1 = consumer.convert(b1).pop("clips")
    assert c1.data_ptr() == ptr and bool((c1 == 1).all())
    b2 = produce(2, rows=1)  # slot 2 is held: a new buffer, slot 3, brought with the batch
    assert b2["_slot"] == 3 and "clips" in b2 and b2["_shape"] == (1, 3)
    c2 = consumer.convert(b2).pop("clips")
    assert c2.shape == (1, 3) and bool((c2 == 2).all())
    b3 = produce(3)  # both held: a buffer outside the ring, sent as a tensor
    assert b3["_slot"] == -1 and "_shape" not in b3 and bool((b3["clips"] == 3).all())
    view = c1[1]
    del c1
    assert int(flags[2]) == 1  # a view still refers to the buffer
    del view
    assert int(flags[2]) == 0
    c4 = consumer.convert(produce(4))["clips"]
    assert c4.data_ptr() == ptr and bool((c4 == 4).all()) and bool((c2 == 2).all())


# --------------------------------------------------------------------------- persistent loader
def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x["clips"], y["clips"]) and torch.equal(x["pids"], y["pids"])
                                    and torch.equal(x["camids"], y["camids"]) and x["skipped"] == y["skipped"]
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("num_workers", [0, 1, 2])  # 2 workers: 5 batches split 3 + 2
def test_persistent_loader_epochs_equal_fresh_loaders(tmp_path, num_workers):
    """Each iter() of a persistent loader is the next epoch, batch for batch (and skip for skip:
    one identity's frames are all garbage) what a fresh loader for that epoch gives."""
    url = str(tmp_path)
    tracks = _make_tracklets(6, 8, 2, frames=(2, 6))
    for t in tracks:
        if t["pid"] == 0:
            t["frames"] = [b"\xff\xd8garbage"] * len(t["frames"])
    _write_dataset(url, {"train": tracks}, ids_per_shard=2)
    kw = dict(p=3, k=2, batches_per_epoch=5, num_workers=num_workers, random_erasing=0.5)
    loader = train_loader(url, **{**TRAIN_KW, **kw}, epoch=2, persistent=True)
    try:
        assert len(loader) == 5
        for epoch in (2, 3, 4):
            assert _same(list(loader), _run_train(url, epoch=epoch, **kw)), epoch
        assert sum(b["skipped"] for b in _run_train(url, epoch=5, **kw)) > 0  # the garbage was met
        # an epoch cut short: the next iter() is still the next epoch, whole
        it = iter(loader)
        next(it)
        assert _same(list(loader), _run_train(url, epoch=6, **kw))
    finally:
        loader.close()


def test_persistent_loader_forks_once_and_reuses_buffers_across_epochs(train_dir):
    url, _ = train_dir
    loader = train_loader(url, **TRAIN_KW, p=3, k=2, batches_per_epoch=4, epoch=0, normalize=False,
                          num_workers=1, persistent=True)
    inodes, pids = [], set()
    try:
        for _ in range(3):
            batches = iter(loader)
            pids.update(w.pid for w in batches.dataloader_iter._workers)
            for b in batches:
                inodes.append(_shm_inode(b["clips"]))
                del b
        workers = batches.dataloader_iter._workers
        assert all(w.is_alive() for w in workers)
    finally:
        loader.close()
    assert len(pids) == 1  # one worker process for all three epochs
    assert len(inodes) == 12 and len(set(inodes)) <= 5  # its prefetch_factor + 3 buffers, kept
    assert not any(w.is_alive() for w in workers)


def _loader_iter(url, **kw):
    kw = {**TRAIN_KW, "p": 3, "k": 2, "batches_per_epoch": 4, "epoch": 0, "num_workers": 0, **kw}
    return iter(train_loader(url, **kw))
