"""Checkpoints: DeepSpeed state per rank for resuming, plain ``state_dict`` exports for using the model.

A training checkpoint directory (what ``ray.train.report`` persists; Ray merges every rank's files):

- ``ds/``          DeepSpeed ``save_checkpoint`` output (model, optimizer shards per rank, LR scheduler)
- ``meta.json``    epoch, global step, MLflow run id, best metric so far (rank 0)
- ``config.yaml``  the merged config of the run (rank 0)
- ``manifest.rank<R>.json``  written last by every rank: the files that rank wrote, with byte size and
  sha256, and the world size. A checkpoint is complete when every rank's manifest is there and every
  file matches it (:func:`verify`); resume and evaluate use nothing else.

Loading never unpickles code: every ``torch.load`` here is ``weights_only=True``, with exactly the
DeepSpeed types its optimizer state needs allow-listed (:func:`safe_load`), and DeepSpeed's own loads go
through the same function while :func:`load` runs.

An exported model directory (``final/`` and ``best/`` under the run; loadable by ``sta_model`` alone):

- ``model.pt``     plain ``state_dict`` (``torch.load(weights_only=True)``)
- ``config.yaml``, ``meta.json`` (num_classes, metrics)
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from pipeline import storage
from pipeline.config import Config, ConfigError, config_from_dict

DS_TAG = "ds"
log = logging.getLogger("pipeline.checkpoint")
MANIFEST = "manifest.rank{rank}.json"
_MANIFEST_RE = re.compile(r"^manifest\.rank(\d+)\.json$")


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt, or holds more than plain tensors and DeepSpeed state."""


def ray_storage(storage_path: str):
    """``(path, pyarrow filesystem or None)`` for Ray's ``RunConfig``.

    Ray opens ``s3://`` through pyarrow; an S3-compatible endpoint (MinIO, Ceph, moto) must be handed
    to pyarrow explicitly, so the endpoint from ``AWS_ENDPOINT_URL`` is honoured here, with retries
    that ride out an outage of about a minute (:func:`pipeline.storage.arrow_filesystem`).
    """
    if storage.is_s3(storage_path):
        bucket, key = storage.parse_s3(storage_path)
        return f"{bucket}/{key}".rstrip("/"), storage.arrow_filesystem(storage_path)
    if storage_path.startswith("file://"):
        storage_path = storage_path[len("file://"):]
    return str(Path(storage_path).resolve()), None


def storage_url(path: str, filesystem) -> str:
    """Inverse of :func:`ray_storage`: a URL our storage layer can open."""
    if filesystem is not None and getattr(filesystem, "type_name", "") == "s3":
        return f"s3://{path}"
    return path


def save(engine, directory: str, *, rank: int, world_size: int = 1, cfg: Config, meta: dict[str, Any]) -> None:
    """Every rank writes its DeepSpeed shard into ``directory``; rank 0 adds meta and config; each rank
    then writes its manifest, last (Ray merges the ranks' directories into one checkpoint).

    Args:
        engine: the DeepSpeed engine.
        directory: this rank's local staging directory (handed to ``ray.train.report``).
        rank, world_size: this rank and the number of ranks (the manifest records both).
        cfg: the run's config (``config.yaml``, rank 0).
        meta: epoch, global step, MLflow run id, best metric (``meta.json``, rank 0).
    """
    os.makedirs(directory, exist_ok=True)
    engine.save_checkpoint(directory, tag=DS_TAG, client_state={"meta": meta})
    if rank == 0:
        Path(directory, "meta.json").write_text(json.dumps(meta, indent=1))
        Path(directory, "config.yaml").write_text(cfg.to_yaml())
    write_manifest(directory, rank=rank, world_size=world_size)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str, *, rank: int, world_size: int) -> dict[str, Any]:
    """Record every file under ``directory`` (size, sha256) in ``manifest.rank<rank>.json``, written
    last and atomically (rename), so a manifest never describes files that were not fully written."""
    root = Path(directory)
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not _MANIFEST_RE.match(rel) and not rel.endswith(".part"):
            files[rel] = {"bytes": p.stat().st_size, "sha256": _sha256_file(p)}
    manifest = {"format": 1, "rank": rank, "world_size": world_size, "files": files}
    tmp = root / (MANIFEST.format(rank=rank) + ".part")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / MANIFEST.format(rank=rank))
    return manifest


def verify(url: str, *, deep: bool = True) -> list[str]:
    """What is wrong with the training checkpoint at ``url`` (local or ``s3://``); empty when complete.

    Complete: rank 0's manifest names the world size, every rank's manifest is there and agrees on it,
    ``meta.json`` and ``config.yaml`` are listed, and every listed file exists with its recorded size
    (and sha256 when ``deep``; the driver checks sizes on S3, the workers hash their local copy).

    Args:
        url: the checkpoint directory.
        deep: also compare every file's sha256 (reads every byte).
    """
    from pipeline import storage

    try:
        names = set(storage.listdir(url))
    except (OSError, ValueError) as exc:
        return [f"unreadable ({exc})"]
    first = MANIFEST.format(rank=0)
    if first not in names:
        return [f"no {first} (written last by rank 0: the checkpoint was never finished, or predates "
                f"manifests; the run's final/ and best/ exports still load)"]
    manifests = []
    try:
        world = int(json.loads(storage.read_bytes(storage.join(url, first)))["world_size"])
        for r in range(world):
            name = MANIFEST.format(rank=r)
            if name not in names:
                return [f"no {name} of {world} ranks' manifests"]
            m = json.loads(storage.read_bytes(storage.join(url, name)))
            if int(m.get("world_size", -1)) != world or not isinstance(m.get("files"), dict):
                return [f"{name} disagrees with {first}"]
            manifests.append(m)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"unreadable manifest ({type(exc).__name__}: {exc})"]
    problems = []
    listed = {f: spec for m in manifests for f, spec in m["files"].items()}
    for required in ("meta.json", "config.yaml"):
        if required not in listed:
            problems.append(f"{required} not in the manifest")
    for rel, spec in sorted(listed.items()):
        path = storage.join(url, rel)
        try:
            n = storage.size(path)
        except (OSError, ValueError):
            problems.append(f"{rel} missing")
            continue
        if n != spec["bytes"]:
            problems.append(f"{rel} has {n} bytes, the manifest says {spec['bytes']}")
        elif deep and storage.sha256(path) != spec["sha256"]:
            problems.append(f"{rel} does not match its sha256")
    return problems


def _deepspeed_safe_globals() -> list:
    """The non-tensor types in DeepSpeed's checkpoint files (ZeRO 0-3, fp32/fp16/bf16): nothing else
    may be unpickled. Found by listing the pickle globals of real checkpoints (tests/test_checkpoint.py)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


# What torch's refusal names (the global it would have had to import), without its advice.
_REFUSED = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL|Unsupported class) ([\w.]+)")


def safe_load(f, map_location: Any = "cpu", *, name: Optional[str] = None) -> Any:
    """``torch.load(weights_only=True)`` with DeepSpeed's state types allow-listed.

    A file that needs anything else (a pickled function call, a foreign class) raises
    :class:`CheckpointError` naming the file and what it asked for, never torch's advice to load
    with ``weights_only=False``.

    Args:
        f: a path or a binary file object.
        map_location: as ``torch.load``.
        name: how to call the file in the error (default: ``f`` itself).
    """
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(f, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch's own message advises weights_only=False: never pass that on
        text = str(exc)
        m = _REFUSED.search(text)
        if m:
            why = f"it asks to run or import {m.group(1)}: not plain tensors and DeepSpeed state"
        elif "Weights only load failed" in text:
            why = "not plain tensors and DeepSpeed state"
        else:
            why = f"{type(exc).__name__}: {text.splitlines()[0][:160] if text else 'unreadable'}"
        raise CheckpointError(f"{name or f}: refused, not loaded ({why})") from None


@contextlib.contextmanager
def _deepspeed_loads_safely(engine):
    """Route DeepSpeed's checkpoint reads (``checkpoint_engine.load``, which uses
    ``weights_only=False``) through :func:`safe_load` while the block runs."""
    ce = engine.checkpoint_engine
    original = ce.load
    ce.load = lambda path, map_location=None: safe_load(path, map_location, name=str(path))
    try:
        yield
    finally:
        ce.load = original


def load(engine, directory: str) -> dict[str, Any]:
    """Restore model, optimizer and LR scheduler into ``engine`` from a local checkpoint directory;
    returns the saved meta. The directory is verified against its manifests first and only read.

    Args:
        engine: the DeepSpeed engine (same model, world size and ZeRO stage as the checkpoint's).
        directory: a local checkpoint directory (download ``s3://`` ones first).
    """
    problems = verify(directory, deep=True)
    if problems:
        raise CheckpointError(f"{directory}: incomplete checkpoint: {'; '.join(problems[:3])}")
    with _deepspeed_loads_safely(engine):
        path, client_state = engine.load_checkpoint(directory, tag=DS_TAG, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"no DeepSpeed checkpoint (tag {DS_TAG!r}) under {directory}")
    meta_file = Path(directory, "meta.json")
    return json.loads(meta_file.read_text()) if meta_file.exists() else dict(client_state.get("meta", {}))


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
    storage.write_bytes(storage.join(url, "model.pt"), buf.getvalue())
    storage.write_bytes(storage.join(url, "config.yaml"), cfg.to_yaml().encode())
    # provenance (MLflow run id, run directory) lets a later run that starts from this export say so
    meta = {"num_classes": num_classes, "model": cfg.model.kind, "metrics": metrics or {}, **(provenance or {})}
    storage.write_bytes(storage.join(url, "meta.json"), json.dumps(meta, indent=1).encode())


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
        return storage.exists(storage.join(url, "model.pt")) and storage.exists(storage.join(url, "meta.json"))
    except (OSError, ValueError):
        return False


def export_info(url: str) -> dict[str, Any]:
    """An exported run's trunk kind, last stride, MLflow run id and run directory (config.yaml and
    meta.json only: the weights are not read)."""
    raw = yaml.safe_load(storage.read_bytes(storage.join(url, "config.yaml"))) or {}
    meta = json.loads(storage.read_bytes(storage.join(url, "meta.json")))
    model_cfg = raw.get("model", {}) if isinstance(raw, dict) else {}
    return {"trunk": model_cfg.get("trunk"), "last_stride": model_cfg.get("last_stride"),
            "mlflow_run_id": meta.get("mlflow_run_id"), "run_dir": meta.get("run_dir"), "source": url}


def export_trunk_state(url: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(trunk state_dict, info)`` of an exported run: the ``trunk.*`` weights with the prefix removed,
    and :func:`export_info`."""
    info = export_info(url)
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(storage.join(url, "model.pt"))), map_location="cpu",
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
    if storage.is_s3(src):
        ok = storage.exists(src)
    else:
        ok = Path(src[len("file://"):] if src.startswith("file://") else src).is_file()
    if not ok:
        raise ConfigError(f"model.pretrained: {src} is neither a weights file nor a run export "
                          f"(<run>/final or <run>/best holding model.pt and meta.json)")
    return None


def load_exported(url: str) -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """Model (eval mode, CPU) + config + meta from an exported model directory."""
    if not storage.exists(storage.join(url, "meta.json")):
        raise FileNotFoundError(f"{url}: not an exported model (no meta.json)")
    meta = json.loads(storage.read_bytes(storage.join(url, "meta.json")))
    cfg = saved_config(yaml.safe_load(storage.read_bytes(storage.join(url, "config.yaml"))), url)
    cfg.model.pretrained = None  # weights come from model.pt
    model = build_model_from_config(cfg, meta["num_classes"])
    state = safe_load(io.BytesIO(storage.read_bytes(storage.join(url, "model.pt"))), name=f"{url}/model.pt")
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
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        if storage.is_s3(url):
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


def is_zero3(directory: str) -> bool:
    """Whether a local training checkpoint holds ZeRO-3 partitions (per-rank model-state files)
    rather than the full module (``mp_rank_00_model_states.pt``)."""
    ds = Path(directory, DS_TAG)
    return not (ds / "mp_rank_00_model_states.pt").exists() and any(ds.glob("zero_pp_rank_*_model_states.pt"))


def load_any(url: str) -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """An exported model dir or a training checkpoint dir, whichever ``url`` is."""
    if storage.exists(storage.join(url, "model.pt")):
        return load_exported(url)
    return load_training_checkpoint(url)
