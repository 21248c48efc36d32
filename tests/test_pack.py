"""pipeline.pack: shards on local disk and on a real S3 server (moto), read back with tarfile."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile

import pytest
from PIL import Image

from pipeline import pack as packmod
from pipeline import s3_client, storage, urls
from pipeline.datasets import load_dataset
from pipeline.pack import PackError, main, pack
from pipeline.synthetic import generate
from tests.fixtures_data import SMALL_SYNTHETIC, corrupt_file, make_dukev_tree, make_mars_tree


def read_shards(out: str, manifest: dict) -> dict:
    """split -> list of (shard name, key, meta, [frame bytes]) in tar order, via plain tarfile."""
    res = {}
    for split, info in manifest["splits"].items():
        rows = []
        for sh in info["shards"]:
            url = urls.join(out, sh["name"])
            assert storage.size(url) == sh["bytes"]
            assert hashlib.sha256(storage.read_bytes(url)).hexdigest() == sh["sha256"]
            samples = {}
            end = 0  # where the previous member's padded data ended
            with storage.open_read(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for m in tar:
                    key, ext = m.name.split(".", 1)
                    data = tar.extractfile(m).read()
                    # frame_bytes' promise: one plain 512-byte header per member, nothing between
                    assert m.offset == end and m.offset_data == m.offset + 512 and not m.pax_headers
                    end = m.offset_data + (m.size + 511) // 512 * 512
                    s = samples.setdefault(key, {"frames": {}})
                    if ext == "json":
                        assert not s["frames"], "the json comes first"
                        s["meta"] = json.loads(data)
                    else:
                        assert re.fullmatch(r"\d{3,}\.jpg", ext), m.name
                        s["frames"][int(ext.split(".")[0])] = data
            for key, s in samples.items():
                assert list(s["frames"]) == list(range(len(s["frames"])))
                rows.append((sh["name"], key, s["meta"], [s["frames"][i] for i in range(len(s["frames"]))]))
        res[split] = rows
    return res


def check_against_dataset(ds, out: str, manifest: dict, dataset: str):
    got = read_shards(out, manifest)
    assert manifest["format"] == "sta-reid-shards/1" and manifest["num_classes"] == ds.num_train_pids
    for split in ("train", "query", "gallery"):
        tracklets, rows = ds.split(split), got[split]
        info = manifest["splits"][split]
        assert info["num_tracklets"] == len(rows) == len(tracklets)
        assert info["num_frames"] == sum(len(t.frames) for t in tracklets)
        assert info["num_identities"] == len({t.pid for t in tracklets})
        assert [m["index"] for _, _, m, _ in rows] == list(range(len(rows)))
        by_src = {t.tracklet: t for t in tracklets}
        for name, key, meta, frames in rows:
            assert key == f"{split}_{meta['index']:07d}"
            t = by_src[meta["tracklet"]]
            assert meta == {"pid": t.pid, "camid": t.camid, "dataset": dataset, "split": split,
                            "n_frames": len(t.frames), "index": meta["index"], "tracklet": t.tracklet,
                            "frame_bytes": [len(fr) for fr in frames]}
            assert frames == [open(p, "rb").read() for p in t.frames]  # copied byte-for-byte
        if split != "train":  # dataset order kept
            assert [m["tracklet"] for _, _, m, _ in rows] == [t.tracklet for t in tracklets]
        for sh in info["shards"]:
            mine = [r for r in rows if r[0] == sh["name"]]
            assert sh["num_tracklets"] == len(mine)
            assert sh["num_frames"] == sum(len(r[3]) for r in mine)
            assert sh["identities"] == sorted({r[2]["pid"] for r in mine})
    return got


def test_pack_dukev_local(tmp_path):
    make_dukev_tree(str(tmp_path / "duke"))
    out = str(tmp_path / "shards")
    m = pack("dukev", str(tmp_path / "duke"), out, progress=False)
    ds = load_dataset("dukev", str(tmp_path / "duke"))
    check_against_dataset(ds, out, m, "dukev")
    assert json.loads(storage.read_bytes(urls.join(out, "manifest.json"))) == \
        {k: v for k, v in m.items() if k != "transfer"}
    assert m["skipped"]["corrupt_images"] == 0 and m["resize"] is None
    assert sorted(os.listdir(out)) == ["gallery-000000.tar", "manifest.json", "query-000000.tar",
                                       "train-000000.tar"]


def test_pack_synthetic_s3_grouping_size_and_idempotence(s3_server, s3_bucket, tmp_path):
    root = str(tmp_path / "syn")
    generate(root, **SMALL_SYNTHETIC)
    ds = load_dataset("synthetic", root)
    out = f"s3://{s3_bucket}/shards/synthetic"
    target = 40 << 10
    m = pack("synthetic", root, out, shard_bytes=target, progress=False)
    got = check_against_dataset(ds, out, m, "synthetic")
    train = m["splits"]["train"]["shards"]
    assert len(train) >= 3 and len(m["splits"]["gallery"]["shards"]) >= 2
    seen = set()
    for sh in train:  # an identity never spans two shards
        assert not seen & set(sh["identities"])
        seen |= set(sh["identities"])
    assert seen == set(range(ds.num_train_pids))
    for split in m["splits"].values():
        for sh in split["shards"]:
            assert sh["bytes"] <= target or len(sh["identities"]) == 1
    names = [s["name"] for sp in m["splits"].values() for s in sp["shards"]]
    assert sorted(m["transfer"]["uploaded"]) == sorted(names) and m["transfer"]["reused"] == []
    assert len(got["query"]) == SMALL_SYNTHETIC["num_test_ids"]

    c = s3_client.client()

    def stamps():
        return {n: c.head_object(Bucket=s3_bucket, Key=f"shards/synthetic/{n}")["LastModified"]
                for n in names}

    before = stamps()
    m2 = pack("synthetic", root, out, shard_bytes=target, progress=False)
    assert m2["transfer"]["uploaded"] == [] and sorted(m2["transfer"]["reused"]) == sorted(names)
    assert stamps() == before
    assert m2["splits"] == m["splits"]
    # a different shard size re-packs and removes shards the new manifest does not list
    m3 = pack("synthetic", root, out, shard_bytes=1 << 30, progress=False)
    assert [len(m3["splits"][s]["shards"]) for s in ("train", "query", "gallery")] == [1, 1, 1]
    assert storage.listdir(out) == ["gallery-000000.tar", "manifest.json", "query-000000.tar",
                                    "train-000000.tar"]


def test_corrupt_images_skipped_and_counted(tmp_path, caplog):
    root = str(tmp_path / "duke")
    make_dukev_tree(root)
    ds = load_dataset("dukev", root)
    bad = ds.train[1].frames[2]
    corrupt_file(bad)
    for p in ds.gallery[-1].frames:  # a whole tracklet unreadable -> dropped
        corrupt_file(p)
    out = str(tmp_path / "shards")
    with caplog.at_level("WARNING"):
        m = pack("dukev", root, out, progress=False)
    assert bad in caplog.text
    sk = m["skipped"]
    assert sk["corrupt_images"] == 1 + len(ds.gallery[-1].frames)
    assert sk["tracklets_dropped"] == 1 and bad in sk["examples"]
    assert m["splits"]["train"]["num_frames"] == sum(len(t.frames) for t in ds.train) - 1
    assert m["splits"]["gallery"]["num_tracklets"] == len(ds.gallery) - 1
    rows = read_shards(out, m)
    sample = next(r for r in rows["train"] if r[2]["tracklet"] == ds.train[1].tracklet)
    good = [p for p in ds.train[1].frames if p != bad]
    assert sample[2]["n_frames"] == len(good) and sample[3] == [open(p, "rb").read() for p in good]


def test_strict_fails_and_leaves_no_manifest(tmp_path):
    root = str(tmp_path / "duke")
    make_dukev_tree(root)
    out = str(tmp_path / "shards")
    pack("dukev", root, out, progress=False)
    assert os.path.exists(os.path.join(out, "manifest.json"))
    bad = load_dataset("dukev", root).gallery[0].frames[1]
    corrupt_file(bad)
    with pytest.raises(PackError, match=re.escape(bad)):
        pack("dukev", root, out, strict=True, progress=False)
    assert not os.path.exists(os.path.join(out, "manifest.json"))  # the stale one is gone too


def test_interrupted_pack_then_resume(s3_server, s3_bucket, tmp_path, monkeypatch):
    root = str(tmp_path / "syn")
    generate(root, **SMALL_SYNTHETIC)
    out = f"s3://{s3_bucket}/p"
    real, calls = packmod._add, {"n": 0}

    def crashing(tar, name, data):
        calls["n"] += 1
        if calls["n"] == 150:
            raise ConnectionError("node lost")
        real(tar, name, data)

    monkeypatch.setattr(packmod, "_add", crashing)
    with pytest.raises(ConnectionError):
        pack("synthetic", root, out, shard_bytes=30 << 10, progress=False)
    done = storage.listdir(out)
    assert "manifest.json" not in done and any(n.startswith("train-") for n in done)
    monkeypatch.setattr(packmod, "_add", real)
    m = pack("synthetic", root, out, shard_bytes=30 << 10, progress=False)
    assert set(m["transfer"]["reused"]) == {n for n in done if n.endswith(".tar")}
    check_against_dataset(load_dataset("synthetic", root), out, m, "synthetic")


def test_resize_reencodes(tmp_path):
    root = str(tmp_path / "duke")
    make_dukev_tree(root)
    out = "file://" + str(tmp_path / "shards")
    m = pack("dukev", root, out, resize=(20, 10), progress=False)
    assert m["resize"] == [20, 10]
    rows = read_shards(out, m)
    for split in rows.values():
        for _, _, meta, frames in split:
            for data in frames:
                im = Image.open(io.BytesIO(data))
                assert im.format == "JPEG" and im.size == (10, 20)


def test_cli_mars_and_errors(tmp_path, capsys):
    root = str(tmp_path / "mars")
    make_mars_tree(root)
    out = str(tmp_path / "shards")
    assert main(["--dataset", "mars", "--root", root, "--out", out, "--shard-size-mb", "0.01",
                 "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    ds = load_dataset("mars", root)
    assert summary["splits"]["gallery"]["num_tracklets"] == len(ds.gallery)
    m = json.loads(storage.read_bytes(urls.join(out, "manifest.json")))
    check_against_dataset(ds, out, m, "mars")
    assert sum(sh["num_tracklets"] for sh in m["splits"]["gallery"]["shards"]) == len(ds.gallery)
    assert {0} <= {r[2]["pid"] for r in read_shards(out, m)["gallery"]}  # distractors kept
    assert main(["--dataset", "dukev", "--root", str(tmp_path / "nope"), "--out", out, "--quiet"]) == 1
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--dataset", "mars", "--root", root, "--out", out, "--resize", "big"])


def test_cli_generates_synthetic(tmp_path, monkeypatch, capsys):
    import pipeline.pack as packmod

    # the CLI generates the defaults; route its call to the small config to stay fast
    real = packmod.generate
    monkeypatch.setattr(packmod, "generate", lambda root: real(root, **SMALL_SYNTHETIC))
    root, out = str(tmp_path / "syn"), str(tmp_path / "shards")
    assert main(["--dataset", "synthetic", "--root", root, "--out", out, "--quiet"]) == 0
    assert os.path.exists(os.path.join(root, "synthetic.json"))
    assert json.loads(capsys.readouterr().out)["splits"]["query"]["num_tracklets"] == \
        SMALL_SYNTHETIC["num_test_ids"]
