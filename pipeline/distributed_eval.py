"""Distributed evaluation: every rank embeds a disjoint slice of query/gallery, rank 0 scores.

Tracklet embeddings are the mean of their clip embeddings (DESIGN.md §1). Ranks accumulate per-tracklet
sums and clip counts in a ``(num_tracklets, D)`` buffer and one all-reduce combines them, so nothing but
the embeddings (MARS: 11,310 × 1024 float32 ≈ 46 MB) ever crosses the network.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from pipeline import console
from pipeline.config import Config
from pipeline.eval_data import eval_loader
from pipeline.shards import read_manifest
from pipeline.transforms import model_input
from sta_model.distance import euclidean_squared
from sta_model.metrics import evaluate_rank
from sta_model.rerank import re_ranking

RANKS = (1, 5, 10, 20)


@dataclass
class SplitFeatures:
    feats: torch.Tensor  # (n, D) float32, CPU
    pids: np.ndarray
    camids: np.ndarray
    skipped: int
    skipped_tracklets: int = 0  # tracklets with no readable clip: left out of scoring, counted


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def extract(forward: Callable[[torch.Tensor], torch.Tensor], cfg: Config, split: str, *, embed_dim: int,
            rank: int = 0, world_size: int = 1, device: torch.device = torch.device("cpu"),
            dtype: torch.dtype = torch.float32, url: Optional[str] = None,
            progress_every_s: float = 30.0) -> SplitFeatures:
    """Embed every tracklet of ``split``; all ranks return the full, identical result.

    Rank 0 prints a progress line (its tracklets done, rate, ETA) at most every ``progress_every_s``
    seconds, so a long test set (MARS: 11k tracklets) is not a silent wait; short ones print nothing.
    """
    url = url or cfg.data.shards
    manifest = read_manifest(url)  # once: the loader gets it too
    n = manifest.split(split).num_tracklets
    sums = torch.zeros(n, embed_dim, dtype=torch.float32, device=device)
    counts = torch.zeros(n, dtype=torch.float32, device=device)
    # -1 marks "not seen here"; MAX-reduce keeps the one rank's real value.
    meta = torch.full((2, n), -1, dtype=torch.long, device=device)
    skipped = torch.zeros(1, dtype=torch.long, device=device)
    loader = eval_loader(manifest, split, clip_len=cfg.eval.clip_len, height=cfg.data.height, width=cfg.data.width,
                         rank=rank, world_size=world_size, num_workers=cfg.eval.num_workers,
                         clips_per_batch=cfg.eval.clips_per_batch, normalize=False,
                         pin_memory=device.type == "cuda", cache_dir=cfg.data.cache_dir,
                         cache_gb=cfg.data.cache_gb)
    # This rank's share of the tracklets (the loader deals them out evenly); counted on the host.
    progress = console.Progress(f"evaluation: embedding {split} tracklets (rank 0)", -(-n // max(1, world_size)),
                                every_s=progress_every_s) if rank == 0 else None
    seen = np.zeros(n, dtype=bool)
    for batch in loader:
        skipped += int(batch["skipped"])
        if batch["clips"].shape[0] == 0:
            continue
        if progress is not None:
            new_idx = np.unique(batch["index"].numpy())
            progress.update(int((~seen[new_idx]).sum()))
            seen[new_idx] = True
        idx = batch["index"].to(device)
        emb = forward(model_input(batch["clips"], device, dtype)).float()
        sums.index_add_(0, idx, emb)
        counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))
        meta[0, idx] = batch["pids"].to(device)
        meta[1, idx] = batch["camids"].to(device)
    if _distributed():
        dist.all_reduce(sums)
        dist.all_reduce(counts)
        dist.all_reduce(meta, op=dist.ReduceOp.MAX)
        dist.all_reduce(skipped)
    # A tracklet whose frames were all corrupt cannot be scored: it is left out and counted (like
    # corrupt train samples), never scored as zeros and never a reason to lose the run.
    keep = counts > 0
    missing = int((~keep).sum())
    feats = (sums[keep] / counts[keep][:, None]).cpu()
    return SplitFeatures(feats, meta[0][keep].cpu().numpy(), meta[1][keep].cpu().numpy(), int(skipped), missing)


def skipped_queries(q: SplitFeatures, g: SplitFeatures) -> int:
    """Queries left out of CMC/mAP because no gallery tracklet of their identity was seen by another
    camera (torchreid's protocol: same-pid same-camera gallery entries are removed per query).

    MARS has 140 of 1,980 such queries under this protocol; the official MARS evaluation code keeps
    them in its own way, so the two protocols' numbers are not comparable like for like.
    """
    match = (q.pids[:, None] == g.pids[None, :]) & (q.camids[:, None] != g.camids[None, :])
    return int((~match.any(1)).sum())


def score(q: SplitFeatures, g: SplitFeatures, *, rerank: bool = False, max_rank: int = 50,
          k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> dict:
    """Rank-k, mAP (fractions) and the CMC curve; with ``rerank`` also the k-reciprocal re-ranked ones."""
    distmat = euclidean_squared(q.feats, g.feats).numpy()
    max_rank = min(max_rank, distmat.shape[1])
    cmc, mAP = evaluate_rank(distmat, q.pids, g.pids, q.camids, g.camids, max_rank=max_rank)
    out = {"mAP": float(mAP), "cmc": cmc, "skipped_queries": skipped_queries(q, g)}
    out.update({f"rank{r}": float(cmc[r - 1]) for r in RANKS if r <= len(cmc)})
    if rerank:
        rr = re_ranking(q.feats, g.feats, k1=k1, k2=k2, lambda_value=lambda_value)
        rcmc, rmAP = evaluate_rank(rr, q.pids, g.pids, q.camids, g.camids, max_rank=max_rank)
        out.update({"rr_mAP": float(rmAP), "rr_cmc": rcmc})
        out.update({f"rr_rank{r}": float(rcmc[r - 1]) for r in RANKS if r <= len(rcmc)})
    return out


def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], cfg: Config, *, embed_dim: int, rank: int = 0,
             world_size: int = 1, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
             url: Optional[str] = None, rerank: Optional[bool] = None) -> Optional[dict]:
    """Distributed extraction on every rank; metrics dict on rank 0 (None elsewhere)."""
    kw = dict(embed_dim=embed_dim, rank=rank, world_size=world_size, device=device, dtype=dtype, url=url)
    q = extract(forward, cfg, "query", **kw)
    g = extract(forward, cfg, "gallery", **kw)
    if rank != 0:
        return None
    ev = cfg.eval
    out = score(q, g, rerank=ev.rerank if rerank is None else rerank, k1=ev.rerank_k1, k2=ev.rerank_k2,
                lambda_value=ev.rerank_lambda)
    out["eval_skipped"] = q.skipped + g.skipped
    out["eval_skipped_tracklets"] = q.skipped_tracklets + g.skipped_tracklets
    return out


def format_table(metrics: dict) -> str:
    """The metric table printed by the CLIs (percentages)."""
    rows = [("", "mAP", *[f"R{r}" for r in RANKS])]
    for prefix, name in (("", "plain"), ("rr_", "re-ranked")):
        if f"{prefix}mAP" in metrics:
            rows.append((name, *[f"{100 * metrics.get(f'{prefix}{k}', float('nan')):.1f}"
                                 for k in ("mAP", *[f"rank{r}" for r in RANKS])]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)
