"""Pairwise distances between feature sets (the one place that defines them)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _as_tensor(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x


def euclidean_squared(a, b) -> torch.Tensor:
    """Squared Euclidean distances between the rows of ``a`` and ``b``.

    Args:
        a (torch.Tensor or np.ndarray): ``(m, d)`` features.
        b (torch.Tensor or np.ndarray): ``(n, d)`` features.

    Returns:
        torch.Tensor: ``(m, n)`` distances ``|a_i|^2 + |b_j|^2 - 2 a_i.b_j``, clamped at 0
        (the expansion can go slightly negative by rounding).
    """
    a, b = _as_tensor(a), _as_tensor(b)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected (m, d) and (n, d) features, got {tuple(a.shape)} and {tuple(b.shape)}")
    aa = a.pow(2).sum(1, keepdim=True)
    bb = b.pow(2).sum(1, keepdim=True).t()
    return torch.addmm(aa + bb, a, b.t(), beta=1, alpha=-2).clamp_(min=0)


def cosine_distance(a, b) -> torch.Tensor:
    """Cosine distances ``1 - cos(a_i, b_j)`` between the rows of ``a`` and ``b``.

    Args:
        a (torch.Tensor or np.ndarray): ``(m, d)`` features.
        b (torch.Tensor or np.ndarray): ``(n, d)`` features.

    Returns:
        torch.Tensor: ``(m, n)`` distances in ``[0, 2]``.
    """
    a, b = _as_tensor(a), _as_tensor(b)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected (m, d) and (n, d) features, got {tuple(a.shape)} and {tuple(b.shape)}")
    return 1 - F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()
