"""Exact nearest neighbours and row maxima of all features, from tiles of the distance matrix.

The first step of k-reciprocal re-ranking (``sta_model.rerank``) needs, for every one of the
q + g features, its ``k1 + 1`` nearest features (ties to the lower index, as a stable sort of the
row gives), the maximum of its row of squared distances, and the query x gallery block.
``distance_pass`` computes each tile of the symmetric matrix once, reduces it while it is in
cache, and keeps no more than one tile (two more ahead when a thread computes them).
"""
from __future__ import annotations

import queue
import threading

import torch

from sta_model.threads import intra_op_threads

# An empty slot of a row's best keys: value +inf (so every entry passes its threshold), last column.
_PAD = (0x7F800000 << 32) | 0x7FFFFFFF


def _order_keys(vals: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """int64 keys that sort as (value, column): the float32 bits made order-preserving as a
    signed int32 (a negative float's magnitude bits flipped), above the column index. One
    ``topk`` over keys then gives a stable sort's order, ties to the lower column."""
    i = (vals + 0.0).view(torch.int32)  # + 0.0: -0.0 becomes 0.0, which compares equal to it
    i = i ^ ((i >> 31) & 0x7FFFFFFF)
    return (i.long() << 32) | cols


def _key_values(keys: torch.Tensor) -> torch.Tensor:
    """The float32 values of :func:`_order_keys` keys."""
    i = (keys >> 32).int()
    return (i ^ ((i >> 31) & 0x7FFFFFFF)).view(torch.float32)


def _offer(best: torch.Tensor, tau: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor) -> None:
    """Merge candidate keys into the ``K`` smallest keys of their rows (``best``, ``(N, K)``,
    ascending), and set those rows' thresholds ``tau`` to their ``K``-th value. ``rows``:
    ascending, one per key."""
    K = best.shape[1]
    urow, cnt = torch.unique_consecutive(rows, return_counts=True)
    g = torch.repeat_interleave(torch.arange(urow.numel()), cnt, output_size=rows.numel())
    pos = torch.arange(rows.numel()) - (torch.cumsum(cnt, 0) - cnt)[g] + K
    cand = torch.full((urow.numel(), K + int(cnt.max())), _PAD)
    cand[:, :K] = best[urow]
    cand[g, pos] = keys
    best[urow] = cand.topk(K, dim=1, largest=False, sorted=True).values
    tau[urow] = _key_values(best[urow, -1])


def _chunk_minmax(t: torch.Tensor, by_col: bool, chunk: int = 32):
    """Minima and maxima of runs of ``chunk`` entries along each row of tile ``t`` (along each
    column with ``by_col``), in one pass; None when that side is not a multiple of ``chunk``."""
    n = t.shape[0] if by_col else t.shape[1]
    if n % chunk:
        return None
    if by_col:
        return torch.aminmax(t.view(n // chunk, chunk, t.shape[1]), dim=1)
    return torch.aminmax(t.view(t.shape[0], n // chunk, chunk), dim=2)


def _survivors(t: torch.Tensor, tau: torch.Tensor, by_col: bool, mins=None, chunk: int = 32):
    """(row, col) of the entries of tile ``t`` not above ``tau``: one threshold per row, or per
    column with ``by_col`` (then ordered by column). With ``mins`` (:func:`_chunk_minmax`'s minima)
    only the chunks whose minimum passes are compared entry by entry."""
    if mins is None:
        if by_col:
            c, r = (t.t() <= tau[:, None]).nonzero(as_tuple=True)
            return r, c
        return (t <= tau[:, None]).nonzero(as_tuple=True)
    if not by_col:
        v = t.view(t.shape[0], -1, chunk)
        r, ch = (mins <= tau[:, None]).nonzero(as_tuple=True)
        sel, lane = (v[r, ch] <= tau[r, None]).nonzero(as_tuple=True)
        return r[sel], ch[sel] * chunk + lane
    v = t.view(-1, chunk, t.shape[1])
    ch, c = (mins <= tau[None, :]).nonzero(as_tuple=True)
    sel, lane = (v[ch, :, c] <= tau[c, None]).nonzero(as_tuple=True)
    r, c = ch[sel] * chunk + lane, c[sel]
    o = torch.argsort(c * t.shape[0] + r)  # by column, then row
    return r[o], c[o]


def _tiles(x: torch.Tensor, sq: torch.Tensor, spans, b: int, threads: int, gemm_threads: int = 1):
    """Yield ``(span, tile)``: the squared distances ``x[s:e]`` x ``x[c:f]`` for each span
    ``(s, e, c, f)``, in order. A tile is valid until the next one is asked for.

    With ``threads`` > 1 the matrix products run ahead in a thread of their own (with
    ``gemm_threads`` intra-op threads) while the caller reduces the previous tile: the two
    overlap without OpenMP workers spinning between small operations."""
    def compute(span, buf):
        s, e, c, f = span
        t = torch.add(sq[s:e, None], sq[None, c:f], out=buf[:(e - s) * (f - c)].view(e - s, f - c))
        return t.addmm_(x[s:e], x[c:f].t(), alpha=-2)

    if threads <= 1:
        buf = torch.empty(b * b)
        for span in spans:
            yield span, compute(span, buf)
        return
    free, ready = queue.Queue(), queue.Queue()
    for _ in range(3):
        free.put(torch.empty(b * b))
    stop = threading.Event()

    def produce():
        try:
            with intra_op_threads(gemm_threads):
                for span in spans:
                    buf = free.get()
                    if stop.is_set():
                        return
                    ready.put((span, compute(span, buf), buf))
            ready.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            ready.put(exc)

    worker = threading.Thread(target=produce, name="rerank-tiles", daemon=True)
    worker.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            span, t, buf = item
            yield span, t
            free.put(buf)
    finally:
        stop.set()
        free.put(torch.empty(0))  # wakes a producer waiting for a buffer
        worker.join()


def distance_pass(x: torch.Tensor, nq: int, k1: int, block_rows: int = 1024, threads: int = 1,
                  gemm_threads: int = 1):
    """Top ``k1 + 1`` neighbours (indices, distances) and row maxima of all rows, and the
    normalised query x gallery block, from square tiles of the distance matrix.

    Each tile on or above the diagonal is computed once (the matrix is symmetric) and used for its
    rows and, transposed, for its columns, then dropped: one tile exists at a time. Each row keeps
    its ``k1 + 1`` best so far; a tile offers a row only the entries not above its current
    ``k1 + 1``-th best, which after the row's own diagonal tile are few.
    """
    N = x.shape[0]
    K = k1 + 1
    b = min(block_rows, N)
    sq = x.pow(2).sum(1)
    best = torch.full((N, K), _PAD)
    tau = torch.full((N,), float("inf"))
    rowmax = torch.full((N,), float("-inf"))
    qg = torch.empty(nq, N - nq)
    starts = range(0, N, b)
    diagonal = [(s, min(N, s + b), s, min(N, s + b)) for s in starts]
    upper = [(s, min(N, s + b), c, min(N, c + b)) for s in starts for c in starts if c > s]

    def offer(rows, cols, vals, r0, c0):
        if rows.numel():
            _offer(best, tau, rows + r0, _order_keys(vals, cols + c0))

    for (s, e, c, f), t in _tiles(x, sq, diagonal + upper, b, threads, gemm_threads):
        if s < nq and f > nq:  # the raw query x gallery part; normalised once row maxima are known
            qe, c0 = min(e, nq), max(c, nq)
            qg[s:qe, c0 - nq:f - nq] = t[:qe - s, c0 - c:]
        rows_mm = _chunk_minmax(t, False)  # chunk minima (for the thresholds) and maxima in one pass
        rmax = t.amax(1) if rows_mm is None else rows_mm.max.amax(1)
        rmin = None if rows_mm is None else rows_mm.min
        if s == c:  # diagonal tiles come first: each row starts from the best of its own block
            rowmax[s:e] = rmax
            # A bound on each row's K-th smallest entry: the K-th smallest of K or more chunk
            # minima (distinct entries) is not below it, and is 32 times cheaper to find.
            if rmin is not None and rmin.shape[1] >= K:
                kth = rmin.topk(K, dim=1, largest=False).values[:, -1]
            else:
                kth = t.topk(K, dim=1, largest=False).values[:, -1] if e - s > K else tau[s:e]
            r, j = _survivors(t, kth, False, rmin)
            offer(r, j, t[r, j], s, s)
            continue
        cols_mm = _chunk_minmax(t, True)
        torch.maximum(rowmax[s:e], rmax, out=rowmax[s:e])
        torch.maximum(rowmax[c:f], t.amax(0) if cols_mm is None else cols_mm.max.amax(0), out=rowmax[c:f])
        r, j = _survivors(t, tau[s:e], False, rmin)
        offer(r, j, t[r, j], s, c)
        r, j = _survivors(t, tau[c:f], True, None if cols_mm is None else cols_mm.min)
        offer(j, r, t[r, j], c, s)
    qg.div_(rowmax[:nq, None])
    return sq, best & 0xFFFFFFFF, _key_values(best), rowmax, qg
