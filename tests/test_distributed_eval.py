"""pipeline.distributed_eval: per-tracklet embedding averages over the real eval stream, scoring, table."""
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.distributed_eval import SplitFeatures, extract, format_table, score
from pipeline.eval_data import eval_loader

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pipeline.train import prepare_data

    base = tmp_path_factory.mktemp("evaltiny")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.root={base}/raw", f"data.shards={base}/shards",
                                                       "eval.clips_per_batch=3"])
    prepare_data(cfg)
    return cfg


def _forward(clips: torch.Tensor) -> torch.Tensor:
    """A deterministic 'model': per-channel mean of each clip (normalised input), D = 3."""
    return clips.float().mean(dim=(1, 3, 4))


def test_extract_averages_clip_embeddings_per_tracklet(tiny):
    got = extract(_forward, tiny, "gallery", embed_dim=3)
    # Independent reference: group the stream's clips by tracklet index in Python and average.
    per: dict[int, list] = {}
    meta: dict[int, tuple] = {}
    for b in eval_loader(tiny.data.shards, "gallery", clip_len=tiny.eval.clip_len, height=tiny.data.height,
                         width=tiny.data.width, num_workers=0, clips_per_batch=3):
        for i, idx in enumerate(b["index"].tolist()):
            per.setdefault(idx, []).append(_forward(b["clips"][i:i + 1])[0])
            meta[idx] = (int(b["pids"][i]), int(b["camids"][i]))
    assert sorted(per) == list(range(len(got.feats)))
    for idx, embs in per.items():
        torch.testing.assert_close(got.feats[idx], torch.stack(embs).mean(0), rtol=1e-5, atol=1e-6)
        assert (got.pids[idx], got.camids[idx]) == meta[idx]
    assert any(len(v) > 1 for v in per.values())  # several clips per tracklet were really averaged
    assert got.skipped == 0


def test_extract_leaves_out_and_counts_tracklets_without_a_clip(tiny):
    # One rank of two without the all-reduce sees only its slice: the others have no clip (as when all
    # of a tracklet's frames are corrupt). They are left out and counted, never scored as zeros.
    full = extract(_forward, tiny, "query", embed_dim=3)
    half = extract(_forward, tiny, "query", embed_dim=3, rank=0, world_size=2)
    assert 0 < half.skipped_tracklets < len(full.feats) and full.skipped_tracklets == 0
    assert len(half.feats) == len(full.feats) - half.skipped_tracklets
    assert not (half.feats == 0).all(1).any() and (half.pids >= 0).all()


def test_score_ranks_and_rerank():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 8)).astype(np.float32)
    q = SplitFeatures(torch.from_numpy(centers + 0.01), np.arange(5), np.zeros(5, dtype=int), 0)
    g_pids = np.repeat(np.arange(5), 3)
    g = SplitFeatures(torch.from_numpy(centers[g_pids] + rng.normal(scale=0.05, size=(15, 8)).astype(np.float32)),
                      g_pids, np.ones(15, dtype=int), 0)
    out = score(q, g, rerank=True, k1=4, k2=2)
    assert out["rank1"] == 1.0 and out["mAP"] == pytest.approx(1.0)
    assert out["rr_rank1"] == 1.0 and len(out["cmc"]) == 15
    table = format_table(out)
    assert "plain" in table and "re-ranked" in table and "100.0" in table


def test_score_counts_queries_without_a_cross_camera_match():
    """Query 0's only true match is in its own camera (removed by the protocol), query 1's true match
    is in another camera, query 2's identity is not in the gallery at all: 2 queries skipped."""
    feats = torch.eye(3, 4)
    q = SplitFeatures(feats, np.array([0, 1, 2]), np.array([0, 0, 0]), 0)
    g = SplitFeatures(torch.eye(4), np.array([0, 1, 1, 3]), np.array([0, 1, 0, 1]), 0)
    out = score(q, g)
    assert out["skipped_queries"] == 2
    assert out["rank1"] == 1.0  # scored over query 1 alone


def test_extract_prints_progress_on_rank_0(tiny, capsys):
    got = extract(_forward, tiny, "gallery", embed_dim=3, progress_every_s=0)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("evaluation: embedding gallery")]
    n = len(got.feats)
    assert lines and lines[-1].startswith(f"evaluation: embedding gallery tracklets (rank 0): {n}/{n} (")
    done = [int(l.split(": ")[2].split("/")[0]) for l in lines]
    assert done == sorted(done)  # counts tracklets, not clips: never past the total
    extract(_forward, tiny, "gallery", embed_dim=3, rank=1, world_size=2, progress_every_s=0)
    assert "evaluation: embedding" not in capsys.readouterr().out  # other ranks stay quiet
    extract(_forward, tiny, "gallery", embed_dim=3)  # the default: a short set prints nothing
    assert "evaluation: embedding" not in capsys.readouterr().out
