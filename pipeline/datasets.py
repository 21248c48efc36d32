"""Readers for video re-ID datasets at rest on a local disk (layouts in DESIGN.md §2).

``load_dataset(name, root)`` returns a :class:`Dataset` whose ``train``/``query``/``gallery``
are lists of :class:`Tracklet` (frame paths in temporal order, ``pid``, 0-based ``camid``).
Conventions (torchreid's): train pids relabelled 0..P-1 in sorted order of the original pids;
junk pid -1 dropped; MARS distractors (pid 0) kept in the gallery; query/gallery keep the
original pids. A wrong or incomplete root raises :class:`DatasetError` naming what is missing.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

DATASETS = ("mars", "dukev", "synthetic")


class DatasetError(FileNotFoundError):
    """The dataset root is missing, incomplete or malformed."""


@dataclass(frozen=True)
class Tracklet:
    frames: tuple[str, ...]  # absolute image paths, temporal order
    pid: int
    camid: int               # 0-based
    tracklet: str            # source id: first frame's path relative to the root


@dataclass
class Dataset:
    name: str
    root: str
    train: list[Tracklet]
    query: list[Tracklet]
    gallery: list[Tracklet]
    skipped: list[str] = field(default_factory=list)  # entries ignored while reading, with reasons

    @property
    def num_train_pids(self) -> int:
        return len({t.pid for t in self.train})

    def split(self, name: str) -> list[Tracklet]:
        if name not in ("train", "query", "gallery"):
            raise ValueError(f"unknown split {name!r}")
        return getattr(self, name)

    def summary(self) -> dict:
        return {s: {"tracklets": len(self.split(s)),
                    "identities": len({t.pid for t in self.split(s)}),
                    "frames": sum(len(t.frames) for t in self.split(s))}
                for s in ("train", "query", "gallery")}


def _need(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise DatasetError(f"{what} not found: {path}")
    return path


def _relabel(tracklets: list[Tracklet]) -> list[Tracklet]:
    mapping = {pid: i for i, pid in enumerate(sorted({t.pid for t in tracklets}))}
    return [Tracklet(t.frames, mapping[t.pid], t.camid, t.tracklet) for t in tracklets]


# --------------------------------------------------------------------------- MARS
def _loadmat(path: str, var: str):
    import numpy as np
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types for a damaged file
        raise DatasetError(f"cannot read {path}: {e}") from e
    if var not in mat:
        raise DatasetError(f"{path} has no variable {var!r} (has {sorted(k for k in mat if not k.startswith('__'))})")
    return np.asarray(mat[var])


def _read_names(path: str) -> list[str]:
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip()]


def _mars_tracklets(root: str, names: list[str], table, home: str, info_file: str) -> list[Tracklet]:
    if table.ndim != 2 or table.shape[1] != 4:
        raise DatasetError(f"{info_file}: expected rows [start, end, pid, camid], got shape {table.shape}")
    out = []
    for row, (start, end, pid, camid) in enumerate(table.astype(int).tolist()):
        if pid == -1:  # junk tracklet
            continue
        if not (1 <= start <= end <= len(names)):
            raise DatasetError(f"{info_file} row {row + 1}: frame range {start}..{end} outside the "
                               f"{len(names)} names of the name list")
        if not 1 <= camid <= 6:
            raise DatasetError(f"{info_file} row {row + 1}: camera {camid} outside 1..6")
        imgs = names[start - 1:end]
        if len({n[:4] for n in imgs}) != 1 or len({n[5] for n in imgs}) != 1:
            raise DatasetError(f"{info_file} row {row + 1}: tracklet mixes persons or cameras "
                               f"({imgs[0]} .. {imgs[-1]})")
        frames = tuple(os.path.join(root, home, n[:4], n) for n in imgs)
        out.append(Tracklet(frames, pid, camid - 1, f"{home}/{imgs[0][:4]}/{imgs[0]}"))
    return out


def read_mars(root: str) -> Dataset:
    """MARS: bbox_train/, bbox_test/, info/{train,test}_name.txt, tracks_*_info.mat, query_IDX.mat."""
    import numpy as np

    root = os.path.abspath(root)
    _need(root, "MARS root")
    info = _need(os.path.join(root, "info"), "MARS info folder")
    for d in ("bbox_train", "bbox_test"):
        _need(os.path.join(root, d), f"MARS {d} folder")
    files = {k: _need(os.path.join(info, f), f"MARS {f}") for k, f in (
        ("train_names", "train_name.txt"), ("test_names", "test_name.txt"),
        ("train_info", "tracks_train_info.mat"), ("test_info", "tracks_test_info.mat"),
        ("query", "query_IDX.mat"))}
    train_names = _read_names(files["train_names"])
    test_names = _read_names(files["test_names"])
    train_tab = _loadmat(files["train_info"], "track_train_info")
    test_tab = _loadmat(files["test_info"], "track_test_info")
    query_idx = _loadmat(files["query"], "query_IDX").astype(int).ravel() - 1  # 1-based rows
    if query_idx.size and (query_idx.min() < 0 or query_idx.max() >= len(test_tab)):
        raise DatasetError(f"{files['query']}: query rows outside 1..{len(test_tab)}")
    is_query = np.zeros(len(test_tab), bool)
    is_query[query_idx] = True

    train = _relabel(_mars_tracklets(root, train_names, train_tab, "bbox_train", files["train_info"]))
    # Query keeps query_IDX order; gallery = the other test rows in table order.
    query = _mars_tracklets(root, test_names, test_tab[query_idx], "bbox_test", files["test_info"])
    gallery = _mars_tracklets(root, test_names, test_tab[~is_query], "bbox_test", files["test_info"])
    return Dataset("mars", root, train, query, gallery)


# --------------------------------------------------------------------------- DukeMTMC-VideoReID
# new naming 0001_C6_F0099_X30823.jpg, old naming 0001C6F0099X30823.jpg. As torchreid does, every JPEG of a
# tracklet folder is a frame: the official set marks some frames differently (no _X part, other suffixes),
# so only the camera (C) and frame number (F) are read, where the name has them.
_DUKE_NAME = re.compile(r"^(-?\d+)_?C(\d+)(?:_?F(\d+))?", re.IGNORECASE)
_JPEG = re.compile(r"\.jpe?g$", re.IGNORECASE)


def _dukev_split(root: str, split: str, skipped: list[str]) -> list[Tracklet]:
    base = _need(os.path.join(root, split), f"DukeV {split} folder")
    out = []
    for pdir in sorted(os.listdir(base)):
        ppath = os.path.join(base, pdir)
        if not os.path.isdir(ppath):
            continue
        if not re.fullmatch(r"-?\d+", pdir):
            skipped.append(f"{ppath}: not a person id folder")
            continue
        pid = int(pdir)
        if pid == -1:
            continue
        for tdir in sorted(os.listdir(ppath)):
            tpath = os.path.join(ppath, tdir)
            if not os.path.isdir(tpath):
                continue
            frames, cams = [], set()
            for name in os.listdir(tpath):
                if not _JPEG.search(name):
                    skipped.append(f"{os.path.join(tpath, name)}: not a JPEG frame")
                    continue
                m = _DUKE_NAME.match(name)
                if m:
                    cams.add(int(m.group(2)))
                # Frames with an F number in F order, any others after them by name.
                frames.append((int(m.group(3)) if m and m.group(3) else float("inf"), name))
            if not frames:
                skipped.append(f"{tpath}: tracklet without frames")
                continue
            if not cams:
                skipped.append(f"{tpath}: no frame name carries a camera (C<n>)")
                continue
            if len(cams) != 1:
                raise DatasetError(f"{tpath}: tracklet mixes cameras {sorted(cams)}")
            cam = cams.pop()
            if cam < 1:
                raise DatasetError(f"{tpath}: camera {cam} (cameras are 1-based)")
            frames.sort()
            paths = tuple(os.path.join(tpath, n) for _, n in frames)
            out.append(Tracklet(paths, pid, cam - 1, f"{split}/{pdir}/{tdir}/{frames[0][1]}"))
    return out


def read_dukev(root: str, name: str = "dukev") -> Dataset:
    """DukeMTMC-VideoReID: {train,query,gallery}/<pid>/<tracklet>/<pid>_C<c>_F<f>_X<n>.jpg."""
    root = os.path.abspath(root)
    _need(root, f"{name} root")
    skipped: list[str] = []
    train = _relabel(_dukev_split(root, "train", skipped))
    query = _dukev_split(root, "query", skipped)
    gallery = _dukev_split(root, "gallery", skipped)
    for s in skipped:
        log.warning("dataset %s: skipped %s", name, s)
    return Dataset(name, root, train, query, gallery, skipped)


def read_synthetic(root: str) -> Dataset:
    """The generated dataset (pipeline.synthetic): the DukeV reader, but only on a complete
    generation (its ``synthetic.json`` marker is written last)."""
    marker = os.path.join(os.path.abspath(root), "synthetic.json")
    if not os.path.exists(marker):
        raise DatasetError(f"no complete synthetic generation at {root} (missing {marker}); "
                           "run pipeline.synthetic.generate(root) first")
    with open(marker) as f:
        json.load(f)  # a truncated marker is an incomplete generation too
    return read_dukev(root, name="synthetic")


def load_dataset(name: str, root: str) -> Dataset:
    """Read dataset ``name`` (``mars``, ``dukev`` or ``synthetic``) from the local ``root``."""
    readers = {"mars": read_mars, "dukev": read_dukev, "synthetic": read_synthetic}
    if name not in readers:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    return readers[name](root)
