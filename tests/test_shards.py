"""pipeline.shards: the format in one place (constants shared with pack, key and member naming,
frame_bytes layout, sample validation), the Manifest read once; stock webdataset reads pack's output."""
from __future__ import annotations

import dataclasses
import json
import pickle
import tarfile

import pytest

from pipeline import pack, shards, storage, urls
from pipeline.shards import Manifest, frame_layout, make_sample, member_bytes, read_manifest
from pipeline.train_data import train_loader
from shard_writer import H, W, _write_dataset, eval_set  # noqa: F401


def test_pack_uses_the_one_format_definition():
    assert pack.FORMAT is shards.FORMAT and pack.SPLITS is shards.SPLITS and pack.MANIFEST is shards.MANIFEST
    assert pack.shard_name is shards.shard_name and shards.shard_name("train", 3) == "train-000003.tar"
    assert shards.sample_key("query", 12) == "query_0000012"
    assert shards.frame_name("query_0000012", 7) == "query_0000012.007.jpg"
    assert shards.SHARD_RE.match("gallery-000001.tar") and not shards.SHARD_RE.match("manifest.json")


def test_member_bytes_and_frame_layout_match_tarfile(tmp_path):
    sizes = [0, 1, 511, 512, 513, 3000]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i, n in enumerate(sizes):
            ti = tarfile.TarInfo(f"k.{i:03d}.jpg")
            ti.size = n
            tf.addfile(ti, __import__("io").BytesIO(bytes(n)))
    with tarfile.open(path) as tf:
        offsets = [m.offset for m in tf.getmembers()]
    assert [b - a for a, b in zip(offsets, offsets[1:])] == [member_bytes(n) for n in sizes[:-1]]
    got = frame_layout({"n_frames": len(sizes), "frame_bytes": sizes})
    assert got == (sizes, offsets, offsets[-1] + member_bytes(sizes[-1]))
    for bad in ({"n_frames": 2, "frame_bytes": [1]}, {"n_frames": 1, "frame_bytes": [True]},
                {"n_frames": 1, "frame_bytes": [1.0]}, {"n_frames": 1, "frame_bytes": [-1]}, {"n_frames": 1}, []):
        assert frame_layout(bad) is None


def test_make_sample_validates():
    meta = {"pid": 1, "camid": 0, "n_frames": 2, "index": 5}
    ok = {"json": json.dumps(meta).encode(), "001.jpg": b"b", "000.jpg": b"a"}
    assert make_sample("k", ok) == (meta, [b"a", b"b"])
    assert make_sample("k", {**ok, "json": meta})[1] == [b"a", b"b"]  # json already parsed
    for members, why in (({"000.jpg": b"a"}, "no k.json"), ({**ok, "json": b"{x"}, "bad json"),
                         ({**ok, "json": b"[]"}, "not an object"),
                         ({**ok, "json": json.dumps({**meta, "pid": "1"}).encode()}, "'pid'"),
                         ({"json": ok["json"], "000.jpg": b"a"}, "1 frames"),
                         ({"json": ok["json"], "000.jpg": b"a", "002.jpg": b"c"}, "n_frames=2")):
        with pytest.raises(ValueError, match=why):
            make_sample("k", members)


def test_read_manifest_missing_and_bad(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not a dataset \(no manifest.json\)"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a sta-reid-shards/1 manifest"):
        read_manifest(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a dataset"):
        train_loader(str(tmp_path / "nothing"), clip_len=2, p=1, k=1, height=H, width=W,
                     batches_per_epoch=1, epoch=0, seed=0)


def test_manifest_read_once_passed_down(tmp_path, eval_set, monkeypatch):
    url = str(tmp_path)
    _write_dataset(url, eval_set)
    man = read_manifest(url)
    assert isinstance(man, Manifest) and pickle.loads(pickle.dumps(man)).raw == man.raw
    with pytest.raises(dataclasses.FrozenInstanceError):
        man.url = "x"
    g = man.split("gallery")
    assert g.urls == tuple(urls.join(url, f"gallery-{i:06d}.tar") for i in range(4))
    assert g.tracklets() == dict(zip(g.urls, (3, 3, 3, 1)))
    reads = []
    monkeypatch.setattr(storage, "read_bytes", lambda u: reads.append(u))  # no further reads
    from pipeline.eval_data import eval_loader
    assert sum(len(b["index"]) for b in eval_loader(man, "gallery", clip_len=4, height=H, width=W,
                                                    num_workers=0)) > 0
    assert reads == []


def test_split_counts(tmp_path, eval_set):
    _write_dataset(str(tmp_path), eval_set)
    man = read_manifest(str(tmp_path))
    g = man.split("gallery")
    assert (g.num_tracklets, g.num_identities, len(g.urls)) == (10, 5, 4)
    assert g.num_frames == sum(len(t["frames"]) for t in eval_set["gallery"])
    with pytest.raises(ValueError, match="no 'train' split"):
        man.split("train")
    with pytest.raises(ValueError, match="unknown split"):
        man.split("val")


def test_stock_webdataset_reads_pack_output(packed_small):
    """Every tracklet, every frame (byte-equal to its source file), pid and camid, through the stock
    library alone: wds.WebDataset over the shard list."""
    import webdataset as wds

    url, man, ds = packed_small
    for split in ("train", "query", "gallery"):
        names = [urls.join(url, s["name"]) for s in man["splits"][split]["shards"]]
        assert len(names) > 1
        got = list(wds.WebDataset(names, shardshuffle=False).decode())
        tracks = ds.split(split)
        assert len(got) == len(tracks) == man["splits"][split]["num_tracklets"]
        for i, (s, t) in enumerate(zip(got, tracks)):
            meta = s["json"]
            assert s["__key__"] == shards.sample_key(split, i) and meta["index"] == i
            assert (meta["pid"], meta["camid"], meta["n_frames"]) == (t.pid, t.camid, len(t.frames))
            frames = sorted(k for k in s if k.endswith(".jpg"))
            assert frames == [f"{j:03d}.jpg" for j in range(len(t.frames))]
        raw = list(wds.WebDataset(names, shardshuffle=False))  # undecoded: the source bytes
        for s, t in zip(raw, tracks):
            assert [s[f"{j:03d}.jpg"] for j in range(len(t.frames))] == [open(f, "rb").read() for f in t.frames]
