"""Training losses: batch-hard triplet, (label-smoothed) cross-entropy, and their combination.

Every loss runs in float32 (or float64 if given) regardless of autocast/bf16 inputs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
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


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """All ranks' rows of ``x`` concatenated in rank order (row counts may differ between ranks), and
    ``(first row, rows)`` of this rank's part."""
    rank, world = _world()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = x.new_zeros((max(sizes) - x.shape[0], *x.shape[1:]))
    parts = [x.new_empty((max(sizes), *x.shape[1:])) for _ in range(world)]
    dist.all_gather(parts, torch.cat([x.detach(), pad]).contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), (sum(sizes[:rank]), sizes[rank])


class _GatherRows(torch.autograd.Function):
    """Backward sums the gradient of the gathered tensor over ranks and returns this rank's rows: every
    rank computes the same loss on the same gathered batch, so after the data-parallel gradient average
    each rank's rows get exactly the gradient that one process holding the whole batch gives them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out, ctx.rows = _all_gather_rows(x)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start, n = ctx.rows
        return grad[start:start + n]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` ``(B_r, ...)`` over the ranks of the default process group, in rank order.

    Floating tensors keep the gradient of this rank's rows (see :class:`_GatherRows`); integer tensors
    (labels) are gathered as data. Without a process group (or with one rank) ``x`` is returned.

    Examples::

        >>> feats, pids = gather_rows(out["features"]), gather_rows(pids)  # the global P x K batch
    """
    if _world()[1] == 1:
        return x
    if x.is_floating_point():
        return _GatherRows.apply(x)
    return _all_gather_rows(x)[0]


def cross_entropy(logits: torch.Tensor, pids: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Softmax cross-entropy with optional label smoothing.

    Smoothing targets are ``(1 - eps) * onehot + eps / num_classes`` (Szegedy et al., as in
    torchreid's CrossEntropyLabelSmooth).
    """
    return F.cross_entropy(_upcast(logits), pids, label_smoothing=label_smoothing)


def combined_loss(outputs: dict, pids: torch.Tensor, *, w_tri: float = 1.0, w_ce: float = 1.0,
                  lambda_reg: float = 3e-4, margin: float = 0.3, soft_margin: bool = False,
                  label_smoothing: float = 0.0, global_batch: bool = False) -> dict:
    """Paper objective ``w_tri * triplet + w_ce * ce + lambda_reg * reg``.

    Args:
        outputs (dict): the train-mode dict of a model; uses ``"features"`` (pre-BN embedding)
            for the triplet term, ``"logits"`` for CE and ``"reg"`` (may be None) for the
            inter-frame regularisation.
        pids (torch.Tensor): ``(B,)`` training labels.
        global_batch (bool): under data parallelism, mine the batch-hard triplets over the batch of
            all ranks (:func:`gather_rows`), so a step's triplet term is the one of a single
            process holding the whole P x K batch (fast-reid gathers across GPUs for the same reason).
            CE and Reg are per-sample means, which the gradient average already makes global.

    Returns:
        dict: ``{"triplet", "ce", "reg", "total"}`` scalar tensors.
    """
    feats = outputs["features"]
    if global_batch:
        feats, tri_pids = gather_rows(feats), gather_rows(pids)
    else:
        tri_pids = pids
    tri = triplet_loss(feats, tri_pids, margin=margin, soft_margin=soft_margin)
    ce = cross_entropy(outputs["logits"], pids, label_smoothing=label_smoothing)
    reg = outputs.get("reg")
    reg = ce.new_zeros(()) if reg is None else _upcast(reg)
    total = w_tri * tri + w_ce * ce + lambda_reg * reg
    return {"triplet": tri, "ce": ce, "reg": reg, "total": total}
