"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), sparse and blocked.

Same algorithm as the public ``re_ranking.py`` used by torchreid/fast-reid:

1. ``original_dist``: squared Euclidean distances of all q+g features (not clamped, as in the
   original), each row divided by its maximum (the original divides by the column max and
   transposes, the same thing for a symmetric matrix).
2. For each item i: k-reciprocal set R(i) of its ``k1 + 1`` nearest neighbours; every c in R(i)
   whose own ``round(k1/2) + 1``-reciprocal set R'(c) has more than 2/3 of its members in R(i)
   adds R'(c); the union gets weights ``exp(-original_dist)`` normalised to sum 1 -> row i of V.
3. Local query expansion: V[i] = mean of V over the ``k2`` nearest neighbours of i.
4. Jaccard distance ``1 - t / (2 - t)`` with ``t = sum_k min(V[i,k], V[j,k])``;
   ``final = (1 - lambda) * jaccard + lambda * original_dist``, query rows x gallery columns.

Memory: the distance matrix is visited in tiles (``sta_model.neighbours``), one at a time; V (at
most about k1 * 1.5 nonzeros per row before expansion) is kept as CSR/CSC index/value arrays;
Jaccard sums are scattered for small blocks of queries. Everything is float32; neighbours are
ordered as a stable sort orders them (ties to the lower index; the original leaves ties to an
unstable argsort).

Threads: the work is cut into blocks that threads take whole, each with one intra-op thread (tile
products run ahead in a thread while the previous tile is reduced; Jaccard blocks go to a pool),
so no OpenMP worker spins at a barrier while another is descheduled.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch

from sta_model.neighbours import distance_pass
from sta_model.threads import idle_cpus, intra_op_threads, usable_cpus


def _as_float32(x) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.float().contiguous()


def _rows(a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``a[idx]`` by ``index_select`` (torch's general indexing is several times slower)."""
    return a.index_select(0, idx.reshape(-1)).view(*idx.shape, *a.shape[1:])


def _reciprocal(top: torch.Tensor, block_rows: int = 1024) -> torch.Tensor:
    """``mask[i, a]``: i is among the neighbours (same width) of its neighbour ``top[i, a]``."""
    out = []
    for s in range(0, top.shape[0], block_rows):  # blocks: temporaries malloc can reuse
        t = top[s:s + block_rows]
        out.append((_rows(top, t) == torch.arange(s, s + t.shape[0])[:, None, None]).any(-1))
    return torch.cat(out)


def _expansion_sets(top: torch.Tensor, k1: int, block_rows: int):
    """CSR (rows, cols) of the k-reciprocal expansion sets, columns ascending within a row."""
    N = top.shape[0]
    kh = int(np.around(k1 / 2))
    R = _reciprocal(top)
    toph = top[:, :kh + 1].contiguous()
    Rh = _reciprocal(toph)
    b = min(block_rows, N)
    member = torch.zeros(b, N, dtype=torch.bool)  # member[i - s, c]: c in R(i), for the block's rows
    keys = []
    for s in range(0, N, b):
        e = min(N, s + b)
        ti, Ri = top[s:e], R[s:e]
        flat = (torch.arange(e - s)[:, None] * N + ti).masked_select(Ri)
        member.view(-1).index_fill_(0, flat, True)
        cand, cmask = _rows(toph, ti), _rows(Rh, ti)  # (b, k1+1, kh+1): R'(c) for every neighbour c
        in_R = _rows(member.view(-1), torch.arange(e - s)[:, None, None] * N + cand)
        member.view(-1).index_fill_(0, flat, False)
        inter = (in_R & cmask).sum(-1)
        size = cmask.sum(-1)
        # Same float comparison as the original: len(intersection) > 2/3 * len(R'(c)).
        keep = Ri & (inter.double() > 2 / 3 * size.double())
        # (row, column) keys of R(i) and the kept R'(c); sorted and unique (np.unique) at once
        own = torch.arange(s, e)[:, None] * N
        keys.append(torch.cat([(own + ti).masked_select(Ri),
                               (own[..., None] + cand).masked_select(cmask & keep[..., None])]).unique())
    keys = torch.cat(keys)
    return keys // N, keys % N


def _pair_sqdist(x: torch.Tensor, sq: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                 top: torch.Tensor, topv: torch.Tensor, chunk: int = 1 << 14) -> torch.Tensor:
    """Squared distances of (row, col) pairs: looked up among each row's nearest neighbours
    (values of the distance pass) and computed directly for the remaining pairs. In chunks of
    pairs: temporaries small enough for malloc to reuse (fresh large ones cost page faults)."""
    out = torch.empty(rows.numel())
    for s in range(0, rows.numel(), chunk):
        r, c = rows[s:s + chunk], cols[s:s + chunk]
        hit = _rows(top, r) == c[:, None]
        v = _rows(topv, r).gather(1, hit.byte().argmax(1, keepdim=True)).squeeze(1)
        miss = torch.nonzero(~hit.any(1)).squeeze(1)
        if miss.numel():
            r, c = r[miss], c[miss]
            v[miss] = sq[r] + sq[c] - 2 * (x.index_select(0, r) * x.index_select(0, c)).sum(1)
        out[s:s + chunk] = v
    return out


def _segments(starts: torch.Tensor, lens: torch.Tensor):
    """``(pos, own)``: the concatenation of ``arange(starts[t], starts[t] + lens[t])`` over t, and
    for each of its entries the segment t it belongs to."""
    total = int(lens.sum())
    own = torch.repeat_interleave(torch.arange(lens.numel()), lens, output_size=total)
    return (starts - (torch.cumsum(lens, 0) - lens)).index_select(0, own) + torch.arange(total), own


def _query_expansion(rows, cols, vals, nbr: torch.Tensor, N: int, block_rows: int):
    """CSR of ``V_qe[i] = mean_t V[nbr[i, t]]``."""
    k2 = nbr.shape[1]
    cnt = torch.bincount(rows, minlength=N)
    ptr = torch.cumsum(cnt, 0) - cnt
    out_r, out_c, out_v = [], [], []
    for s in range(0, N, block_rows):
        e = min(N, s + block_rows)
        nb = nbr[s:e].reshape(-1)
        lens = _rows(cnt, nb)
        pos, own = _segments(_rows(ptr, nb), lens)
        keys, order = torch.sort((s + own // k2) * N + _rows(cols, pos))  # own // k2: the row of nb
        new = torch.ones_like(keys, dtype=torch.bool)
        new[1:] = keys[1:] != keys[:-1]
        group = torch.cumsum(new, 0) - 1
        keys = keys.masked_select(new)
        summed = torch.zeros(keys.numel()).index_add_(0, group, _rows(_rows(vals, pos), order))
        out_r.append(keys // N)
        out_c.append(keys % N)
        out_v.append(summed / k2)
    return torch.cat(out_r), torch.cat(out_c), torch.cat(out_v)


def re_ranking(q_feat, g_feat, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
               block_rows: int = 1024, pair_budget: int = 1 << 16,
               num_threads: Optional[int] = None) -> np.ndarray:
    """k-reciprocal re-ranked distances between queries and gallery.

    Args:
        q_feat (np.ndarray or torch.Tensor): ``(num_q, d)`` query features.
        g_feat (np.ndarray or torch.Tensor): ``(num_g, d)`` gallery features.
        k1 (int): k of the k-reciprocal sets (20).
        k2 (int): neighbours of the local query expansion (6; 1 disables it).
        lambda_value (float): weight of the original distance (0.3).
        block_rows (int): side of the distance tiles and rows per block of the sparse steps.
        pair_budget (int): (query nonzero, gallery nonzero) pairs per Jaccard block.
        num_threads (int or None): threads for the call. Work is split into blocks that threads
            take whole (each with one intra-op thread), so no OpenMP worker spins at a barrier
            while another is descheduled, and a busy machine costs no extra CPU time. None: every
            CPU this process may use (``sta_model.threads.usable_cpus``); the tile products
            alone run on OpenMP threads, as many as CPUs are idle at the call, less one.

    Returns:
        np.ndarray: ``(num_q, num_g)`` float32 distances.

    Examples::

        >>> dist = re_ranking(q_feats, g_feats)  # then sta_model.metrics.evaluate_rank(dist, ...)
    """
    if num_threads is not None and num_threads > 0:
        threads, gemm_threads = num_threads, max(1, num_threads - 1)
    else:
        threads, gemm_threads = usable_cpus(), max(1, idle_cpus() - 1)
    with intra_op_threads(1):
        return _re_ranking(q_feat, g_feat, k1, k2, lambda_value, block_rows, pair_budget, threads, gemm_threads)


def _in_blocks(fn, blocks, threads: int) -> list:
    """``[fn(*blk) for blk in blocks]``, on ``threads`` threads with one intra-op thread each."""
    if threads <= 1 or len(blocks) <= 1:
        return [fn(*blk) for blk in blocks]

    def one(blk):
        with intra_op_threads(1):
            return fn(*blk)

    with ThreadPoolExecutor(min(threads, len(blocks)), thread_name_prefix="rerank") as pool:
        return list(pool.map(one, blocks))


def _re_ranking(q_feat, g_feat, k1: int, k2: int, lambda_value: float, block_rows: int,
                pair_budget: int, threads: int, gemm_threads: int) -> np.ndarray:
    q, g = _as_float32(q_feat), _as_float32(g_feat)
    if q.dim() != 2 or g.dim() != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"expected (num_q, d) and (num_g, d) features, got {tuple(q.shape)}, {tuple(g.shape)}")
    nq, ng = q.shape[0], g.shape[0]
    x = torch.cat([q, g])
    N = x.shape[0]
    if not bool(torch.isfinite(x).all()):
        raise ValueError("features must be finite (NaN or inf found)")
    if not (1 <= k1 < N and 1 <= k2 <= k1 + 1):
        raise ValueError(f"need 1 <= k1 < num_q + num_g ({N}) and 1 <= k2 <= k1 + 1, got k1={k1}, k2={k2}")

    sq, top, topv, rowmax, final = distance_pass(x, nq, k1, block_rows, threads, gemm_threads)

    rows, cols = _expansion_sets(top, k1, block_rows)
    w = torch.exp(-_pair_sqdist(x, sq, rows, cols, top, topv) / rowmax[rows])
    vals = w / torch.zeros(N).index_add_(0, rows, w)[rows]
    if k2 != 1:
        rows, cols, vals = _query_expansion(rows, cols, vals, top[:, :k2], N, block_rows)

    # CSC of V restricted to gallery rows (only gallery columns of the result are needed).
    gal = rows >= nq
    order = torch.argsort(cols[gal] * N + rows[gal])
    c_rows, c_cols, c_vals = rows[gal][order] - nq, cols[gal][order], vals[gal][order]
    c_cnt = torch.bincount(c_cols, minlength=N)
    c_ptr = torch.cumsum(c_cnt, 0) - c_cnt

    # Query rows of V (CSR is row-major, so they come first) and their pair counts; blocks of
    # query rows with about ``pair_budget`` pairs each (small: their temporaries stay in cache).
    n_qnz = int((rows < nq).sum())
    q_rows, q_cols, q_vals = rows[:n_qnz], cols[:n_qnz], vals[:n_qnz]
    lens = c_cnt[q_cols]
    row_end = torch.cumsum(torch.zeros(nq, dtype=torch.long).index_add_(0, q_rows, lens), 0)
    entry_end = torch.cumsum(torch.bincount(q_rows, minlength=nq), 0)
    blocks, s = [], 0
    while s < nq:
        done = int(row_end[s - 1]) if s else 0
        e = min(nq, max(s + 1, int(torch.searchsorted(row_end, done + pair_budget, right=True))))
        blocks.append((s, e))
        s = e

    def blend(s, e):  # final[s:e] = lambda * original + (1 - lambda) * Jaccard distance
        a, b = (int(entry_end[s - 1]) if s else 0), int(entry_end[e - 1])
        pos, own = _segments(c_ptr[q_cols[a:b]], lens[a:b])  # own: the query entry of each pair
        m = torch.minimum(q_vals[a:b].index_select(0, own), c_vals.index_select(0, pos))
        tgt = ((q_rows[a:b] - s) * ng).index_select(0, own) + c_rows.index_select(0, pos)
        t = torch.zeros((e - s) * ng).index_add_(0, tgt, m).view(e - s, ng)
        # lambda * d + (1 - lambda) * (1 - t / (2 - t))
        final[s:e].mul_(lambda_value).add_(1 - lambda_value).addcdiv_(t, 2 - t, value=lambda_value - 1)

    _in_blocks(blend, blocks, threads)
    return final.numpy()
