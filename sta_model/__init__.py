"""STA video re-ID model library (torch/numpy only).

Modules: ``attention`` (parameter-free spatial-temporal attention), ``backbone`` (ResNet/tiny
trunks), ``model`` (STA, TemporalPooling, build_model), ``losses``, ``distance``, ``metrics``
(CMC/mAP), ``rerank`` (k-reciprocal re-ranking).
"""
from .attention import fuse, inter_frame_regularization, spatial_temporal_attention
from .backbone import build_trunk
from .distance import cosine_distance, euclidean_squared
from .losses import combined_loss, cross_entropy, triplet_loss
from .metrics import evaluate_rank
from .model import STA, TemporalPooling, build_model
from .rerank import re_ranking

__all__ = ["spatial_temporal_attention", "fuse", "inter_frame_regularization", "build_trunk",
           "euclidean_squared", "cosine_distance", "triplet_loss", "cross_entropy", "combined_loss",
           "evaluate_rank", "STA", "TemporalPooling", "build_model", "re_ranking"]
