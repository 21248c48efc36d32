"""pipeline.datasets on small trees in the real MARS / DukeMTMC-VideoReID layouts."""
from __future__ import annotations

import os
import re

import pytest

from pipeline.datasets import DatasetError, load_dataset
from tests.fixtures_data import (DUKEV_SPEC, MARS_QUERY_ROWS, MARS_TEST, MARS_TRAIN,
                                 make_dukev_tree, make_mars_tree)


def test_mars_parse(tmp_path):
    make_mars_tree(str(tmp_path))
    ds = load_dataset("mars", str(tmp_path))
    # train: junk row dropped, pids 3,5,9 relabelled 0,1,2, camid 0-based
    assert [(t.pid, t.camid, len(t.frames)) for t in ds.train] == [
        (0, 0, 3), (0, 1, 2), (1, 0, 4), (1, 2, 2), (2, 1, 3), (2, 5, 2)]
    assert ds.num_train_pids == 3
    # query follows query_IDX order with original pids
    assert [(t.pid, t.camid) for t in ds.query] == [(12, 1), (11, 0)]
    # gallery: test rows not in query, junk dropped, distractors (pid 0) kept, table order
    expect_gallery = [(p, c - 1, n) for i, (p, c, n) in enumerate(MARS_TEST, 1)
                      if i not in MARS_QUERY_ROWS and p != -1]
    assert [(t.pid, t.camid, len(t.frames)) for t in ds.gallery] == expect_gallery
    assert sum(t.pid == 0 for t in ds.gallery) == 2
    # frames: right folder, temporal order, all exist
    t = ds.train[0]
    assert [os.path.basename(f) for f in t.frames] == [f"0003C1T0001F00{i}.jpg" for i in (1, 2, 3)]
    assert all(f.startswith(os.path.join(str(tmp_path), "bbox_train", "0003")) for f in t.frames)
    assert all(os.path.exists(f) for s in ("train", "query", "gallery") for t in ds.split(s)
               for f in t.frames)
    assert ds.query[0].tracklet == "bbox_test/0012/0012C2T0001F001.jpg"
    assert ds.summary()["train"] == {"tracklets": 6, "identities": 3,
                                      "frames": sum(n for p, _, n in MARS_TRAIN if p != -1)}


@pytest.mark.parametrize("missing", ["info/query_IDX.mat", "info/train_name.txt", "bbox_test"])
def test_mars_incomplete_root(tmp_path, missing):
    make_mars_tree(str(tmp_path))
    target = tmp_path / missing
    if target.is_dir():
        import shutil
        shutil.rmtree(target)
    else:
        target.unlink()
    with pytest.raises(DatasetError, match=re.escape(os.path.basename(missing))):
        load_dataset("mars", str(tmp_path))


def test_mars_bad_table(tmp_path):
    import numpy as np
    import scipy.io

    make_mars_tree(str(tmp_path))
    scipy.io.savemat(str(tmp_path / "info" / "tracks_train_info.mat"),
                     {"track_train_info": np.array([[1, 999, 3, 1]])})
    with pytest.raises(DatasetError, match="outside"):
        load_dataset("mars", str(tmp_path))


def test_dukev_parse(tmp_path):
    make_dukev_tree(str(tmp_path))
    ds = load_dataset("dukev", str(tmp_path))
    # train pids 2,7,40 -> 0,1,2 (sorted), tracklets grouped by pid folder
    assert [(t.pid, t.camid, len(t.frames)) for t in ds.train] == [
        (0, 2, 2), (0, 4, 5), (1, 0, 4), (1, 1, 3), (2, 7, 2)]
    assert ds.num_train_pids == 3
    assert [(t.pid, t.camid) for t in ds.query] == [(100, 0), (101, 1)]
    assert [(t.pid, t.camid) for t in ds.gallery] == [(100, 2), (101, 0), (101, 3), (555, 1)]
    # frames ordered by F number (created in reverse order on disk), including 998 -> 1002
    fnum = [int(re.search(r"_F(\d+)_", os.path.basename(f)).group(1)) for f in ds.train[1].frames]
    assert fnum == [998, 999, 1000, 1001, 1002]
    assert ds.train[2].tracklet.startswith("train/0007/0001/0007_C1_F0095_")
    assert ds.skipped == []
    assert ds.summary()["gallery"]["tracklets"] == len(DUKEV_SPEC["gallery"])


def test_dukev_old_naming_and_skips(tmp_path):
    make_dukev_tree(str(tmp_path))
    tdir = tmp_path / "train" / "0040" / "0002"
    tdir.mkdir()
    (tdir / "0040C8F0002X00001.jpg").write_bytes((tmp_path / "train" / "0040" / "0001").joinpath(
        sorted(os.listdir(tmp_path / "train" / "0040" / "0001"))[0]).read_bytes())
    (tmp_path / "train" / "0040" / "0003").mkdir()          # empty tracklet
    (tmp_path / "query" / "0100" / "0001" / "Thumbs.db").write_bytes(b"x")
    ds = load_dataset("dukev", str(tmp_path))
    assert [(t.pid, t.camid, len(t.frames)) for t in ds.train][-1] == (2, 7, 1)
    assert len(ds.skipped) == 2 and any("Thumbs.db" in s for s in ds.skipped)
    assert len(ds.query[0].frames) == 3


def test_dukev_mixed_cameras_is_an_error(tmp_path):
    make_dukev_tree(str(tmp_path))
    tdir = tmp_path / "gallery" / "0100" / "0001"
    src = sorted(os.listdir(tdir))[0]
    (tdir / "0100_C7_F0050_X00001.jpg").write_bytes((tdir / src).read_bytes())
    with pytest.raises(DatasetError, match="mixes cameras"):
        load_dataset("dukev", str(tmp_path))


def test_wrong_roots(tmp_path):
    with pytest.raises(DatasetError, match="nowhere"):
        load_dataset("dukev", str(tmp_path / "nowhere"))
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match="query"):
        load_dataset("dukev", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="synthetic.json"):
        load_dataset("synthetic", str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("market", str(tmp_path))


def test_dukev_accepts_every_frame_file_ordered_by_frame_number(tmp_path):
    """The official set names some frames differently (no _X part, other suffixes): every JPEG of a
    tracklet folder is a frame, as in torchreid; F-numbered frames come in F order, others after."""
    make_dukev_tree(str(tmp_path))
    tdir = tmp_path / "train" / "0002" / "0001"
    jpeg = (tdir / sorted(os.listdir(tdir))[0]).read_bytes()
    (tdir / "0002_C3_F0000.jpg").write_bytes(jpeg)          # no _X
    (tdir / "0002_C3_F0001_X00009_b.JPG").write_bytes(jpeg)  # extra suffix, upper-case extension
    (tdir / "0002_C3_extra.jpeg").write_bytes(jpeg)          # no frame number
    before = len(os.listdir(tdir)) - 3
    ds = load_dataset("dukev", str(tmp_path))
    t = ds.train[0]
    assert (t.pid, t.camid, len(t.frames)) == (0, 2, before + 3)
    names = [os.path.basename(f) for f in t.frames]
    assert names[:2] == ["0002_C3_F0000.jpg", "0002_C3_F0001_X00009_b.JPG"]
    assert names[-1] == "0002_C3_extra.jpeg"
    assert ds.skipped == []
