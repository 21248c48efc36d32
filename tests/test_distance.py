"""Tests for sta_model.distance."""
import numpy as np
import pytest
import torch

from sta_model.distance import cosine_distance, euclidean_squared


def test_euclidean_squared_matches_pairwise_loop():
    torch.manual_seed(0)
    a, b = torch.randn(5, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    expected = torch.tensor([[float(((a[i] - b[j]) ** 2).sum()) for j in range(4)] for i in range(5)],
                            dtype=torch.float64)
    torch.testing.assert_close(euclidean_squared(a, b), expected)
    assert (euclidean_squared(a, a).diagonal() >= 0).all()
    torch.testing.assert_close(euclidean_squared(a.numpy(), b.numpy()), expected)


def test_euclidean_clamped_for_identical_rows():
    x = torch.full((3, 64), 1234.567)
    assert (euclidean_squared(x, x) >= 0).all()


def test_cosine_distance():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    expected = torch.tensor([[0.0, 2.0, 1 - 2 ** -0.5], [1.0, 1.0, 1 - 2 ** -0.5]])
    torch.testing.assert_close(cosine_distance(a, b), expected)
    torch.testing.assert_close(cosine_distance(np.asarray(a), np.asarray(b)), expected)


def test_shape_errors():
    with pytest.raises(ValueError):
        euclidean_squared(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        cosine_distance(torch.zeros(3), torch.zeros(2, 3))
