"""Process-group set-up shared by the bench scripts that build a DeepSpeed engine in one process.

Bench scripts run as ``python bench/<name>.py``, so Python puts ``bench/`` first on ``sys.path`` and
they import this module by its plain name (``from _process_group import one_rank_group``), while
``pipeline`` and ``sta_model`` come from the editable install.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from pipeline.train import free_port

__all__ = ["free_port", "one_rank_group"]


def one_rank_group(device: torch.device = torch.device("cpu")) -> None:
    """A 1-rank process group for a lone process: ``build_engine`` expects one (Ray Train sets it up).

    Args:
        device: where the engine will run: NCCL for CUDA, else gloo and DeepSpeed's CPU accelerator.
    """
    if device.type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator on import
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
