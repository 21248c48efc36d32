"""Builders of small dataset trees in the real on-disk layouts (DESIGN.md §2), with real tiny
JPEGs and real .mat files; importable by any test (``from tests.fixtures_data import ...``)."""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

# Small generator settings for tests: a second or so on one core.
SMALL_SYNTHETIC = dict(num_ids=6, tracklets_per_id=3, frames_per_tracklet=(3, 5), height=32,
                       width=16, num_cameras=3, num_test_ids=4, seed=0)


def packed_synthetic(tmp_path_factory, *, shard_bytes: int = 8 << 10, **generate_kw) -> tuple[str, dict, object]:
    """A small synthetic dataset generated and packed by ``pipeline.pack`` into several shards per split.

    Args:
        tmp_path_factory: pytest's, for the raw tree and the shard directory.
        shard_bytes (int): the packer's target shard size (small: several shards per split).
        **generate_kw: ``pipeline.synthetic.generate`` arguments (16x8 images unless given).

    Returns:
        ``(shard directory, pack's manifest, the raw tree's Dataset)``.
    """
    from pipeline import pack, synthetic
    from pipeline.datasets import load_dataset

    root = str(tmp_path_factory.mktemp("syn"))
    synthetic.generate(root, **{"height": 16, "width": 8, **generate_kw})
    out = str(tmp_path_factory.mktemp("shards"))
    man = pack.pack("synthetic", root, out, shard_bytes=shard_bytes, progress=False)
    return out, man, load_dataset("synthetic", root)


def tiny_jpeg(seed: int, height: int = 32, width: int = 16) -> bytes:
    """A distinct small JPEG per seed (so byte-equality checks mean something)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_jpeg(path: str, seed: int, height: int = 32, width: int = 16) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(tiny_jpeg(seed, height, width))


def corrupt_file(path: str) -> None:
    """Make an image undecodable (a truncated JPEG header) in place."""
    with open(path, "rb") as f:
        head = f.read(20)
    with open(path, "wb") as f:
        f.write(head)


# --------------------------------------------------------------------------- MARS
# (pid, camera 1..6, n_frames); pid -1 = junk, pid 0 = distractor
MARS_TRAIN = [(3, 1, 3), (3, 2, 2), (-1, 1, 2), (5, 1, 4), (5, 3, 2), (9, 2, 3), (9, 6, 2)]
MARS_TEST = [(11, 1, 3), (11, 2, 2), (11, 3, 2), (0, 4, 2), (12, 2, 3), (-1, 5, 2),
             (12, 4, 2), (12, 5, 3), (0, 1, 2)]
MARS_QUERY_ROWS = [5, 1]  # 1-based rows of MARS_TEST: pid 12 cam 2 first, then pid 11 cam 1


def _mars_split(root: str, home: str, specs, seed0: int):
    names, rows, counter = [], [], {}
    for pid, cam, n in specs:
        counter[(pid, cam)] = counter.get((pid, cam), 0) + 1
        pstr = "00-1" if pid == -1 else f"{pid:04d}"
        start = len(names) + 1
        for f in range(n):
            name = f"{pstr}C{cam}T{counter[(pid, cam)]:04d}F{f + 1:03d}.jpg"
            write_jpeg(os.path.join(root, home, pstr, name), seed0 + len(names))
            names.append(name)
        rows.append([start, len(names), pid, cam])
    return names, np.array(rows, dtype=np.int32)


def make_mars_tree(root: str, train=MARS_TRAIN, test=MARS_TEST, query_rows=MARS_QUERY_ROWS) -> dict:
    """Write a MARS-layout tree; returns the specs used."""
    import scipy.io

    info = os.path.join(root, "info")
    os.makedirs(info, exist_ok=True)
    tr_names, tr_rows = _mars_split(root, "bbox_train", train, 0)
    te_names, te_rows = _mars_split(root, "bbox_test", test, 10_000)
    for fname, names in (("train_name.txt", tr_names), ("test_name.txt", te_names)):
        with open(os.path.join(info, fname), "w") as f:
            f.write("\n".join(names) + "\n")
    scipy.io.savemat(os.path.join(info, "tracks_train_info.mat"), {"track_train_info": tr_rows})
    scipy.io.savemat(os.path.join(info, "tracks_test_info.mat"), {"track_test_info": te_rows})
    scipy.io.savemat(os.path.join(info, "query_IDX.mat"),
                     {"query_IDX": np.array(query_rows, dtype=np.int32)[None, :]})
    return {"train": train, "test": test, "query_rows": query_rows}


# --------------------------------------------------------------------------- DukeMTMC-VideoReID
# split -> list of (pid, camera 1..8, first frame number, n_frames)
DUKEV_SPEC = {
    "train": [(7, 1, 95, 4), (7, 2, 1, 3), (2, 3, 10, 2), (2, 5, 998, 5), (40, 8, 1, 2)],
    "query": [(100, 1, 5, 3), (101, 2, 1, 2)],
    "gallery": [(100, 3, 1, 4), (101, 1, 7, 2), (101, 4, 1, 3), (555, 2, 1, 2)],
}


def make_dukev_tree(root: str, spec=DUKEV_SPEC) -> dict:
    """Write a DukeMTMC-VideoReID-layout tree (``<pid>_C<cam>_F<frame>_X<n>.jpg``); frame files
    are created in reverse order so directory order never stands in for temporal order."""
    seed = 20_000
    for split, tracklets in spec.items():
        counter = {}
        for pid, cam, first, n in tracklets:
            counter[pid] = counter.get(pid, 0) + 1
            tdir = os.path.join(root, split, f"{pid:04d}", f"{counter[pid]:04d}")
            for f in reversed(range(first, first + n)):
                write_jpeg(os.path.join(tdir, f"{pid:04d}_C{cam}_F{f:04d}_X{seed % 99999:05d}.jpg"), seed)
                seed += 1
    return spec
