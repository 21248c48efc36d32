"""Training losses: batch-hard triplet, (label-smoothed) cross-entropy, and their combination.

Every loss runs in float32 (or float64 if given) regardless of autocast/bf16 inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def triplet_loss(embeddings: torch.Tensor, pids: torch.Tensor, margin: float = 0.3,
                 soft_margin: bool = False) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al., 2017) on Euclidean distances.

    For each anchor the hardest positive (farthest same-pid sample, the anchor itself if it is the
    only one) and hardest negative (closest other-pid sample) are used:
    ``relu(d_ap - d_an + margin)``, or ``softplus(d_ap - d_an)`` with ``soft_margin``.
    Anchors without any negative are left out; the result is 0 (graph-connected) if none remain.

    Args:
        embeddings (torch.Tensor): ``(B, D)``.
        pids (torch.Tensor): ``(B,)`` identity labels.
        margin (float): hinge margin (ignored with ``soft_margin``).
        soft_margin (bool): use the soft-margin (softplus) form.

    Returns:
        torch.Tensor: scalar mean over anchors.
    """
    x = _upcast(embeddings)
    sq = x.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.t()).clamp(min=1e-12)
    dist = d2.sqrt()  # gradient is 0 where clamped (the diagonal), never inf
    same = pids[:, None] == pids[None, :]
    d_ap = dist.masked_fill(~same, float("-inf")).amax(1)
    d_an = dist.masked_fill(same, float("inf")).amin(1)
    valid = torch.isfinite(d_an)
    if not bool(valid.any()):
        return x.sum() * 0
    diff = d_ap[valid] - d_an[valid]
    loss = F.softplus(diff) if soft_margin else F.relu(diff + margin)
    return loss.mean()


def cross_entropy(logits: torch.Tensor, pids: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Softmax cross-entropy with optional label smoothing.

    Smoothing targets are ``(1 - eps) * onehot + eps / num_classes`` (Szegedy et al., as in
    torchreid's CrossEntropyLabelSmooth).
    """
    return F.cross_entropy(_upcast(logits), pids, label_smoothing=label_smoothing)


def combined_loss(outputs: dict, pids: torch.Tensor, *, w_tri: float = 1.0, w_ce: float = 1.0,
                  lambda_reg: float = 3e-4, margin: float = 0.3, soft_margin: bool = False,
                  label_smoothing: float = 0.0) -> dict:
    """Paper objective ``w_tri * triplet + w_ce * ce + lambda_reg * reg``.

    Args:
        outputs (dict): the train-mode dict of a model; uses ``"features"`` (pre-BN embedding)
            for the triplet term, ``"logits"`` for CE and ``"reg"`` (may be None) for the
            inter-frame regularisation.
        pids (torch.Tensor): ``(B,)`` training labels.

    Returns:
        dict: ``{"triplet", "ce", "reg", "total"}`` scalar tensors.
    """
    tri = triplet_loss(outputs["features"], pids, margin=margin, soft_margin=soft_margin)
    ce = cross_entropy(outputs["logits"], pids, label_smoothing=label_smoothing)
    reg = outputs.get("reg")
    reg = ce.new_zeros(()) if reg is None else _upcast(reg)
    total = w_tri * tri + w_ce * ce + lambda_reg * reg
    return {"triplet": tri, "ce": ce, "reg": reg, "total": total}
