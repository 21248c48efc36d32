"""DeepSpeed engine construction from our config: precision, ZeRO, optimizer, LR schedule.

Kept separate from the worker loop so the data-parallel equivalence test and the overhead
benchmark build exactly the engine that training uses.
"""
from __future__ import annotations

import bisect
import os
from typing import Any

import torch

from pipeline.config import Config


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """``auto`` → bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if precision != "auto":
        return precision
    if use_gpu and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def lr_factor(step: int, steps_per_epoch: int, cfg: Config) -> float:
    """Linear warmup over ``warmup_epochs``, then ×gamma at each milestone epoch (fractional epochs)."""
    o = cfg.optim
    epoch = step / max(1, steps_per_epoch)
    factor = o.gamma ** bisect.bisect_right(o.milestones, epoch)
    if o.warmup_epochs > 0 and epoch < o.warmup_epochs:
        alpha = epoch / o.warmup_epochs
        factor *= o.warmup_factor * (1 - alpha) + alpha
    return factor


def deepspeed_config(cfg: Config, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON config generated from ours (logged with the run)."""
    micro = cfg.data.p * cfg.data.k
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.deepspeed.grad_accum,
        "train_batch_size": micro * cfg.deepspeed.grad_accum * world_size,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "steps_per_print": 10**9,  # we log ourselves; keep DeepSpeed's stdout quiet
        "wall_clock_breakdown": False,
        # Our client optimizer is a plain torch one (fused on GPU); ZeRO partitions it like any other.
        "zero_allow_untested_optimizer": True,
    }
    if cfg.deepspeed.grad_clip > 0:
        ds["gradient_clipping"] = cfg.deepspeed.grad_clip
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000}
    if cfg.deepspeed.zero_stage >= 1:
        ds["zero_optimization"].update(overlap_comm=True, contiguous_gradients=True,
                                       reduce_bucket_size=int(cfg.deepspeed.reduce_bucket_size),
                                       allgather_bucket_size=int(cfg.deepspeed.allgather_bucket_size))
    return ds


def build_optimizer(cfg: Config, params, use_gpu: bool) -> torch.optim.Optimizer:
    """A torch optimizer handed to DeepSpeed as client optimizer.

    On GPU torch's fused Adam kernels are used (one launch for all parameters); on CPU the foreach
    path. Weight decay is the paper's L2 penalty for ``adam``/``sgd`` and decoupled for ``adamw``.
    """
    o = cfg.optim
    fused = bool(use_gpu and torch.cuda.is_available())
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, fused=fused or None)
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, fused=fused or None)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                           nesterov=o.momentum > 0)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on BN/bias parameters (common re-ID practice; keeps BNNeck scale free)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: torch.nn.Module, cfg: Config, *, world_size: int, steps_per_epoch: int):
    """``deepspeed.initialize`` with a config generated from ``cfg``.

    Uses the process group Ray Train set up; a single process without one gets a 1-rank group.
    Also applies ``model.compile`` (``model.channels_last`` is the model's own, set when
    ``pipeline.model_io.build_model_from_config`` builds it).
    Returns ``(engine, precision, ds_config)``.
    """
    if not cfg.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    precision = resolve_precision(cfg.deepspeed.precision, cfg.scaling.use_gpu)
    ds_cfg = deepspeed_config(cfg, world_size, precision)
    optimizer = build_optimizer(cfg, param_groups(model, cfg.optim.weight_decay), cfg.scaling.use_gpu)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_cfg)
    if cfg.model.compile:
        compile_engine(engine, cfg.model.compile_mode)
    return engine, precision, ds_cfg


def compile_engine(engine, mode: str = "default") -> None:
    """``torch.compile`` the engine's module in place (DeepSpeed's ``engine.compile``, i.e.
    ``nn.Module.compile``): parameter names, checkpoints and ZeRO's gradient hooks are unchanged;
    the first steps (and the first eval-mode call) pay the compilation."""
    engine.compile(backend="inductor", compile_kwargs={} if mode == "default" else {"mode": mode})


def autocast_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
