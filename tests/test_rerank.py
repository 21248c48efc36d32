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


def test_threads_give_the_same_result():
    """Blocks taken by threads (tile products ahead in a thread, Jaccard blocks in a pool) change
    nothing: the same result as one thread, bit for bit."""
    rng = np.random.default_rng(5)
    feats = _clustered(rng, 300, 20, 16, 0.6)
    before = torch.get_num_threads()
    one = re_ranking(feats[:60], feats[60:], block_rows=64, pair_budget=500, num_threads=1)
    two = re_ranking(feats[:60], feats[60:], block_rows=64, pair_budget=500, num_threads=2)
    assert np.array_equal(one, two)
    assert torch.get_num_threads() == before  # the caller's intra-op setting is put back


def test_non_finite_features_are_refused():
    q = np.zeros((3, 4), np.float32)
    g = np.ones((30, 4), np.float32)
    g[7, 2] = np.nan
    with pytest.raises(ValueError, match="finite"):
        re_ranking(q, g, k1=5)
