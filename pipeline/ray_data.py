"""Reading our shards with Ray Data (``ray.data.read_webdataset``), for users who preprocess there.

Two things break a plain ``ray.data.read_webdataset(prefix)`` on a dataset written by
``pipeline.pack``: ``manifest.json`` beside the tars is opened as a tar, and a tracklet's frames are
one column per frame (``000.jpg``, ``001.jpg``, ...), so tracklets of different lengths give rows of
different schemas (ragged), and Ray's one-element-list flattening turns a 1-frame tracklet's frames
into a scalar. The recipe: read the split's shard list from the manifest (never the prefix), and a
decoder that turns each sample into one row of fixed columns, the frames a list column in order.

    from pipeline.ray_data import read_split
    ds = read_split("s3://bucket/shards/mars", "train")  # columns: key, pid, camid, index, n_frames, frames
    ds = ds.map(my_preprocessing)                          # frames: list of JPEG bytes, temporal order

docs/interfaces.md (Ray Data) has the recipe with its caveats.
"""
from __future__ import annotations

from pipeline import s3_client, urls
from pipeline.shards import as_manifest, make_sample

COLUMNS = ("key", "pid", "camid", "index", "n_frames", "frames")


def tracklet_row(sample: dict) -> dict:
    """Ray's ``read_webdataset`` decoder: one grouped sample (``{"__key__", "json", "000.jpg", ...}``,
    undecoded bytes) -> one row of ``COLUMNS``. ``frames`` is a tuple, so that Ray keeps a 1-frame
    tracklet's frames a list. A sample that does not validate raises (``shards.make_sample``)."""
    members = {k: v for k, v in sample.items() if not k.startswith("__")}
    meta, frames = make_sample(sample["__key__"], members)
    return {"key": sample["__key__"], "pid": meta["pid"], "camid": meta["camid"], "index": meta["index"],
            "n_frames": meta["n_frames"], "frames": tuple(bytes(f) for f in frames)}


def read_split(source, split: str, **read_args):
    """A ``ray.data.Dataset`` of one split's tracklets, one row each (``COLUMNS``).

    Args:
        source: the dataset URL (local path or s3://) or its ``shards.Manifest``.
        split: "train", "query" or "gallery".
        **read_args: passed on to ``ray.data.read_webdataset`` (``override_num_blocks``, ...).
    """
    import ray.data

    info = as_manifest(source).split(split)
    shard_urls = list(info.urls)
    fs = s3_client.arrow_filesystem(shard_urls[0]) if shard_urls and urls.is_s3(shard_urls[0]) else None
    if fs is not None:  # pyarrow's S3 paths are bucket/key
        shard_urls = [u[len("s3://"):] for u in shard_urls]
    return ray.data.read_webdataset(shard_urls, filesystem=fs, decoder=tracklet_row, **read_args)
