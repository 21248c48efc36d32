"""CMC and mAP for re-ID retrieval (Market-1501 / MARS protocol), vectorised.

Protocol (torchreid's ``eval_market1501``): for each query, gallery entries with the same pid *and*
the same camera are dropped; queries left without a true match are skipped; CMC counts the rank of
the first true match; AP is uninterpolated (mean over true matches of the precision at each one).

Tie rule: gallery entries at equal distance are ranked by gallery index (as a stable argsort does),
so results equal a per-query loop over ``np.argsort(distmat[q], kind="stable")``.

Instead of sorting every row (the cost of the loop version), only what decides the ranks of true
matches is sorted: for each query, the gallery entries no farther than its farthest true match.
They are picked with one comparison pass over the distance matrix, then ordered with two stable
1-D sorts (by distance, then by query), which gives each true match its exact rank.
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch

from sta_model.threads import intra_op_threads


def _to_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return torch.from_numpy(np.ascontiguousarray(x))


def _row_distance_order(rows: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Stable permutation sorting entries by (row, value).

    float32 values are mapped to order-preserving 32-bit integer keys and packed with the row into
    one int64 key (one sort); other dtypes use two stable sorts (by value, then by row).
    """
    if vals.dtype == torch.float32:
        b = (vals + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into +0.0 (they tie)
        key = torch.where(b >= 0, b + (1 << 31), (1 << 31) - 1 - (b & 0x7FFFFFFF))
        return torch.sort((rows << 32) | key, stable=True).indices
    o = torch.sort(vals, stable=True).indices
    return o[torch.sort(rows[o], stable=True).indices]


def _same_pid_table(q_pids: torch.Tensor, g_pids: torch.Tensor):
    """``(num_q, P)`` gallery indices sharing each query's pid (padded with -1), ascending."""
    g_sorted, g_order = torch.sort(g_pids, stable=True)
    start = torch.searchsorted(g_sorted, q_pids, right=False)
    count = torch.searchsorted(g_sorted, q_pids, right=True) - start
    P = max(int(count.max()) if count.numel() else 0, 1)
    slot = torch.arange(P)[None, :]
    pos = (start[:, None] + slot).clamp(max=max(g_pids.numel() - 1, 0))
    idx = torch.where(slot < count[:, None], g_order[pos], torch.full_like(pos, -1))
    # g_order is stable, so within a pid the indices are ascending; padding (-1) sits at the end.
    return idx


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50,
                  chunk_elems: int = 1 << 22, num_threads: Optional[int] = None):
    """CMC curve and mAP (Market-1501/MARS protocol, see module docstring).

    Args:
        distmat (np.ndarray or torch.Tensor): ``(num_q, num_g)`` distances (smaller = closer).
        q_pids, g_pids, q_camids, g_camids (array-like): integer labels.
        max_rank (int): CMC length; reduced to num_g (with a warning) if the gallery is smaller.
        chunk_elems (int): distance entries processed per chunk of queries (memory bound).
        num_threads (int or None): torch intra-op threads for the call; None: the CPUs idle now
            (``sta_model.threads``), never more than this process may use.

    Returns:
        tuple: ``cmc`` (np.float32 array of length max_rank, fractions) and ``mAP`` (float in [0, 1]).

    Raises:
        ValueError: on shape mismatch or when no query has a true match in the gallery.
    """
    with intra_op_threads(num_threads):
        return _evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, chunk_elems)


def _evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int, chunk_elems: int):
    d = _to_tensor(distmat)
    q_pids, g_pids = _to_tensor(q_pids).long().reshape(-1), _to_tensor(g_pids).long().reshape(-1)
    q_camids, g_camids = _to_tensor(q_camids).long().reshape(-1), _to_tensor(g_camids).long().reshape(-1)
    if d.dim() != 2 or d.shape != (q_pids.numel(), g_pids.numel()) \
            or q_camids.numel() != q_pids.numel() or g_camids.numel() != g_pids.numel():
        raise ValueError(f"distmat {tuple(d.shape)} does not match {q_pids.numel()} queries "
                         f"x {g_pids.numel()} gallery labels")
    if not d.is_floating_point():
        d = d.double()
    num_q, num_g = d.shape
    if num_g < max_rank:
        warnings.warn(f"gallery has {num_g} entries; max_rank reduced from {max_rank}")
        max_rank = num_g

    # True matches of every query: same pid, other camera.
    cand = _same_pid_table(q_pids, g_pids)
    safe = cand.clamp(min=0)
    is_match = (cand >= 0) & (g_camids[safe] != q_camids[:, None])
    n_match = is_match.sum(1)
    valid_q = torch.nonzero(n_match > 0).squeeze(1)
    if valid_q.numel() == 0:
        raise ValueError("no query has a true match in the gallery")
    neg_inf = torch.tensor(float("-inf"), dtype=d.dtype)

    first, aps = [], []
    step = max(1, chunk_elems // max(num_g, 1))
    for s in range(0, valid_q.numel(), step):
        qi = valid_q[s:s + step]
        dc = d[qi]
        # Farthest true match per query: nothing beyond it can change a match's rank.
        far = torch.where(is_match[qi], dc.gather(1, safe[qi]), neg_inf).amax(1)
        rows, cols = torch.nonzero(dc <= far[:, None], as_tuple=True)  # row-major, cols ascending
        vals = dc[rows, cols]
        qr = qi[rows]
        same_pid = g_pids[cols] == q_pids[qr]
        keep = ~(same_pid & (g_camids[cols] == q_camids[qr]))  # drop same-pid-same-camera junk
        rows, vals, match = rows[keep], vals[keep], same_pid[keep]
        # Order by (row, distance, gallery index); entries are row-major with ascending index.
        o = _row_distance_order(rows, vals)
        rows, match = rows[o], match[o]
        row_start = torch.cumsum(torch.bincount(rows, minlength=qi.numel()), 0)
        row_start = torch.cat([row_start.new_zeros(1), row_start[:-1]])
        rank = torch.arange(rows.numel()) - row_start[rows]  # 0-based rank among kept entries
        m_rows, m_rank = rows[match], rank[match]
        m_start = torch.cumsum(n_match[qi], 0) - n_match[qi]
        m_ord = torch.arange(m_rows.numel()) - m_start[m_rows]  # how many matches precede it
        prec = (m_ord + 1).double() / (m_rank + 1).double()
        aps.append(torch.zeros(qi.numel(), dtype=torch.float64).index_add_(0, m_rows, prec)
                   / n_match[qi].double())
        first.append(m_rank[m_start])
    first = torch.cat(first).numpy()
    aps = torch.cat(aps).numpy()
    # Same arithmetic as the loop: float32 counts divided by the number of valid queries.
    hits = (first[:, None] <= np.arange(max_rank)[None, :]).astype(np.float32).sum(0)
    cmc = hits / np.float32(len(first))
    return cmc, float(np.mean(aps))
