"""pipeline.loader: batch buffers reused only once released (held batches and views survive), shipped
once then by buffer id; persistent loaders fork once; close() stops the worker processes."""
from __future__ import annotations

import types

import pytest
import torch

from pipeline.eval_data import eval_loader
from pipeline.loader import BatchRing, Normalized, _ship_by_buffer
from pipeline.train_data import train_loader
from shard_writer import (H, TRAIN_KW, W, _eval, _make_tracklets, _run_train, _same, _write_dataset,  # noqa: F401
                          eval_set, train_dir)


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


def test_ring_buffers_shipped_once_then_by_buffer():
    """After a ring buffer's first batch, its batches travel by buffer id (and shape) without the tensor;
    the consumer hands out arrays over the buffer it mapped once, releases the buffer when the
    last of them (or of their views) dies, and batches outside the ring still bring their tensor."""
    flags = torch.zeros(4, dtype=torch.int32)
    ring = BatchRing(flags, 2, 2, shared=False)  # this worker's buffer ids: 2 and 3
    loader = types.SimpleNamespace(dataset=types.SimpleNamespace(flags=flags))
    consumer = Normalized(loader, (0, 0, 0), (1, 1, 1), normalize=False, pin=False)

    def produce(i, rows=2):
        t, u8, buffer_id = ring.get((2, 3))
        u8[:] = i
        return next(_ship_by_buffer(iter([{"clips": t[:rows], "_buffer": buffer_id}]), ring))

    b0 = produce(0)
    assert b0["_buffer"] == 2 and "clips" in b0 and b0["_shape"] == (2, 3)  # brings its buffer
    c0 = consumer.convert(b0).pop("clips")
    ptr = c0.data_ptr()
    assert int(flags[2]) == 1
    del c0
    assert int(flags[2]) == 0  # released: the worker may refill it
    b1 = produce(1)
    assert b1["_buffer"] == 2 and "clips" not in b1 and b1["_shape"] == (2, 3)  # by buffer id
    c1 = consumer.convert(b1).pop("clips")
    assert c1.data_ptr() == ptr and bool((c1 == 1).all())
    b2 = produce(2, rows=1)  # buffer 2 is held: a new buffer, id 3, brought with the batch
    assert b2["_buffer"] == 3 and "clips" in b2 and b2["_shape"] == (1, 3)
    c2 = consumer.convert(b2).pop("clips")
    assert c2.shape == (1, 3) and bool((c2 == 2).all())
    b3 = produce(3)  # both held: a buffer outside the ring, sent as a tensor
    assert b3["_buffer"] == -1 and "_shape" not in b3 and bool((b3["clips"] == 3).all())
    view = c1[1]
    del c1
    assert int(flags[2]) == 1  # a view still refers to the buffer
    del view
    assert int(flags[2]) == 0
    c4 = consumer.convert(produce(4))["clips"]
    assert c4.data_ptr() == ptr and bool((c4 == 4).all()) and bool((c2 == 2).all())


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
