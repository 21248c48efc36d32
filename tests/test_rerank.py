"""Tests for sta_model.rerank.re_ranking against the loop version of the original algorithm."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _loop_baselines import re_ranking_loop  # noqa: E402

from sta_model.rerank import re_ranking  # noqa: E402


def _clustered(rng, n, n_ids, dim, noise):
    centres = rng.standard_normal((n_ids, dim))
    return (centres[rng.integers(0, n_ids, n)] + noise * rng.standard_normal((n, dim))).astype(np.float32)


@pytest.mark.parametrize("k1, k2, lam", [(20, 6, 0.3), (6, 3, 0.5), (5, 1, 0.0), (9, 10, 1.0)])
def test_matches_loop_algorithm(k1, k2, lam):
    rng = np.random.default_rng(k1)
    feats = _clustered(rng, 90, 12, 16, 0.7)
    q, g = feats[:30], feats[30:]
    ours = re_ranking(q, g, k1=k1, k2=k2, lambda_value=lam)
    ref = re_ranking_loop(q, g, k1=k1, k2=k2, lambda_value=lam)
    assert ours.dtype == np.float32 and ours.shape == (30, 60)
    assert np.abs(ours - ref).max() <= 1e-4


def test_small_blocks_and_torch_input():
    rng = np.random.default_rng(3)
    feats = _clustered(rng, 80, 10, 8, 0.5)
    ref = re_ranking_loop(feats[:20], feats[20:])
    ours = re_ranking(torch.from_numpy(feats[:20]), torch.from_numpy(feats[20:]), block_rows=7, pair_budget=50)
    assert np.abs(ours - ref).max() <= 1e-4


def test_lambda_one_is_normalised_distance():
    rng = np.random.default_rng(4)
    q, g = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((40, 4)).astype(np.float32)
    x = np.concatenate([q, g]).astype(np.float64)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    expected = (d / d.max(1, keepdims=True))[:5, 5:]
    np.testing.assert_allclose(re_ranking(q, g, k1=5, k2=2, lambda_value=1.0), expected, atol=1e-5)


def test_bad_arguments():
    q = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError):
        re_ranking(q, np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError):
        re_ranking(q, np.zeros((5, 4), np.float32), k1=20)


@pytest.mark.parametrize("chunk", [4, 32])
def test_smallest_matches_stable_sort(chunk):
    """The chunked top-k of the distance pass: same values and indices as a stable sort, ties
    (here many) by lower column index, for one or two column parts with leftover columns."""
    from sta_model.rerank import _smallest
    g = torch.Generator().manual_seed(0)
    d = torch.randint(0, 30, (60, 301), generator=g).float()
    d[:5] = 7.0  # whole rows tied
    ref = torch.sort(d, dim=1, stable=True)
    for k in (1, 21, 40):
        for cut in (None, 3, 37, 128, 300):
            parts = [(d, 0)] if cut is None else [(d[:, :cut], 0), (d[:, cut:], cut)]
            v, i = _smallest(parts, k, chunk=chunk)
            assert torch.equal(v, ref.values[:, :k]) and torch.equal(i, ref.indices[:, :k]), (k, cut)


def test_distance_pass_ties_by_index():
    """Integer features (exact distances, many exact ties, duplicates): the blocked pass gives the
    neighbours of a stable sort of the full matrix, its row maxima and the query x gallery block."""
    from sta_model.rerank import _pass_distances
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-2, 3, (150, 6), generator=g).float()
    x[100:] = x[:50]
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    ref = torch.sort(d, dim=1, stable=True)
    for block_rows in (16, 37, 512):
        sq, top, topv, rowmax, qg = _pass_distances(x, 40, 20, block_rows)
        assert torch.equal(top, ref.indices[:, :21]) and torch.equal(topv, ref.values[:, :21])
        assert torch.equal(rowmax, d.amax(1))
        torch.testing.assert_close(qg, d[:40, 40:] / d[:40].amax(1, keepdim=True))
