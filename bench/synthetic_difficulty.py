"""How hard is the synthetic dataset? Colour-histogram nearest neighbour vs a tiny CNN.

    python bench/synthetic_difficulty.py [--root DIR] [--cnn-seconds 120]

Generates the default synthetic dataset (if needed), then reports query->gallery Rank-1 / mAP of
per-tracklet colour histograms (RGB and HSV, joint bins, Euclidean and chi-square; the best
variant is the baseline's score), and optionally of a tiny CNN trained for a time budget on the
train split (cross-entropy over train ids; test by mean frame embedding, Euclidean). The
synthetic set is meant to be learnable by the CNN but not solved by histograms.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import numpy as np
from PIL import Image

from pipeline.datasets import load_dataset
from pipeline.synthetic import generate


def rank1_map(dist: np.ndarray, q_pids, g_pids, q_cams, g_cams) -> tuple[float, float]:
    """Rank-1 and mAP (fractions); same-pid-same-camera gallery entries are ignored per query."""
    q_pids, g_pids, q_cams, g_cams = map(np.asarray, (q_pids, g_pids, q_cams, g_cams))
    r1, aps = [], []
    for i in range(len(q_pids)):
        keep = ~((g_pids == q_pids[i]) & (g_cams == q_cams[i]))
        order = np.argsort(dist[i][keep], kind="stable")
        match = (g_pids[keep][order] == q_pids[i])
        if not match.any():
            continue
        r1.append(float(match[0]))
        hits = np.cumsum(match)
        aps.append(float(np.mean(hits[match] / (np.flatnonzero(match) + 1))))
    return float(np.mean(r1)), float(np.mean(aps))


def _tracklet_hist(frames, space: str, bins: int, centre: bool, greyworld: bool) -> np.ndarray:
    h = np.zeros(bins ** 3)
    for f in frames:
        a = np.asarray(Image.open(f).convert("RGB")).astype(np.float32)
        if greyworld:  # undo a global colour cast: every channel to the same mean
            a = np.clip(a * (a.mean() / (a.mean((0, 1)) + 1e-3)), 0, 255)
        if centre:  # the person stands in the middle half of the crop
            w = a.shape[1]
            a = a[:, w // 4: w - w // 4]
        im = Image.fromarray(a.astype(np.uint8))
        if space == "hsv":
            im = im.convert("HSV")
        a = (np.asarray(im).reshape(-1, 3).astype(np.int64) * bins) // 256
        h += np.bincount(a[:, 0] * bins * bins + a[:, 1] * bins + a[:, 2], minlength=bins ** 3)
    return h / h.sum()


def histogram_baseline(root: str, name: str = "synthetic") -> dict:
    """Rank-1/mAP of every histogram variant on ``root``; ``best`` is the highest Rank-1."""
    ds = load_dataset(name, root)
    q, g = ds.query, ds.gallery
    out = {}
    variants = itertools.product(("rgb", "hsv"), (4, 8), (False, True), (False, True))
    for space, bins, centre, grey in variants:
        Q = np.stack([_tracklet_hist(t.frames, space, bins, centre, grey) for t in q])
        G = np.stack([_tracklet_hist(t.frames, space, bins, centre, grey) for t in g])
        eucl = np.sqrt(((Q[:, None] - G[None]) ** 2).sum(-1))
        chi2 = (((Q[:, None] - G[None]) ** 2) / (Q[:, None] + G[None] + 1e-12)).sum(-1)
        for dname, dist in (("euclidean", eucl), ("chi2", chi2)):
            r1, mAP = rank1_map(dist, [t.pid for t in q], [t.pid for t in g],
                                [t.camid for t in q], [t.camid for t in g])
            tag = f"{space}{bins}{'_centre' if centre else ''}{'_greyworld' if grey else ''}"
            out[f"{tag}_{dname}"] = {"rank1": r1, "mAP": mAP}
    out["best"] = max(out.items(), key=lambda kv: kv[1]["rank1"])
    return out


def cnn_baseline(root: str, seconds: float, seed: int = 0, name: str = "synthetic") -> dict:
    """Train a tiny CNN on single frames for ``seconds`` of CPU time, evaluate Rank-1/mAP."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(seed)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    ds = load_dataset(name, root)

    def load(t):
        return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in t.frames])

    def to_tensor(a):  # per-image normalisation removes most of a camera's global cast
        x = torch.from_numpy(a).float().permute(0, 3, 1, 2) / 255.0
        m, s = x.mean((2, 3), keepdim=True), x.std((2, 3), keepdim=True) + 1e-3
        return (x - m) / s

    frames, labels = [], []
    for t in ds.train:
        a = load(t)
        frames.append(a)
        labels += [t.pid] * len(a)
    X = to_tensor(np.concatenate(frames))
    y = torch.tensor(labels)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.AdaptiveAvgPool2d((4, 1)), nn.Flatten(), nn.Linear(512, 128), nn.BatchNorm1d(128))
    head = nn.Linear(128, ds.num_train_pids)
    opt = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), lr=3e-3, weight_decay=5e-4)
    t0, steps = time.time(), 0
    g = torch.Generator().manual_seed(seed)
    while time.time() - t0 < seconds:
        idx = torch.randint(len(X), (128,), generator=g)
        xb = X[idx]
        flip = torch.rand(len(xb), generator=g) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        loss = F.cross_entropy(head(net(xb)), y[idx], label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    net.eval()
    with torch.no_grad():
        def embed(ts):
            return torch.stack([F.normalize(net(to_tensor(load(t))), dim=1).mean(0) for t in ts]).numpy()
        Q, G = embed(ds.query), embed(ds.gallery)
    dist = np.sqrt(((Q[:, None] - G[None]) ** 2).sum(-1))
    r1, mAP = rank1_map(dist, [t.pid for t in ds.query], [t.pid for t in ds.gallery],
                        [t.camid for t in ds.query], [t.camid for t in ds.gallery])
    return {"rank1": r1, "mAP": mAP, "train_seconds": round(time.time() - t0, 1), "steps": steps,
            "final_loss": float(loss.detach())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="data/synthetic")
    ap.add_argument("--cnn-seconds", type=float, default=0.0, help="0 = skip the CNN")
    a = ap.parse_args(argv)
    gen = generate(a.root)
    report = {"generation_seconds": gen["seconds"], "reused": gen["reused"], "splits": gen["splits"],
              "histogram": histogram_baseline(a.root)}
    if a.cnn_seconds > 0:
        report["cnn"] = cnn_baseline(a.root, a.cnn_seconds)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
