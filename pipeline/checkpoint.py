"""Training checkpoints: DeepSpeed state per rank for resuming, written, verified and restored.

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

Plain ``state_dict`` exports, and models built from either kind of directory, are
:mod:`pipeline.model_io`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline import s3_client, storage, urls
from pipeline.config import Config

DS_TAG = "ds"
MANIFEST = "manifest.rank{rank}.json"
_MANIFEST_RE = re.compile(r"^manifest\.rank(\d+)\.json$")


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt, or holds more than plain tensors and DeepSpeed state."""


def ray_storage(storage_path: str):
    """``(path, pyarrow filesystem or None)`` for Ray's ``RunConfig``.

    Ray opens ``s3://`` through pyarrow; an S3-compatible endpoint (MinIO, Ceph, moto) must be handed
    to pyarrow explicitly, so the endpoint from ``AWS_ENDPOINT_URL`` is honoured here, with retries
    that ride out an outage of about a minute (:func:`pipeline.s3_client.arrow_filesystem`).
    """
    if urls.is_s3(storage_path):
        bucket, key = urls.parse_s3(storage_path)
        return f"{bucket}/{key}".rstrip("/"), s3_client.arrow_filesystem(storage_path)
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
        world = int(json.loads(storage.read_bytes(urls.join(url, first)))["world_size"])
        for r in range(world):
            name = MANIFEST.format(rank=r)
            if name not in names:
                return [f"no {name} of {world} ranks' manifests"]
            m = json.loads(storage.read_bytes(urls.join(url, name)))
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
        path = urls.join(url, rel)
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


def is_zero3(directory: str) -> bool:
    """Whether a local training checkpoint holds ZeRO-3 partitions (per-rank model-state files)
    rather than the full module (``mp_rank_00_model_states.pt``)."""
    ds = Path(directory, DS_TAG)
    return not (ds / "mp_rank_00_model_states.pt").exists() and any(ds.glob("zero_pp_rank_*_model_states.pt"))
