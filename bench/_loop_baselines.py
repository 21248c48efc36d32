"""Plain reference implementations, written the obvious way, for tests and the speed benchmark.

``eval_rank_loop`` follows torchreid's python ``eval_market1501`` (argsort every row, then a
per-query loop). ``re_ranking_loop`` re-types the public ``re_ranking.py`` (Zhong et al., used by
torchreid/fast-reid) in numpy with float32 where the original stores V/Jaccard in float16.
"""
from __future__ import annotations

import numpy as np
import torch
from pipeline.transforms import decode_into, frame_buffer, restricted_indices


def eval_rank_loop(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, kind="stable"):
    """Per-query loop CMC/mAP; ``kind`` is the argsort kind (``"stable"``: ties by gallery index)."""
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    num_q, num_g = distmat.shape
    if num_g < max_rank:
        max_rank = num_g
    indices = np.argsort(distmat, axis=1, kind=kind)
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_AP = [], []
    num_valid_q = 0.0
    for q_idx in range(num_q):
        q_pid, q_camid = q_pids[q_idx], q_camids[q_idx]
        order = indices[q_idx]
        remove = (g_pids[order] == q_pid) & (g_camids[order] == q_camid)
        keep = np.invert(remove)
        raw_cmc = matches[q_idx][keep]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        num_valid_q += 1.0
        num_rel = raw_cmc.sum()
        tmp_cmc = raw_cmc.cumsum()
        tmp_cmc = [x / (i + 1.0) for i, x in enumerate(tmp_cmc)]
        tmp_cmc = np.asarray(tmp_cmc) * raw_cmc
        all_AP.append(tmp_cmc.sum() / num_rel)
    assert num_valid_q > 0, "no query has a true match"
    all_cmc = np.asarray(all_cmc).astype(np.float32)
    all_cmc = all_cmc.sum(0) / num_valid_q
    return all_cmc, float(np.mean(all_AP))


def re_ranking_loop(q_feat, g_feat, k1=20, k2=6, lambda_value=0.3):
    """The original k-reciprocal re-ranking loops, numpy float32 throughout."""
    q_feat = np.asarray(q_feat, dtype=np.float32)
    g_feat = np.asarray(g_feat, dtype=np.float32)
    query_num = q_feat.shape[0]
    feat = np.concatenate([q_feat, g_feat])
    all_num = feat.shape[0]
    # Distances as the original computes them (torch, float32, one addmm over the full matrix).
    ft = torch.from_numpy(feat)
    sq = ft.pow(2).sum(1, keepdim=True).expand(all_num, all_num)
    original_dist = (sq + sq.t()).addmm_(ft, ft.t(), beta=1, alpha=-2).numpy()
    del feat, ft, sq
    gallery_num = original_dist.shape[0]
    original_dist = np.transpose(original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist).astype(np.float32)
    initial_rank = np.argsort(original_dist).astype(np.int32)

    for i in range(all_num):
        forward_k_neigh_index = initial_rank[i, :k1 + 1]
        backward_k_neigh_index = initial_rank[forward_k_neigh_index, :k1 + 1]
        fi = np.where(backward_k_neigh_index == i)[0]
        k_reciprocal_index = forward_k_neigh_index[fi]
        k_reciprocal_expansion_index = k_reciprocal_index
        for j in range(len(k_reciprocal_index)):
            candidate = k_reciprocal_index[j]
            half = int(np.around(k1 / 2)) + 1
            candidate_forward_k_neigh_index = initial_rank[candidate, :half]
            candidate_backward_k_neigh_index = initial_rank[candidate_forward_k_neigh_index, :half]
            fi_candidate = np.where(candidate_backward_k_neigh_index == candidate)[0]
            candidate_k_reciprocal_index = candidate_forward_k_neigh_index[fi_candidate]
            if len(np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index)) > \
                    2 / 3 * len(candidate_k_reciprocal_index):
                k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index,
                                                         candidate_k_reciprocal_index)
        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
        V[i, k_reciprocal_expansion_index] = weight / np.sum(weight)
    original_dist = original_dist[:query_num, ]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
        del V_qe
    del initial_rank
    invIndex = []
    for i in range(gallery_num):
        invIndex.append(np.where(V[:, i] != 0)[0])
    jaccard_dist = np.zeros_like(original_dist, dtype=np.float32)
    for i in range(query_num):
        temp_min = np.zeros(shape=[1, gallery_num], dtype=np.float32)
        indNonZero = np.where(V[i, :] != 0)[0]
        indImages = [invIndex[ind] for ind in indNonZero]
        for j in range(len(indNonZero)):
            temp_min[0, indImages[j]] = temp_min[0, indImages[j]] + np.minimum(
                V[i, indNonZero[j]], V[indImages[j], indNonZero[j]])
        jaccard_dist[i] = 1 - temp_min / (2 - temp_min)
    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    del original_dist, V, jaccard_dist
    return final_dist[:query_num, query_num:]


def wds_stock_loader(shard_urls, *, clip_len: int, p: int, k: int, height: int, width: int, batches: int,
                     seed: int = 0, num_workers: int = 1):
    """The training stream as a user would write it with the stock ``webdataset`` library, after
    open_clip's ``get_wds_dataset``: shard list -> seeded shuffle per pass -> split by node -> split
    by worker -> ``tarfile_to_samples`` -> restricted sampling of ``clip_len`` frames and decode of
    only those (``transforms.decode_into``, the stream's own decoder, so the row compares the
    plumbing) -> a pool of 4P identities -> P x K batches of uint8 ``(P*K, N, H, W, 3)`` clips.
    A persistent ``WebLoader``: each ``iter()`` is one epoch of ``batches`` batches per worker.

    Args:
        shard_urls: local paths of the train shards.
        clip_len, p, k, height, width: clip length, identities and tracklets per batch, frame size.
        batches: batches per epoch (per worker).
        seed: shuffle and sampling seed.
        num_workers: loader processes.
    """
    import json
    import random

    import webdataset as wds


    class Passes(wds.PipelineStage):
        """Every shard once per pass, reshuffled per (seed, epoch, pass); passes repeat so a worker
        never runs dry (``with_epoch`` cuts the epoch). Each ``iter()`` is the next epoch."""

        def __init__(self):
            self.epoch = -1

        def run(self):
            self.epoch += 1
            for rnd in range(1 << 30):
                urls = list(shard_urls)
                random.Random(f"{seed}/{self.epoch}/{rnd}").shuffle(urls)
                yield from (dict(url=u) for u in urls)

    def clips(src):
        rng = np.random.default_rng(seed)
        for s in src:
            meta = json.loads(s["json"])
            frames = sorted(key for key in s if key.endswith(".jpg"))
            flip = rng.random() < 0.5
            out = np.empty((clip_len, height, width, 3), np.uint8)
            for n, i in enumerate(restricted_indices(len(frames), clip_len, rng)):
                decode_into(s[frames[i]], out[n], flip)
            yield meta["pid"], meta["camid"], out

    def pk_batches(src):
        rnd = random.Random(seed)
        pool: dict[int, list] = {}
        for pid, camid, clip in src:
            pool.setdefault(pid, []).append((camid, clip))
            ready = [q for q, v in pool.items() if len(v) >= k]
            if len(ready) < 4 * p:
                continue
            chosen = rnd.sample(ready, p)
            out = frame_buffer((p * k, clip_len, height, width, 3))
            arr, pids, camids = out.numpy(), np.empty(p * k, np.int64), np.empty(p * k, np.int64)
            for j, q in enumerate(chosen):
                for i in range(k):
                    camids[j * k + i], arr[j * k + i] = pool[q].pop()
                    pids[j * k + i] = q
                if not pool[q]:
                    del pool[q]
            yield {"clips": out, "pids": torch.from_numpy(pids), "camids": torch.from_numpy(camids),
                   "skipped": 0}

    ds = wds.DataPipeline(Passes(), wds.split_by_node, wds.split_by_worker,
                          wds.tarfile_to_samples(handler=wds.warn_and_continue), clips, pk_batches)
    ds = ds.with_epoch(batches)
    return wds.WebLoader(ds, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0)
