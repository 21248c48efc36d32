"""pipeline.sampling with plain integers: P x K identity batches from a shard stream (torchreid's
RandomIdentitySampler rules), pure and seeded; the shard assignment per rank and worker."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipeline.sampling import (POOL_FACTOR, identity_batches, k_groups, sample_rng, slot_shards,
                               train_shard_assignment)


def _shards(ids_per_shard: dict[str, list[int]], per_id: dict[int, int]) -> dict[str, list[tuple[int, int]]]:
    """shard -> [(pid, tracklet number)]: tracklets are plain ints pid * 100 + j."""
    return {s: [(pid, pid * 100 + j) for pid in pids for j in range(per_id[pid])] for s, pids in ids_per_shard.items()}


def _run(shards, *, p, k, n, seed=0, shard_ids=True, own=None, reads=None):
    def read(s):
        if reads is not None:
            reads.append(s)
        return iter(shards[s])

    names = list(shards)
    own = names if own is None else own
    more = (s for _ in range(1000) for s in names)
    ids = {s: frozenset(pid for pid, _ in v) for s, v in shards.items()} if shard_ids else None
    num_ids = len({pid for v in shards.values() for pid, _ in v})
    return list(identity_batches(read, own, more, p=p, k=k, n_batches=n, rng=np.random.default_rng(seed),
                                 num_ids=num_ids, shard_ids=ids, total_shards=len(names)))


def test_batches_are_p_identities_times_k_of_their_own_tracklets():
    per_id = {pid: 2 + pid % 4 for pid in range(20)}
    shards = _shards({f"s{i}": [2 * i, 2 * i + 1] for i in range(10)}, per_id)
    batches = _run(shards, p=4, k=3, n=12)
    assert len(batches) == 12
    for b in batches:
        assert len(b) == 12
        pids = [pid for pid, _ in b]
        assert Counter(pids) == {pid: 3 for pid in set(pids)} and len(set(pids)) == 4
        assert pids == sorted(pids, key=pids.index)  # identity-major: K consecutive entries
        assert all(t // 100 == pid for pid, t in b)
        for pid in set(pids):  # n >= K: K distinct tracklets; n < K: drawn with replacement
            ts = [t for q, t in b if q == pid]
            assert len(set(ts)) == 3 or per_id[pid] < 3


def test_every_tracklet_of_a_pass_is_used_before_an_identity_leaves_the_pool():
    per_id = {pid: 8 for pid in range(6)}
    shards = _shards({"a": [0, 1, 2], "b": [3, 4, 5]}, per_id)
    batches = _run(shards, p=3, k=2, n=30, own=["a", "b"])
    per_pid: dict[int, list] = {}
    for b in batches:
        for pid, t in b:
            per_pid.setdefault(pid, []).append(t)
    # an identity's tracklets are used in passes: each run of 8 uses (n = 8, 4 groups of K=2)
    # is all of its 8 tracklets once, before a re-read shard pools it again
    for pid, ts in per_pid.items():
        for i in range(0, len(ts) - 7, 8):
            assert sorted(ts[i:i + 8]) == [pid * 100 + j for j in range(8)], (pid, ts)
    assert sum(map(len, per_pid.values())) == 30 * 6


def test_k_groups():
    rng = np.random.default_rng(0)
    g = k_groups(7, 3, rng)
    assert len(g) == 2 and len(set(g[0]) | set(g[1])) == 6 and all(0 <= i < 7 for x in g for i in x)
    (one,) = k_groups(2, 4, rng)
    assert len(one) == 4 and set(one) <= {0, 1}


def test_pure_and_seeded():
    shards = _shards({f"s{i}": [i] for i in range(12)}, {pid: 3 for pid in range(12)})
    a, b = _run(shards, p=3, k=2, n=6, seed=1), _run(shards, p=3, k=2, n=6, seed=1)
    assert a == b and a != _run(shards, p=3, k=2, n=6, seed=2)
    r1 = sample_rng(seed=1, epoch=0, rank=0, world_size=2, worker=1, num_workers=2).integers(1 << 30, size=4)
    r2 = sample_rng(seed=1, epoch=1, rank=0, world_size=2, worker=1, num_workers=2).integers(1 << 30, size=4)
    r3 = sample_rng(seed=1, epoch=0, rank=1, world_size=2, worker=1, num_workers=2).integers(1 << 30, size=4)
    assert not (np.array_equal(r1, r2) or np.array_equal(r1, r3))


def test_pool_reads_only_what_it_needs_and_skips_shards_that_bring_nothing():
    shards = _shards({f"s{i}": [i] for i in range(40)}, {pid: 4 for pid in range(40)})
    reads: list = []
    _run(shards, p=2, k=4, n=1, reads=reads)
    assert len(reads) == POOL_FACTOR * 2  # the pool's target, not every shard
    few = _shards({"a": [0, 1], "b": [2]}, {0: 4, 1: 4, 2: 4})
    reads = []
    _run(few, p=2, k=2, n=6, own=["a", "b"], reads=reads)  # pool target 3 = every identity
    # a resampled shard whose identities are all pooled is not read again
    assert reads[:2] == ["a", "b"] and all(reads.count(s) <= 3 for s in "ab")


def test_not_enough_identities():
    shards = _shards({"a": [0], "b": [1]}, {0: 2, 1: 2})
    with pytest.raises(RuntimeError, match="only 2 usable identities.*P=3"):
        _run(shards, p=3, k=1, n=1)


def test_shard_assignment_disjoint_complete_seeded_and_resampled():
    shards = [f"s{i}" for i in range(10)]
    kw = dict(seed=3, world_size=2, num_workers=2)
    for epoch in range(3):
        sets = [set(train_shard_assignment(shards, epoch=epoch, rank=r, worker=w, **kw))
                for r in range(2) for w in range(2)]
        assert sum(map(len, sets)) == 10 and set().union(*sets) == set(shards)  # disjoint, complete
    a = train_shard_assignment(shards, epoch=0, rank=1, worker=0, **kw)
    assert a == train_shard_assignment(shards, epoch=0, rank=1, worker=0, **kw)  # pure
    assert a != train_shard_assignment(shards, epoch=1, rank=1, worker=0, **kw)  # new epoch
    assert a != train_shard_assignment(shards, epoch=0, rank=1, worker=0, resample_round=1, **kw)  # resample
    few = [train_shard_assignment(shards[:3], epoch=0, rank=r, worker=w, **kw)
           for r in range(2) for w in range(2)]
    assert all(len(f) >= 1 for f in few)  # fewer shards than slots: everyone still reads
    own, more = slot_shards(shards, epoch=0, rank=1, worker=0, **kw)
    assert own == a and [next(more) for _ in range(len(own))] == train_shard_assignment(
        shards, epoch=0, rank=1, worker=0, resample_round=1, **kw)
    with pytest.raises(ValueError, match="bad slot"):
        train_shard_assignment(shards, epoch=0, rank=2, worker=0, **kw)
