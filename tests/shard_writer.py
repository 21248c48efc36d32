"""Shared helpers of the data-path tests: a small shard writer that follows the shard contract of
docs/interfaces.md exactly (tracklet = `<split>_<7-digit index>` with `.json` + `.NNN.jpg` members,
identities never split across train shards, split order kept, manifest written last), independent
of pipeline.pack, and the loaders called the way the tests call them."""
from __future__ import annotations

import io
import json
import tarfile
import time
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import storage, urls
from pipeline.eval_data import eval_loader
from pipeline.train_data import train_loader

H, W = 16, 8


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
            storage.write_bytes(urls.join(url, name), data)
            shards.append({"name": name, "bytes": len(data), "sha256": "",
                           "identities": sorted({t["pid"] for _, t in chunk}),
                           "num_tracklets": len(chunk),
                           "num_frames": sum(len(t["frames"]) for _, t in chunk)})
        man["splits"][split] = {"num_tracklets": len(tracks),
                                "num_identities": len({t["pid"] for t in tracks}),
                                "num_frames": sum(len(t["frames"]) for t in tracks), "shards": shards}
    storage.write_bytes(urls.join(url, "manifest.json"), json.dumps(man).encode())
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


def _corrupt_dataset(url, tracks, split, bad_index, trunc_shard, tracklets_per_shard, layout="block"):
    """Replace one tracklet's frame 0 by garbage and cut one shard in the middle of a sample."""
    tracks = [dict(t) for t in tracks]
    tracks[bad_index]["frames"] = [b"\xff\xd8garbage"] + tracks[bad_index]["frames"][1:]
    man = _write_dataset(url, {split: tracks}, tracklets_per_shard=tracklets_per_shard, layout=layout)
    sh = man["splits"][split]["shards"][trunc_shard]
    surl = urls.join(url, sh["name"])
    raw = storage.read_bytes(surl)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        keys = [m for m in tf.getmembers() if m.name.endswith(".json")]
        cut = keys[1].offset_data + 700  # inside the 2nd sample of the shard
    storage.write_bytes(surl, raw[:cut])
    return tracks, man


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x["clips"], y["clips"]) and torch.equal(x["pids"], y["pids"])
                                    and torch.equal(x["camids"], y["camids"]) and x["skipped"] == y["skipped"]
                                    for x, y in zip(a, b))
