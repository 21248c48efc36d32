"""Pairwise distances between feature sets (the one place that defines them)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from sta_model.threads import intra_op_threads


def _as_tensor(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x


def euclidean_squared(a, b, num_threads: Optional[int] = None) -> torch.Tensor:
    """Squared Euclidean distances between the rows of ``a`` and ``b``.

    Args:
        a (torch.Tensor or np.ndarray): ``(m, d)`` features.
        b (torch.Tensor or np.ndarray): ``(n, d)`` features.
        num_threads (int or None): torch intra-op threads; None: the CPUs idle now (``sta_model.threads``).

    Returns:
        torch.Tensor: ``(m, n)`` distances ``|a_i|^2 + |b_j|^2 - 2 a_i.b_j``, clamped at 0
        (the expansion can go slightly negative by rounding).
    """
    a, b = _as_tensor(a), _as_tensor(b)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected (m, d) and (n, d) features, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.is_cuda:
        num_threads = num_threads or torch.get_num_threads()  # GPU work: no CPU threads to choose
    with intra_op_threads(num_threads):
        aa = a.pow(2).sum(1, keepdim=True)
        bb = b.pow(2).sum(1, keepdim=True).t()
        return torch.addmm(aa + bb, a, b.t(), beta=1, alpha=-2).clamp_(min=0)


def cosine_distance(a, b, num_threads: Optional[int] = None) -> torch.Tensor:
    """Cosine distances ``1 - cos(a_i, b_j)`` between the rows of ``a`` and ``b``.

    Args:
        a (torch.Tensor or np.ndarray): ``(m, d)`` features.
        b (torch.Tensor or np.ndarray): ``(n, d)`` features.
        num_threads (int or None): torch intra-op threads; None: the CPUs idle now (``sta_model.threads``).

    Returns:
        torch.Tensor: ``(m, n)`` distances in ``[0, 2]``.
    """
    a, b = _as_tensor(a), _as_tensor(b)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected (m, d) and (n, d) features, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.is_cuda:
        num_threads = num_threads or torch.get_num_threads()
    with intra_op_threads(num_threads):
        return 1 - F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()
