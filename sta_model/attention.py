"""Parameter-free spatial-temporal attention of STA (Fu et al., AAAI 2019).

Shapes follow the project convention: features ``(B, N, C, H, W)`` for B clips of N frames.
The normalisations run in at least float32 so that bf16/fp16 training does not underflow the
eps guards or lose the small per-position energies.
"""
from __future__ import annotations

from typing import Sequence

import torch

EPS = 1e-12
FUSION_MODES = ("max", "avg")
# How a frame's spatial map is read from its features (both normalised to sum to 1 over positions):
# "energy" is the transcribed paper equation, sum_c f^2; "l2" is its square root, the channel l2 norm
# that the public re-implementation (AGRL.pytorch) uses. l2 is flatter, so one bright occluder
# position takes a smaller share of the map.
ATTENTION_MAPS = ("energy", "l2")


def _check_feats(feats: torch.Tensor, num_blocks: int) -> None:
    if feats.dim() != 5:
        raise ValueError(f"expected features of shape (B, N, C, H, W), got {tuple(feats.shape)}")
    if not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
    if feats.shape[3] % num_blocks != 0:
        raise ValueError(
            f"feature height {feats.shape[3]} is not divisible by num_blocks={num_blocks}; "
            "choose the input height so that height / trunk.stride is a multiple of num_blocks")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def spatial_temporal_attention(feats: torch.Tensor, num_blocks: int, eps: float = EPS,
                                attention_map: str = "energy"):
    """Spatial maps and frame-normalised stripe scores (paper eq. 1 and steps 2-4).

    Args:
        feats (torch.Tensor): ``(B, N, C, H, W)`` frame feature maps.
        num_blocks (int): number K of horizontal stripes; must divide H.
        eps (float): guard for all-zero frames/stripes.
        attention_map (str): ``"energy"`` (``sum_c f^2``, the paper's equation as transcribed) or
            ``"l2"`` (``sqrt(sum_c f^2)``, AGRL.pytorch's reading), normalised over positions.

    Examples::

        >>> g, S = spatial_temporal_attention(torch.rand(2, 4, 8, 8, 4), num_blocks=4, attention_map="l2")
        >>> g.shape, S.shape
        (torch.Size([2, 4, 8, 4]), torch.Size([2, 4, 4]))

    Returns:
        tuple: ``g`` ``(B, N, H, W)``, each frame's map summing to 1 over positions (0 for an
        all-zero frame), and ``S`` ``(B, N, K)`` with each column summing to 1 over the N frames
        (uniform 1/N where every frame is zero in that stripe). Both in float32 or float64.
    """
    _check_feats(feats, num_blocks)
    if attention_map not in ATTENTION_MAPS:
        raise ValueError(f"attention_map must be one of {ATTENTION_MAPS}, got {attention_map!r}")
    B, N, C, H, W = feats.shape
    energy = _upcast(feats).pow(2).sum(2)  # (B, N, H, W)
    if attention_map == "l2":
        # sqrt has an infinite slope at 0: the clamp keeps dead positions' gradient finite.
        energy = energy.clamp_min(eps * eps).sqrt()
    g = energy / energy.sum((2, 3), keepdim=True).clamp_min(eps)
    s = g.reshape(B, N, num_blocks, (H // num_blocks) * W).sum(3)  # (B, N, K)
    # eps in numerator and denominator: exact ratio for normal inputs, uniform 1/N for dead stripes.
    S = (s + eps) / (s.sum(1, keepdim=True) + N * eps)
    return g, S


def fuse(feats: torch.Tensor, S: torch.Tensor, num_blocks: int,
         modes: Sequence[str] = FUSION_MODES) -> torch.Tensor:
    """Fuse the N frame maps into clip maps stripe by stripe (paper step 6).

    Args:
        feats (torch.Tensor): ``(B, N, C, H, W)`` frame feature maps.
        S (torch.Tensor): ``(B, N, K)`` stripe scores from :func:`spatial_temporal_attention`.
        num_blocks (int): K.
        modes (sequence of str): which fused maps to build, in output order; ``"max"`` takes,
            per stripe, the frame with the highest score (first one on ties), ``"avg"`` the
            score-weighted sum over frames. The paper uses ``("max", "avg")``.

    Returns:
        torch.Tensor: ``(B, C * len(modes), H, W)`` in the dtype of ``feats``.
    """
    _check_feats(feats, num_blocks)
    B, N, C, H, W = feats.shape
    K = num_blocks
    if tuple(S.shape) != (B, N, K):
        raise ValueError(f"expected scores of shape {(B, N, K)}, got {tuple(S.shape)}")
    modes = tuple(modes)
    if not modes or any(m not in FUSION_MODES for m in modes) or len(set(modes)) != len(modes):
        raise ValueError(f"modes must be a non-empty subset of {FUSION_MODES} without repeats, got {modes}")
    blocks = feats.reshape(B, N, C, K, H // K, W)
    out = []
    for mode in modes:
        if mode == "max":
            n_star = S.argmax(1)  # (B, K), first maximum on ties
            b_idx = torch.arange(B, device=feats.device)[:, None]
            k_idx = torch.arange(K, device=feats.device)[None, :]
            # Advanced indices on dims 0, 1, 3 -> result (B, K, C, H/K, W).
            x = blocks[b_idx, n_star, :, k_idx]
            x = x.permute(0, 2, 1, 3, 4)
        else:
            x = torch.einsum("bnk,bnckhw->bckhw", S.to(feats.dtype), blocks)
        out.append(x.reshape(B, C, H, W))
    return out[0] if len(out) == 1 else torch.cat(out, 1)


def inter_frame_regularization(g: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Inter-frame regularisation ``||g_i - g_j||_F`` for two random frames ``i != j`` per clip.

    Args:
        g (torch.Tensor): ``(B, N, H, W)`` spatial maps.
        generator (torch.Generator, optional): CPU generator for the frame draw (reproducibility).

    Returns:
        torch.Tensor: scalar, mean over the B clips; a graph-connected zero when N == 1.
    """
    if g.dim() != 4:
        raise ValueError(f"expected spatial maps of shape (B, N, H, W), got {tuple(g.shape)}")
    B, N = g.shape[:2]
    if N < 2 or B == 0:
        return g.sum() * 0  # keeps the graph (and DDP's used-parameter bookkeeping) intact
    i = torch.randint(0, N, (B,), generator=generator)
    j = (i + torch.randint(1, N, (B,), generator=generator)) % N  # uniform over j != i
    ar = torch.arange(B)
    i, j, ar = i.to(g.device), j.to(g.device), ar.to(g.device)
    diff = g[ar, i] - g[ar, j]
    return torch.linalg.vector_norm(diff.flatten(1), dim=1).mean()
