"""Tests for sta_model.neighbours: the tiled exact nearest-neighbour pass of re-ranking."""
import numpy as np
import pytest
import torch

from sta_model import neighbours
from sta_model.neighbours import distance_pass


def _exact(x):
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    return d, torch.sort(d, dim=1, stable=True)


@pytest.mark.parametrize("threads", [1, 2])
def test_distance_pass_ties_by_index(threads):
    """Integer features (exact distances, many exact ties, duplicate rows): the tiled pass gives
    the neighbours of a stable sort of the full matrix, its row maxima and the query x gallery
    block, for tiles that divide N, do not, or cover it whole, and tiles narrower than k1 + 1."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-2, 3, (150, 6), generator=g).float()
    x[100:] = x[:50]
    d, ref = _exact(x)
    for block in (16, 37, 64, 512):
        _, top, topv, rowmax, qg = distance_pass(x, 40, 20, block, threads)
        assert torch.equal(top, ref.indices[:, :21]) and torch.equal(topv, ref.values[:, :21]), block
        assert torch.equal(rowmax, d.amax(1))
        torch.testing.assert_close(qg, d[:40, 40:] / d[:40].amax(1, keepdim=True))


def test_distance_pass_real_valued_features():
    """Float features: the same neighbours as a full sort of a directly computed matrix."""
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32))
    _, ref = _exact(x.double())
    _, top, topv, _, _ = distance_pass(x, 100, 10, 64)
    assert (top == ref.indices[:, :11]).float().mean() > 0.999  # float32 rounding may swap a near tie
    torch.testing.assert_close(topv.double(), ref.values[:, :11], atol=1e-4, rtol=1e-5)


def test_order_keys_sort_as_value_then_column():
    vals = torch.tensor([0.5, -1.0, 0.0, -0.0, 3.0, -1.0, float("inf"), 0.5, -2.5e-8, 1e-30])
    cols = torch.tensor([9, 4, 7, 1, 0, 2, 3, 8, 5, 6])
    keys = neighbours._order_keys(vals, cols)
    order = torch.argsort(keys)
    expected = sorted(range(len(vals)), key=lambda i: (float(vals[i]), int(cols[i])))
    assert order.tolist() == expected
    assert torch.equal(neighbours._key_values(keys), vals + 0.0)
    assert torch.equal(keys & 0xFFFFFFFF, cols)
    assert neighbours._key_values(torch.tensor([neighbours._PAD])).item() == float("inf")


@pytest.mark.parametrize("shape", [(64, 96), (40, 50), (32, 7), (96, 64)])
def test_survivors_match_a_plain_comparison(shape):
    g = torch.Generator().manual_seed(2)
    t = torch.randint(0, 20, shape, generator=g).float()
    for by_col in (False, True):
        n = shape[1] if by_col else shape[0]
        tau = torch.randint(0, 6, (n,), generator=g).float()
        if by_col:
            cc, rr = (t.t() <= tau[:, None]).nonzero(as_tuple=True)  # ordered by column
        else:
            rr, cc = (t <= tau[:, None]).nonzero(as_tuple=True)
        mm = neighbours._chunk_minmax(t, by_col)
        assert (mm is None) == ((shape[0] if by_col else shape[1]) % 32 != 0)  # the chunked side
        for mins in (None,) if mm is None else (None, mm.min):  # plain, and chunk minima first
            r, c = neighbours._survivors(t, tau, by_col, mins)
            assert torch.equal(r, rr) and torch.equal(c, cc)
        if mm is not None:
            want = t.view(-1, 32, t.shape[1]) if by_col else t.view(t.shape[0], -1, 32)
            assert torch.equal(mm.max, want.amax(1 if by_col else 2))


def test_tile_thread_hands_errors_to_the_caller_and_stops():
    x = torch.randn(40, 4)
    sq = x.pow(2).sum(1)
    spans = [(0, 5, 0, 5), (0, 5, 5, 10), (0, 40, 0, 40)]  # the last does not fit a 5 x 5 buffer
    with pytest.raises(RuntimeError):
        for _ in neighbours._tiles(x, sq, spans, 5, threads=2):
            pass
    it = neighbours._tiles(x, sq, spans[:2] * 20, 5, threads=2)
    (s, e, c, f), t = next(it)
    torch.testing.assert_close(t, ((x[s:e, None] - x[None, c:f]) ** 2).sum(-1), atol=1e-5, rtol=1e-5)
    it.close()  # the consumer stops early: the producer thread ends, nothing hangs
    assert not any(th.name == "rerank-tiles" and th.is_alive() for th in __import__("threading").enumerate())
