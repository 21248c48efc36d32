"""STA and temporal-pooling video re-ID models.

Both share the same trunk and head:
pooled clip feature -> FC (``embed_dim``) -> BatchNorm1d -> classifier (no bias).
The FC output *before* the BN is returned as ``"features"`` and is what the batch-hard triplet
loss uses (BNNeck style, Luo et al. 2019); the BN output is ``"embedding"``, fed to the
classifier and returned in eval mode for retrieval.

``channels_last=True`` makes only the frames fed to the trunk NHWC, never the parameters: the
convolutions then run NHWC anyway (cuDNN/oneDNN take the layout from the input and convert each
weight per call, MBs against the activations' GBs), and the parameters keep the default strides
that DeepSpeed needs (its initial broadcast views every parameter as bytes, which fails for NHWC
conv weights, and ZeRO re-points parameters into flat contiguous buffers). A plain PyTorch loop
may also call ``model.to(memory_format=torch.channels_last)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .attention import ATTENTION_MAPS, FUSION_MODES, fuse, inter_frame_regularization, spatial_temporal_attention
from .backbone import build_trunk


class _Head(nn.Module):
    """FC -> BN -> classifier; returns (features, embedding, logits)."""

    def __init__(self, in_dim: int, embed_dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, embed_dim)
        self.bn = nn.BatchNorm1d(embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes, bias=False)
        nn.init.kaiming_normal_(self.fc.weight, mode="fan_out")
        nn.init.zeros_(self.fc.bias)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, x: torch.Tensor):
        features = self.fc(x)
        embedding = self.bn(features)
        return features, embedding, self.classifier(embedding)


def _frame_features(trunk: nn.Module, clips: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    if clips.dim() != 5:
        raise ValueError(f"expected clips of shape (B, N, 3, H, W), got {tuple(clips.shape)}")
    B, N = clips.shape[:2]
    frames = clips.flatten(0, 1)
    if channels_last:
        # Convolutions take their layout from the input (cuDNN/oneDNN pick NHWC when the input or
        # the weight is NHWC), so every activation of the trunk stays channels_last from here on.
        frames = frames.contiguous(memory_format=torch.channels_last)
    f = trunk(frames)
    return f.reshape(B, N, *f.shape[1:])


class STA(nn.Module):
    """Spatial-Temporal Attention network (Fu et al., AAAI 2019).

    Args:
        num_classes (int): training identities.
        trunk (str): ``"resnet50"`` (paper), ``"resnet18"`` or ``"tiny"``.
        num_blocks (int): K horizontal stripes; must divide the trunk's output height.
        embed_dim (int): embedding size D (1024 in the paper).
        pretrained (str, optional): trunk weights path/URL (torchvision layout).
        last_stride (int): stride of the trunk's last stage.
        fusion (sequence of str): fused maps to concatenate, ``("max", "avg")`` in the paper.
        channels_last (bool): feed the trunk NHWC (``torch.channels_last``) frames, the fast conv
            layout for half-precision tensor cores; same outputs (module docstring).
        attention_map (str): ``"energy"`` (paper equation) or ``"l2"`` (AGRL.pytorch), see
            :func:`~sta_model.attention.spatial_temporal_attention`.

    Input ``(B, N, 3, H, W)`` with any N >= 1. Train mode returns a dict with ``logits (B, P)``,
    ``embedding (B, D)`` (post-BN), ``features (B, D)`` (pre-BN, for the triplet loss),
    ``spatial_maps (B, N, h, w)``, ``scores (B, N, K)`` and ``reg`` (scalar); eval mode returns
    the embedding ``(B, D)``.
    """

    def __init__(self, num_classes: int, trunk: str = "resnet50", num_blocks: int = 4, embed_dim: int = 1024,
                 pretrained: str | None = None, last_stride: int = 1, fusion: Sequence[str] = FUSION_MODES,
                 channels_last: bool = False, attention_map: str = "energy"):
        super().__init__()
        fusion = tuple(fusion)
        if attention_map not in ATTENTION_MAPS:
            raise ValueError(f"attention_map must be one of {ATTENTION_MAPS}, got {attention_map!r}")
        self.attention_map = attention_map
        if not fusion or any(m not in FUSION_MODES for m in fusion) or len(set(fusion)) != len(fusion):
            raise ValueError(f"fusion must be a non-empty subset of {FUSION_MODES}, got {fusion}")
        self.trunk = build_trunk(trunk, last_stride=last_stride, pretrained=pretrained)
        self.channels_last = channels_last
        self.num_blocks = num_blocks
        self.fusion = fusion
        self.head = _Head(self.trunk.out_channels * len(fusion), embed_dim, num_classes)

    def forward(self, clips: torch.Tensor):
        feats = _frame_features(self.trunk, clips, self.channels_last)
        g, S = spatial_temporal_attention(feats, self.num_blocks, attention_map=self.attention_map)
        x = fuse(feats, S, self.num_blocks, self.fusion).mean((2, 3))
        features, embedding, logits = self.head(x)
        if not self.training:
            return embedding
        return {"logits": logits, "embedding": embedding, "features": features,
                "spatial_maps": g, "scores": S, "reg": inter_frame_regularization(g)}


class TemporalPooling(nn.Module):
    """Baseline: temporal average of frame maps, global average pool, same head as :class:`STA`.

    Train mode returns the same dict as :class:`STA` with ``spatial_maps``/``scores`` None and
    ``reg`` a zero tensor. ``channels_last`` as for :class:`STA`.
    """

    def __init__(self, num_classes: int, trunk: str = "resnet50", embed_dim: int = 1024,
                 pretrained: str | None = None, last_stride: int = 1, channels_last: bool = False):
        super().__init__()
        self.trunk = build_trunk(trunk, last_stride=last_stride, pretrained=pretrained)
        self.channels_last = channels_last
        self.head = _Head(self.trunk.out_channels, embed_dim, num_classes)

    def forward(self, clips: torch.Tensor):
        feats = _frame_features(self.trunk, clips, self.channels_last)
        features, embedding, logits = self.head(feats.mean((1, 3, 4)))
        if not self.training:
            return embedding
        return {"logits": logits, "embedding": embedding, "features": features,
                "spatial_maps": None, "scores": None, "reg": logits.new_zeros(())}


MODELS = {"sta": STA, "temporal_pooling": TemporalPooling}
_STA_ONLY = ("num_blocks", "fusion", "attention_map")


def build_model(kind: str, num_classes: int, **kw) -> nn.Module:
    """Build a model by name.

    Args:
        kind (str): ``"sta"`` or ``"temporal_pooling"``.
        num_classes (int): training identities.
        **kw: constructor arguments. For ``"temporal_pooling"`` the STA-only keys ``num_blocks``
            and ``fusion`` are dropped so one config section can serve both kinds.
    """
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {tuple(MODELS)}")
    if kind == "temporal_pooling":
        kw = {k: v for k, v in kw.items() if k not in _STA_ONLY}
    return MODELS[kind](num_classes, **kw)
