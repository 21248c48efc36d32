"""The ranked-results figure (torchreid's ``visrank``): a few queries, each with its top-k gallery
tracklets, framed green or red. Rank 0 draws it at the end of training, beside the CMC curve.

It embeds the query and gallery splits once more with the final model (one rank, no collectives),
keeping one small thumbnail per tracklet; the protocol is the evaluation's (same-identity
same-camera gallery entries are left out of each query's ranking).
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import numpy as np
import torch

from pipeline.config import Config

log = logging.getLogger(__name__)
THUMB_HEIGHT = 96  # pixels: enough to recognise a person, small enough for MARS' 9,330-tracklet gallery


def _embed_split(forward: Callable[[torch.Tensor], torch.Tensor], cfg: Config, split: str, device: torch.device,
                 dtype: torch.dtype) -> dict:
    """Mean clip embedding, pid, camid and a thumbnail (first frame) per tracklet of ``split``."""
    from pipeline.eval_data import eval_loader
    from pipeline.transforms import model_input

    loader = eval_loader(cfg.data.shards, split, clip_len=cfg.eval.clip_len, height=cfg.data.height,
                         width=cfg.data.width, num_workers=cfg.eval.num_workers,
                         clips_per_batch=cfg.eval.clips_per_batch, normalize=False, cache_dir=cfg.data.cache_dir,
                         cache_gb=cfg.data.cache_gb)
    step = max(1, cfg.data.height // THUMB_HEIGHT)
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    info: dict[int, tuple[int, int, np.ndarray]] = {}
    with torch.no_grad():
        for batch in loader:
            if batch["clips"].shape[0] == 0:
                continue
            emb = forward(model_input(batch["clips"], device, dtype)).float().cpu()
            for i, idx in enumerate(batch["index"].tolist()):
                sums[idx] = sums[idx] + emb[i] if idx in sums else emb[i].clone()
                counts[idx] = counts.get(idx, 0) + 1
                if idx not in info:  # uint8 (N, H, W, 3) clips: the tracklet's first frame, subsampled
                    frame = batch["clips"][i, 0].numpy()[::step, ::step]
                    info[idx] = (int(batch["pids"][i]), int(batch["camids"][i]), np.ascontiguousarray(frame))
    order = sorted(sums)
    return {"index": order, "feats": torch.stack([sums[i] / counts[i] for i in order]) if order else None,
            "pids": np.array([info[i][0] for i in order]), "camids": np.array([info[i][1] for i in order]),
            "thumbs": [info[i][2] for i in order]}


def ranked_rows(q: dict, g: dict, n_queries: int = 4, topk: int = 10) -> list:
    """Rows for :func:`pipeline.viz.plot_ranked`: ``n_queries`` queries spread over the query set (only
    those with a cross-camera true match), each with its ``topk`` nearest valid gallery tracklets."""
    from sta_model.distance import euclidean_squared

    dist = euclidean_squared(q["feats"], g["feats"]).numpy()
    candidates = []
    for qi in range(len(q["index"])):
        valid = ~((g["pids"] == q["pids"][qi]) & (g["camids"] == q["camids"][qi]))
        if (valid & (g["pids"] == q["pids"][qi])).any():
            candidates.append(qi)
    picks = [candidates[int(j)] for j in np.linspace(0, len(candidates) - 1, min(n_queries, len(candidates)))] \
        if candidates else []
    rows = []
    for qi in picks:
        valid = ~((g["pids"] == q["pids"][qi]) & (g["camids"] == q["camids"][qi]))
        cand = np.flatnonzero(valid)
        best = cand[np.argsort(dist[qi, cand], kind="stable")[:topk]]
        ranked = [(g["thumbs"][gi], bool(g["pids"][gi] == q["pids"][qi]), f"id {g['pids'][gi]} c{g['camids'][gi]}")
                  for gi in best]
        rows.append((q["thumbs"][qi], f"query id {q['pids'][qi]} c{q['camids'][qi]}", ranked))
    return rows


def draw(model: torch.nn.Module, cfg: Config, path: str, *, device: torch.device = torch.device("cpu"),
         dtype: torch.dtype = torch.float32, n_queries: int = 4, topk: int = 10) -> Optional[str]:
    """Embed query and gallery with ``model`` (eval mode) and write the figure; None when no query has
    a true match to show.

    Args:
        model: the final model (returns embeddings in eval mode).
        cfg: the run's config (data, eval loader settings).
        path: PNG to write.
        device, dtype: where and in which precision to embed.
        n_queries: rows of the figure.
        topk: gallery tracklets per row.
    """
    from pipeline import viz

    model.eval()
    q = _embed_split(model, cfg, "query", device, dtype)
    g = _embed_split(model, cfg, "gallery", device, dtype)
    if q["feats"] is None or g["feats"] is None:
        return None
    rows = ranked_rows(q, g, n_queries=n_queries, topk=topk)
    if not rows:
        return None
    return str(viz.plot_ranked(rows, path, title=f"{cfg.name}: top-{topk} gallery tracklets per query "
                                                 f"(green = same identity, red = wrong)"))


def log_visrank(tracker, model: torch.nn.Module, cfg: Config, tmp_dir: str) -> Optional[str]:
    """Draw the figure and log it as ``visrank.png``; a failure only warns (a figure never fails a run).

    Runs on the GPU when the run trains on GPUs (MARS' gallery is 9,330 tracklets), else on the CPU.
    """
    import copy
    import os

    try:
        device = torch.device("cuda") if cfg.scaling.use_gpu and torch.cuda.is_available() else torch.device("cpu")
        net = copy.deepcopy(model).to(device) if device.type != "cpu" else model
        path = draw(net, cfg, os.path.join(tmp_dir, "visrank.png"), device=device)
        if path:
            tracker.log_artifact(path)
        return path
    except Exception as exc:  # noqa: BLE001
        log.warning("ranked-results figure skipped: %s", exc)
        return None
