"""Models out of a run: plain ``state_dict`` exports, models built from a config (trunk weights from a
file or an earlier run's export), and models loaded from an export or a training checkpoint.

An exported model directory (``final/`` and ``best/`` under the run; loadable by ``sta_model`` alone):

- ``model.pt``     plain ``state_dict`` (``torch.load(weights_only=True)``)
- ``config.yaml``, ``meta.json`` (num_classes, metrics)

Training checkpoints themselves (writing, verifying, safe loading) are :mod:`pipeline.checkpoint`.
"""
from __future__ import annotations

import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from pipeline import storage, urls
from pipeline.checkpoint import DS_TAG, CheckpointError, is_zero3, safe_load, verify
from pipeline.config import Config, ConfigError, config_from_dict

log = logging.getLogger("pipeline.model_io")


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The whole model's fp32 ``state_dict`` on CPU, gathering ZeRO-3 partitions when needed."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
            for k, v in module.state_dict().items()}


def export_model(state_dict: dict[str, torch.Tensor], cfg: Config, url: str, *, num_classes: int,
                 metrics: Optional[dict[str, float]] = None, provenance: Optional[dict[str, Any]] = None) -> None:
    """Write ``model.pt`` + ``config.yaml`` + ``meta.json`` under ``url`` (meta last: it marks completeness)."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    storage.write_bytes(urls.join(url, "model.pt"), buf.getvalue())
    storage.write_bytes(urls.join(url, "config.yaml"), cfg.to_yaml().encode())
    # provenance (MLflow run id, run directory) lets a later run that starts from this export say so
    meta = {"num_classes": num_classes, "model": cfg.model.kind, "metrics": metrics or {}, **(provenance or {})}
    storage.write_bytes(urls.join(url, "meta.json"), json.dumps(meta, indent=1).encode())


def saved_config(raw: Any, source: str) -> Config:
    """A config this project saved (in a checkpoint or an export), read leniently: keys that a later
    version removed (e.g. ``failure.inject_at_epoch``) are dropped with a warning, so older runs stay
    loadable; everything else is validated as a user's config is."""
    from pydantic import BaseModel

    dropped: list[str] = []

    def prune(values: Any, model: type, prefix: str) -> Any:
        if not isinstance(values, dict):
            return values
        out = {}
        for key, value in values.items():
            field = model.model_fields.get(key)
            if field is None:
                dropped.append(prefix + key)
                continue
            ann = field.annotation
            section = isinstance(ann, type) and issubclass(ann, BaseModel)
            out[key] = prune(value, ann, f"{prefix}{key}.") if section else value
        return out

    cfg = config_from_dict(prune(raw or {}, Config, ""))
    if dropped:
        log.warning("%s: config keys of an older version ignored: %s", source, ", ".join(dropped))
    return cfg


def build_model_from_config(cfg: Config, num_classes: int) -> torch.nn.Module:
    """The model of ``cfg.model``; ``model.pretrained`` may be a weights file or an earlier run's export,
    of which only the trunk is loaded (:func:`load_pretrained_trunk`)."""
    from sta_model.model import build_model

    m = cfg.model
    export = m.pretrained if m.pretrained and is_export(m.pretrained) else None
    kw: dict[str, Any] = dict(trunk=m.trunk, embed_dim=m.embed_dim, pretrained=None if export else m.pretrained,
                              last_stride=m.last_stride, channels_last=m.channels_last)
    if m.kind == "sta":
        kw.update(num_blocks=m.num_blocks, fusion=tuple(m.fusion), attention_map=m.attention_map)
    model = build_model(m.kind, num_classes, **kw)
    if export:
        load_pretrained_trunk(model.trunk, export, trunk_kind=m.trunk)
    return model


def is_export(url: str) -> bool:
    """Whether ``url`` is an exported model directory (``final/`` or ``best/`` of a run)."""
    try:
        return storage.exists(urls.join(url, "model.pt")) and storage.exists(urls.join(url, "meta.json"))
    except (OSError, ValueError):
        return False


def export_info(url: str) -> dict[str, Any]:
    """An exported run's trunk kind, last stride, MLflow run id and run directory (config.yaml and
    meta.json only: the weights are not read)."""
    raw = yaml.safe_load(storage.read_bytes(urls.join(url, "config.yaml"))) or {}
    meta = json.loads(storage.read_bytes(urls.join(url, "meta.json")))
    model_cfg = raw.get("model", {}) if isinstance(raw, dict) else {}
    return {"trunk": model_cfg.get("trunk"), "last_stride": model_cfg.get("last_stride"),
            "mlflow_run_id": meta.get("mlflow_run_id"), "run_dir": meta.get("run_dir"), "source": url}


def export_trunk_state(url: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(trunk state_dict, info)`` of an exported run: the ``trunk.*`` weights with the prefix removed,
    and :func:`export_info`."""
    info = export_info(url)
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(urls.join(url, "model.pt"))), map_location="cpu",
                           weights_only=True)
    except Exception as exc:  # torch's message advises weights_only=False: never pass that on
        raise ValueError(f"model.pretrained: {url}/model.pt is not a plain state_dict "
                         f"({type(exc).__name__})") from None
    trunk = {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")}
    return trunk, info


def trunk_mismatch(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> Optional[str]:
    """None when ``got`` loads into a trunk whose state is ``expected`` (names and shapes), else why not."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(k for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape))
    if not (missing or unexpected or shapes):
        return None
    show = lambda keys: f"{len(keys)} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"  # noqa: E731
    parts = [f"missing keys {show(missing)}" if missing else "", f"unexpected keys {show(unexpected)}" if unexpected else "",
             "shape mismatch " + ", ".join(f"{k} {tuple(got[k].shape)} vs {tuple(expected[k].shape)}"
                                           for k in shapes[:3]) if shapes else ""]
    return "; ".join(p for p in parts if p)


def load_pretrained_trunk(trunk: torch.nn.Module, url: str, *, trunk_kind: str) -> dict[str, Any]:
    """Load an exported run's trunk weights into ``trunk``; returns the export's info (see
    :func:`export_trunk_state`). A mismatch raises ``ValueError`` naming the keys and both trunk kinds."""
    state, info = export_trunk_state(url)
    why = trunk_mismatch(trunk.state_dict(), state)
    if why:
        raise ValueError(f"model.pretrained: the trunk of {url} (model.trunk={info['trunk']}, "
                         f"last_stride={info['last_stride']}) does not fit model.trunk={trunk_kind}: {why}")
    trunk.load_state_dict(state, strict=True)
    return info


def check_pretrained(cfg: Config) -> Optional[dict[str, Any]]:
    """Driver-side check of ``model.pretrained`` before Ray starts (a ``ConfigError`` naming the key).

    Returns the export's info for an export, ``None`` for a weights file or no pretraining. The trunk
    is built on the meta device: names and shapes only, no weights allocated.
    """
    from sta_model.backbone import build_trunk

    src = cfg.model.pretrained
    if not src:
        return None
    if src.startswith(("http://", "https://")):
        return None  # fetched by torch.hub in the workers
    if is_export(src):
        try:
            state, info = export_trunk_state(src)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        with torch.device("meta"):
            expected = build_trunk(cfg.model.trunk, last_stride=cfg.model.last_stride).state_dict()
        why = trunk_mismatch(expected, state)
        if why:
            raise ConfigError(f"model.pretrained: the trunk of {src} (model.trunk={info['trunk']}) does not fit "
                              f"model.trunk={cfg.model.trunk}: {why}")
        return info
    if urls.is_s3(src):
        ok = storage.exists(src)
    else:
        ok = Path(src[len("file://"):] if src.startswith("file://") else src).is_file()
    if not ok:
        raise ConfigError(f"model.pretrained: {src} is neither a weights file nor a run export "
                          f"(<run>/final or <run>/best holding model.pt and meta.json)")
    return None


def load_exported(url: str) -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """Model (eval mode, CPU) + config + meta from an exported model directory."""
    if not storage.exists(urls.join(url, "meta.json")):
        raise FileNotFoundError(f"{url}: not an exported model (no meta.json)")
    meta = json.loads(storage.read_bytes(urls.join(url, "meta.json")))
    cfg = saved_config(yaml.safe_load(storage.read_bytes(urls.join(url, "config.yaml"))), url)
    cfg.model.pretrained = None  # weights come from model.pt
    model = build_model_from_config(cfg, meta["num_classes"])
    state = safe_load(io.BytesIO(storage.read_bytes(urls.join(url, "model.pt"))), name=f"{url}/model.pt")
    model.load_state_dict(state)
    return model.eval(), cfg, meta


def load_training_checkpoint(url: str) -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """Model + config + meta from a Ray/DeepSpeed training checkpoint directory, without DeepSpeed.

    The checkpoint is verified against its manifests first (:class:`CheckpointError` if incomplete)
    and the weights are read with :func:`safe_load`. Stages 0–2 keep the full module weights in
    ``ds/mp_rank_00_model_states.pt``; ZeRO-3 checkpoints (per-rank partitions,
    ``zero_pp_rank_*_model_states.pt``) must be exported first: the run writes ``final/`` and ``best/``.

    Args:
        url: the checkpoint directory (path, ``file://`` or ``s3://``).
    """
    with tempfile.TemporaryDirectory() as tmp:
        if urls.is_s3(url):
            storage.download_dir(url, tmp)
            local = tmp
        else:
            local = url[len("file://"):] if url.startswith("file://") else url
        problems = verify(local, deep=True)
        if problems:
            raise CheckpointError(f"{url}: incomplete checkpoint, not used: {'; '.join(problems[:3])}")
        cfg = saved_config(yaml.safe_load(Path(local, "config.yaml").read_text()), url)
        meta = json.loads(Path(local, "meta.json").read_text())
        if is_zero3(local):
            raise CheckpointError(f"{url}: partitioned (ZeRO-3) weights; use the run's final/ or best/ export")
        states = Path(local, DS_TAG, "mp_rank_00_model_states.pt")
        if not states.exists():
            raise CheckpointError(f"{url}: no {DS_TAG}/mp_rank_00_model_states.pt")
        blob = safe_load(states, name=f"{url}/{DS_TAG}/mp_rank_00_model_states.pt")
        state = blob.get("module") if isinstance(blob, dict) else None
        if not state or any(v.numel() == 0 for v in state.values()):
            raise CheckpointError(f"{url}: partitioned (ZeRO-3) or empty weights; use the run's final/ or best/ export")
    cfg.model.pretrained = None
    model = build_model_from_config(cfg, meta["num_classes"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval(), cfg, meta


def load_any(url: str) -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """An exported model dir or a training checkpoint dir, whichever ``url`` is."""
    if storage.exists(urls.join(url, "model.pt")):
        return load_exported(url)
    return load_training_checkpoint(url)
