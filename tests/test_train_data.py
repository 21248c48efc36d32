"""pipeline.train_data: P x K batches of sampled clips, per-rank/worker shards, determinism, bad input,
decode=device, the bad-frame policy."""
from __future__ import annotations

import dataclasses
import io
import tarfile
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from pipeline import storage, urls
from pipeline.train_data import LoaderSpec, train_loader
from pipeline.sampling import train_shard_assignment
from pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD, augment_clips, mean_fill, model_input, normalize_clips
from shard_writer import (H, LAYOUTS, TRAIN_KW, W, _decode, _eval, _make_tracklets, _run_train,  # noqa: F401
                          _write_dataset, eval_set, train_dir)


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
    surl = urls.join(url, man["splits"]["train"]["shards"][3]["name"])
    raw = storage.read_bytes(surl)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        js = [m for m in tf.getmembers() if m.name.endswith(".json")]
    storage.write_bytes(surl, raw[:js[1].offset_data + 600])
    batches = _run_train(url, p=3, k=2, batches_per_epoch=12, num_workers=2, normalize=False)
    assert len(batches) == 12
    pids = Counter(p for b in batches for p in b["pids"].tolist())
    assert 7 not in pids and 6 in pids
    for b in batches:
        c = Counter(b["pids"].tolist())
        assert len(c) == 3 and set(c.values()) == {2}
    # identity 0's clips cannot decode and have no donor in the batch: the fill colour, each counted
    fill = torch.tensor([round(255 * m) for m in IMAGENET_MEAN], dtype=torch.uint8)
    zero = [(b, i) for b in batches for i in np.flatnonzero(b["pids"].numpy() == 0)]
    assert zero and all(bool((b["clips"][i] == fill).all()) for b, i in zero)
    assert sum(b["skipped"] for b in batches) > len(zero)  # + the truncated shard, at each of its reads


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
        assert set(y) == {"clips", "flips", "erase", "pids", "camids", "skipped"} and "flips" not in x
        # uint8 batches leave flips and erasing to the device: the same draws, applied later
        assert torch.equal(normalize_clips(_augmented(y), IMAGENET_MEAN, IMAGENET_STD), x["clips"])
        assert torch.equal(model_input(y["clips"].clone(), torch.device("cpu"), torch.float32, flips=y["flips"],
                                       erase=y["erase"]), x["clips"])


def _augmented(b: dict) -> torch.Tensor:
    """A batch's clips with its pending flips and erasing applied (uint8 batches of decode=loader)."""
    if "flips" not in b:
        return b["clips"]
    return augment_clips(b["clips"].clone(), b["flips"], b["erase"], mean_fill(IMAGENET_MEAN))


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


@pytest.mark.parametrize("num_workers,normalize", [(0, False), (2, True)])
def test_train_device_decode_equals_loader_decode_on_cpu(train_dir, num_workers, normalize):
    url, _ = train_dir
    kw = dict(num_workers=num_workers, normalize=normalize, random_erasing=0.5, batches_per_epoch=5)
    a = _run_train(url, **kw)
    b = _run_train(url, decode="device", device="cpu", **kw)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(_augmented(x), y["clips"]) and torch.equal(x["pids"], y["pids"])
        assert torch.equal(x["camids"], y["camids"]) and x["skipped"] == y["skipped"] == 0
        assert set(y) == {"clips", "pids", "camids", "skipped"}
        assert ("flips" in x) == (not normalize)  # float32 batches come augmented
    with pytest.raises(ValueError, match="decode must be"):
        _run_train(url, decode="gpu")


def test_train_device_decode_bad_frames(tmp_path):
    url = str(tmp_path)
    tracks = _make_tracklets(13, 4, 2, frames=(3, 3))
    tracks[0]["frames"] = [b"junk"] * 3  # no JPEG header
    cut = tracks[2]["frames"][1]
    tracks[2]["frames"][1] = cut[:len(cut) // 2]  # valid header, truncated data: only decode sees it
    _write_dataset(url, {"train": tracks}, ids_per_shard=4)
    kw = dict(p=4, k=2, batches_per_epoch=1, normalize=False, clip_len=3)
    # one policy for both decode paths: each bad clip counted once and replaced by its identity's
    # other clip in the batch, so the two paths give the same batch
    for b in (_run_train(url, decode="device", device="cpu", **kw)[0], _run_train(url, **kw)[0]):
        assert Counter(b["pids"].tolist()) == {0: 2, 1: 2, 2: 2, 3: 2}
        assert b["skipped"] == 2
        clips = _augmented(b)
        for pid in (0, 1):  # tracklets 0 (pid 0) and 2 (pid 1) replaced by their identity's other clip
            j = np.flatnonzero(b["pids"].numpy() == pid)
            assert torch.equal(clips[j[0]], clips[j[1]])
    kw["random_erasing"] = 1.0  # a replaced clip takes its donor's draws too
    a, d = _run_train(url, **kw)[0], _run_train(url, decode="device", device="cpu", **kw)[0]
    assert a["erase"][:, 2].all() and a["flips"].any()
    assert torch.equal(_augmented(a), d["clips"]) and a["skipped"] == d["skipped"]


def test_spec_from_config_per_rank_p():
    """data.p is the global identities per batch: each rank's spec draws p // world_size."""
    from pipeline.config import load_config

    cfg = load_config(None, ["data.p=8", "data.k=2", "data.decode=device", "data.cache_dir=/c"])
    spec = LoaderSpec.from_config(cfg, rank=1, world_size=2, batches_per_epoch=5)
    assert (spec.p, spec.k, spec.rank, spec.world_size, spec.batches_per_epoch) == (4, 2, 1, 2, 5)
    assert spec.decode == "device" and spec.cache_dir == "/c" and not spec.normalize
    assert spec.persistent == cfg.data.persistent_workers and spec.seed == cfg.seed
    with pytest.raises(ValueError, match="not divisible"):
        LoaderSpec.from_config(cfg, rank=0, world_size=3, batches_per_epoch=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.p = 3
