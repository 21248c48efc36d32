"""P x K identity sampling over a stream of shards: torchreid's ``RandomIdentitySampler`` where the
data set is not in memory.

A training slot (rank x loader worker) reads its shards whole, keeps the tracklets of up to
``POOL_FACTOR * P`` identities in a pool (train shards never split an identity, so a pooled
identity is complete) and draws each batch from it: P distinct identities, K tracklets each.
An identity's tracklets are shuffled into floor(n/K) disjoint groups (one group drawn with
replacement when n < K), and it stays pooled until its groups are used up, so every tracklet read
is used. Everything here is a pure function of its arguments (plain integers in the tests): the
readers and decoders are the caller's.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, Iterable, Iterator

import numpy as np

POOL_FACTOR = 4  # a slot keeps >= POOL_FACTOR * P identities pooled to draw from
TAG_SHARDS, TAG_SAMPLES = 0x5AD, 0x5A3  # RNG stream tags (shard order vs. sampling)


def sample_rng(*, seed: int, epoch: int, rank: int, world_size: int, worker: int,
               num_workers: int) -> np.random.Generator:
    """The sampling generator of one slot in one epoch: independent streams per slot and epoch."""
    return np.random.default_rng([TAG_SAMPLES, seed, epoch, rank, world_size, worker, num_workers])


def k_groups(n: int, k: int, rng: np.random.Generator) -> list[list[int]]:
    """An identity's ``n`` tracklets as K-index groups for one pass (torchreid's rule)."""
    if n < k:
        return [rng.choice(n, k, replace=True).tolist()]
    perm = rng.permutation(n).tolist()
    return [perm[i:i + k] for i in range(0, n - k + 1, k)]


def identity_batches(read: Callable[[Hashable], Iterable[tuple[int, Any]]], own: list, more: Iterator, *,
                     p: int, k: int, n_batches: int, rng: np.random.Generator, num_ids: int,
                     shard_ids: dict | None = None, total_shards: int | None = None) -> Iterator[list[tuple[int, Any]]]:
    """``n_batches`` P x K batches, each a list of ``p * k`` ``(pid, item)``, identity-major
    (the K tracklets of an identity are consecutive).

    Args:
        read: a shard -> its tracklets as ``(pid, item)``.
        own: this slot's shards for the epoch, read first and in this order.
        more: shards to resample from once ``own`` is used up (an endless iterator). Past its own
            share a slot reads more only when it cannot make a batch: read-ahead alone must not
            make slots' shard sets overlap.
        p, k: identities per batch, tracklets per identity.
        n_batches: batches to yield.
        rng: draws the identities and groups (``sample_rng``).
        num_ids: identities in the split; the pool aims at ``min(POOL_FACTOR * p, num_ids)``.
        shard_ids: shard -> its identities (the manifest's): a shard whose identities are all
            pooled is not read (it would bring nothing: few identities per P, small data sets).
        total_shards: shards in the split; after twice as many reads that bring no new identity
            the pool settles for what it has (default: ``len(own) + 1``).

    Raises RuntimeError when the shards hold fewer than P usable identities.
    """
    own = list(own)[::-1]  # popped from the end
    pool: dict[int, list] = {}  # pid -> its tracklets, insertion order = read order
    groups: dict[int, list] = {}  # pid -> its unused K-groups (indices into pool[pid])
    state = {"target": min(POOL_FACTOR * p, num_ids), "resampling": False}
    n_shards = total_shards or len(own) + 1
    shard_ids = shard_ids or {}

    def refill(need: int) -> None:
        fruitless = 0
        while len(pool) < state["target"]:
            if own:
                shard = own.pop()
            elif len(pool) >= need and not state["resampling"]:
                return
            else:
                state["resampling"] = True
                shard = next(more)
            new = []
            ids = shard_ids.get(shard)
            if not (ids and ids.issubset(pool)):
                got: dict[int, list] = {}
                for pid, item in read(shard):
                    got.setdefault(pid, []).append(item)
                new = [pid for pid in got if pid not in pool]  # a pooled pid's data is the same
                for pid in new:
                    pool[pid] = got[pid]
                    groups[pid] = k_groups(len(got[pid]), k, rng)
            fruitless = 0 if new else fruitless + 1
            if fruitless > 2 * n_shards:  # two rounds brought nothing new: take what we have
                if len(pool) >= need:  # fewer usable identities than the manifest says: settle
                    state["target"] = len(pool)
                    return
                raise RuntimeError(f"only {len(pool)} usable identities in the training shards, "
                                   f"a batch needs P={need}")

    for _ in range(n_batches):
        refill(p)
        if len(pool) < p:  # fewer identities in the split than a batch needs
            raise RuntimeError(f"only {len(pool)} usable identities in the training shards, a batch needs P={p}")
        order = list(pool)
        batch = []
        for i in rng.choice(len(order), p, replace=False).tolist():
            pid = order[i]
            tracks = pool[pid]
            batch += [(pid, tracks[t]) for t in groups[pid].pop()]
            if not groups[pid]:
                del pool[pid], groups[pid]
        yield batch


def train_shard_assignment(shards: list, *, seed: int, epoch: int, rank: int, world_size: int,
                           worker: int, num_workers: int, resample_round: int = 0) -> list:
    """The shards slot (rank, worker) reads in resampling round ``resample_round`` of an epoch.

    All slots shuffle the shard list with the same (seed, epoch, resample_round) permutation; slot
    ``rank * num_workers + worker`` takes every (world_size*num_workers)-th shard of it, so within
    a round the slots' sets are disjoint and together cover every shard: split by node, then by
    worker, as webdataset's ``split_by_node``/``split_by_worker`` do after a seeded shuffle. Round
    r+1 (a slot ran out) reshuffles with a new sub-seed. With fewer shards than slots, a slot
    without a share reads one shard chosen from the permutation (not disjoint: pack more shards).
    """
    slots = world_size * num_workers
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ValueError(f"bad slot rank={rank}/{world_size} worker={worker}/{num_workers}")
    if not shards:
        return []
    order = np.random.default_rng([TAG_SHARDS, seed, epoch, resample_round]).permutation(len(shards)).tolist()
    slot = rank * num_workers + worker
    mine = order[slot::slots] or [order[slot % len(shards)]]
    return [shards[i] for i in mine]


def slot_shards(shards: list, **slot) -> tuple[list, Iterator]:
    """``(own, more)`` for ``identity_batches``: round 0 of ``train_shard_assignment`` and the
    endless resampling rounds after it. ``slot``: its keyword arguments but ``resample_round``."""
    own = train_shard_assignment(shards, resample_round=0, **slot)
    more = (s for rnd in range(1, 1 << 30) for s in train_shard_assignment(shards, resample_round=rnd, **slot))
    return own, more
