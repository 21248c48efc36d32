"""Cross-epoch prefetch of the training stream (pipeline.prefetch.epoch_batches) on real shards
packed by pipeline.pack from pipeline.synthetic, with real DataLoader worker processes."""
import contextlib
import weakref

import pytest
import torch

from pipeline.prefetch import epoch_batches, start_batches, stop_batches

P, K, N, H, W, STEPS = 2, 2, 2, 16, 8, 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pipeline import pack, synthetic

    root = str(tmp_path_factory.mktemp("syn"))
    synthetic.generate(root, num_ids=6, tracklets_per_id=2, frames_per_tracklet=(2, 5), height=H,
                       width=W, num_test_ids=2, seed=0)
    out = str(tmp_path_factory.mktemp("shards"))
    pack.pack("synthetic", root, out, shard_bytes=8 << 10, progress=False)
    return out


def _loader(url, epoch, num_workers=1, persistent=False):
    """As train_loop_per_worker builds it (uint8 pass-through), one worker process."""
    from pipeline.train_data import train_loader

    return train_loader(url, clip_len=N, p=P, k=K, height=H, width=W, batches_per_epoch=STEPS,
                        epoch=epoch, seed=3, num_workers=num_workers, normalize=False,
                        persistent=persistent)


def _alive(started) -> bool:
    """The started DataLoader iterator's worker processes all run. Tests hold it by weak reference:
    the loaders stop workers by letting go of the iterator, whose finalizer stops them."""
    if isinstance(started, weakref.ref):
        started = started()
    workers = getattr(started, "_workers", [])
    return bool(workers) and all(w.is_alive() for w in workers)


def test_start_batches_forks_workers_before_first_next(shards):
    """start_batches forks the loader processes at once (not at the first next()) and changes no batch."""
    it, started = start_batches(_loader(shards, 0))
    try:
        assert _alive(started), "no DataLoader worker process running after start_batches"
        got, want = list(it), list(_loader(shards, 0))
        assert len(got) == STEPS and started._num_yielded == STEPS  # the started iterator delivered them
        for a, b in zip(got, want):
            assert torch.equal(a["clips"], b["clips"]) and torch.equal(a["pids"], b["pids"])
    finally:
        stop_batches(it)
    assert not _alive(started)


@pytest.mark.parametrize("start_epoch", [0, 1])  # 1: resumed from a checkpoint after epoch 0
def test_same_batches_and_next_epoch_started_during_last_step(shards, start_epoch):
    end = 3
    expected = {e: list(_loader(shards, e)) for e in range(start_epoch, end)}
    started: dict[int, object] = {}
    events = []

    def on_start(epoch, it):
        started[epoch] = weakref.ref(it)
        events.append(("start", epoch))

    got = {}
    with contextlib.closing(epoch_batches(lambda e: _loader(shards, e), start_epoch, end,
                                          on_start=on_start)) as epochs:
        for epoch, batches in epochs:
            got[epoch] = []
            for i, batch in enumerate(batches):
                events.append(("batch", epoch, i))
                got[epoch].append(batch)
                if i == STEPS - 1 and epoch + 1 < end:
                    # the last step of this epoch runs while the next epoch's workers already read
                    assert epoch + 1 in started and _alive(started[epoch + 1])
    assert sorted(started) == list(range(start_epoch, end))  # nothing started past the last epoch
    for e in range(start_epoch + 1, end):
        assert events.index(("start", e)) == events.index(("batch", e - 1, STEPS - 1)) - 1
    assert sorted(got) == sorted(expected)
    for e, want in expected.items():
        assert len(got[e]) == STEPS
        for a, b in zip(got[e], want):
            assert a["clips"].dtype == torch.uint8
            assert torch.equal(a["clips"], b["clips"]) and torch.equal(a["pids"], b["pids"])
    assert not any(_alive(it) for it in started.values())


def test_exception_between_epochs_stops_the_loader_started_ahead(shards):
    started = {}
    epochs = epoch_batches(lambda e: _loader(shards, e), 0, 5,
                           on_start=lambda e, it: started.setdefault(e, weakref.ref(it)))
    with pytest.raises(RuntimeError, match="eval failed"), contextlib.closing(epochs):
        for _epoch, batches in epochs:
            for _ in batches:
                pass
            assert _alive(started[1])
            raise RuntimeError("eval failed")  # e.g. evaluation or checkpointing after epoch 0
    assert sorted(started) == [0, 1] and not _alive(started[1])


def test_exception_mid_epoch_stops_the_current_loader(shards):
    started = {}
    epochs = epoch_batches(lambda e: _loader(shards, e, num_workers=2), 0, 5,
                           on_start=lambda e, it: started.setdefault(e, weakref.ref(it)))
    with pytest.raises(RuntimeError, match="step failed"), contextlib.closing(epochs):
        for _epoch, batches in epochs:
            next(batches)
            raise RuntimeError("step failed")
    assert sorted(started) == [0] and not _alive(started[0])


def test_loader_without_length_starts_next_at_its_end():
    events = []

    def make(epoch):
        events.append(("start", epoch))
        return (epoch * 10 + i for i in range(2))  # a generator: no len()

    out = []
    for epoch, batches in epoch_batches(make, 0, 3):
        for b in batches:
            events.append(("batch", b))
            out.append(b)
    assert out == [0, 1, 10, 11, 20, 21]
    assert events[:5] == [("start", 0), ("batch", 0), ("batch", 1), ("start", 1), ("batch", 10)]


def test_failed_start_ahead_is_retried_at_the_epoch():
    calls = []

    class Loader(list):
        pass

    def make(epoch):
        calls.append(epoch)
        if epoch == 1 and calls.count(1) == 1:
            raise OSError("manifest read timed out")
        return Loader([epoch])

    assert [(e, list(b)) for e, b in epoch_batches(make, 0, 2)] == [(0, [0]), (1, [1])]
    assert calls == [0, 1, 1]


@pytest.mark.parametrize("num_workers", [1, 2])  # 2: STEPS=3 batches split 2 + 1
def test_persistent_loader_made_once_same_batches_next_epoch_started_during_last_step(shards, num_workers):
    """A persistent loader serves every epoch with the workers forked once; each epoch's batches
    equal a fresh loader's, and the workers are set on the next epoch before the last step."""
    start_epoch, end = 1, 4
    expected = {e: list(_loader(shards, e, num_workers)) for e in range(start_epoch, end)}
    made, started, events, got = [], [], [], {}

    def make(epoch):
        made.append(epoch)
        return _loader(shards, epoch, num_workers, persistent=True)

    def on_start(epoch, it):
        started.append(weakref.ref(it))
        events.append(("start", epoch))

    with contextlib.closing(epoch_batches(make, start_epoch, end, on_start=on_start)) as epochs:
        for epoch, batches in epochs:
            got[epoch] = []
            for i, batch in enumerate(batches):
                events.append(("batch", epoch, i))
                got[epoch].append(batch)
            assert _alive(started[0])
            pids = [w.pid for w in started[0]()._workers]
    assert made == [start_epoch]  # one loader, one fork
    assert all(r() is started[0]() for r in started) and len(started) == end - start_epoch
    assert len(pids) == num_workers
    for e in range(start_epoch + 1, end):
        assert events.index(("start", e)) == events.index(("batch", e - 1, STEPS - 1)) - 1
    for e, want in expected.items():
        assert len(got[e]) == STEPS
        for a, b in zip(got[e], want):
            assert torch.equal(a["clips"], b["clips"]) and torch.equal(a["pids"], b["pids"])
    assert not _alive(started[0])  # closing the generator stopped the workers


def test_exception_mid_epoch_stops_a_persistent_loader(shards):
    started = []
    epochs = epoch_batches(lambda e: _loader(shards, e, persistent=True), 0, 5,
                           on_start=lambda e, it: started.append(weakref.ref(it)))
    with pytest.raises(RuntimeError, match="step failed"), contextlib.closing(epochs):
        for _epoch, batches in epochs:
            next(batches)
            raise RuntimeError("step failed")
    assert len(started) == 1 and not _alive(started[0])
