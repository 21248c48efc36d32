"""pipeline.ray_data: the Ray Data recipe reads every tracklet of pack's output (ragged frame counts,
1-frame tracklets, manifest.json beside the tars), frames byte-equal and in order; a plain read of the
prefix is what fails."""
from __future__ import annotations

import pytest

from pipeline import storage, urls
from pipeline.shards import read_manifest
from tests.fixtures_data import packed_synthetic


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    for attempt in range(3):  # a local Ray's start can time out on a machine shared by many (GCS RPCs)
        try:
            ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
            break
        except Exception:  # noqa: BLE001 - "The current node timed out during startup"
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """``(shard dir, Dataset)``: ragged tracklets down to one frame in the train and query splits."""
    url, _, ds = packed_synthetic(tmp_path_factory, num_ids=4, tracklets_per_id=2, frames_per_tracklet=(1, 5),
                                  num_test_ids=2, seed=5, shard_bytes=4 << 10)
    return url, ds


def test_read_split_every_tracklet_and_frame(ray_local, packed):
    from pipeline.ray_data import COLUMNS, read_split

    url, ds = packed
    man = read_manifest(url)
    for split in ("train", "query"):
        tracks = ds.split(split)
        assert len({len(t.frames) for t in tracks}) > 1 and min(len(t.frames) for t in tracks) == 1  # ragged
        rows = sorted(read_split(man, split).take_all(), key=lambda r: r["index"])
        assert [r["index"] for r in rows] == list(range(len(tracks)))
        for r, t in zip(rows, tracks):
            assert set(r) == set(COLUMNS)
            assert (r["pid"], r["camid"], r["n_frames"]) == (t.pid, t.camid, len(t.frames))
            assert [bytes(f) for f in r["frames"]] == [open(f, "rb").read() for f in t.frames]


def test_plain_read_of_the_prefix_fails(ray_local, packed):
    """Why the recipe exists: the default read of the prefix trips over manifest.json or the
    ragged frame columns."""
    import ray.data

    url, _ = packed
    assert storage.exists(urls.join(url, "manifest.json"))
    with pytest.raises(Exception):
        ray.data.read_webdataset(url, decoder=False).take_all()


def test_recipe_rows_without_a_cluster(packed):
    """What Ray's read task does with each shard (its tar iterator and key grouping, our decoder, its
    one-element-list flattening, a pandas block per shard, Arrow concatenation), in this process and
    without starting Ray: every tracklet, one schema for all blocks, a 1-frame tracklet's frames a list."""
    import pandas as pd
    import pyarrow as pa
    from ray.data._internal.datasource import webdataset_datasource as wdsrc

    from pipeline.ray_data import tracklet_row

    url, ds = packed
    tables = []
    for u in read_manifest(url).split("train").urls:
        with open(u, "rb") as f:
            samples = wdsrc._group_by_keys(wdsrc._tar_file_iterator(f), meta=dict(__url__=u))
            rows = [{k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in tracklet_row(x).items()}
                    for x in samples]
        tables.append(pa.Table.from_pandas(pd.DataFrame.from_records(rows), preserve_index=False))
    table = pa.concat_tables(tables)  # raises on ragged schemas
    rows = sorted(table.to_pylist(), key=lambda r: r["index"])
    tracks = ds.split("train")
    assert [r["index"] for r in rows] == list(range(len(tracks)))
    for r, t in zip(rows, tracks):
        assert (r["pid"], r["camid"]) == (t.pid, t.camid)
        assert r["frames"] == [open(f, "rb").read() for f in t.frames]
    assert min(len(r["frames"]) for r in rows) == 1
