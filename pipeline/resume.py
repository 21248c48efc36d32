"""Where a run starts from: ``--resume``, a re-used ``tracking.run_name``, and a restarted worker.

One rule everywhere: a run continues from the **newest complete checkpoint** in its run directory
(complete = every rank's manifest present and matching, :func:`pipeline.checkpoint.verify`), whether or
not Ray's ``checkpoint_manager_snapshot.json`` is there (Ctrl-C and storage outages leave runs without
one, or with one naming an unfinished checkpoint). Incomplete checkpoints are skipped with a warning and
never deleted. Nothing here writes anything.

- Driver (:func:`plan_resume`, :func:`check_run_name`): decides before Ray starts, prints what will be
  restored, and refuses with a one-line :class:`~pipeline.config.ConfigError` (exit 2) a ``--resume``
  that names neither a run nor a checkpoint, an incomplete checkpoint, or a ``tracking.run_name``
  whose existing run has other hyper-parameters.
- Worker (:func:`newest_complete`): every rank restores the same checkpoint the same way, after a
  ``--resume`` and after a Ray worker-failure restart alike.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from pipeline import checkpoint as ckpt_lib
from pipeline import model_io, storage, urls
from pipeline.config import Config, ConfigError, config_from_dict

log = logging.getLogger("pipeline.resume")

CHECKPOINT_RE = re.compile(r"^checkpoint_epoch_(\d+)$")
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
# Keys that say how or where a run executes, not what it learns: changing them is not a new experiment.
OPERATIONAL = ("tracking.", "scaling.", "failure.", "checkpoint.storage_path", "checkpoint.keep",
               "data.root", "data.prepare", "data.num_workers", "data.prefetch_factor", "data.persistent_workers",
               "data.cache_dir", "data.cache_gb", "eval.num_workers")


@dataclass
class Plan:
    """Where ``pipeline.train`` writes and what it restores.

    Attributes:
        storage_path, run_name: the run directory is ``storage_path/run_name``.
        mode: ``"new"``, ``"continue"`` (same run directory and MLflow run) or ``"fork"`` (a new run
            starting from ``checkpoint``, which lies in another run directory).
        checkpoint: URL of the checkpoint that will be restored (None for a new run).
        epoch: that checkpoint's epoch.
        skipped: ``(checkpoint name, why)`` of newer, incomplete checkpoints passed over.
        changed: ``key: old -> new`` for hyper-parameters that differ from the checkpoint's config.
    """

    storage_path: str
    run_name: Optional[str]
    mode: str = "new"
    checkpoint: Optional[str] = None
    epoch: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the console: what is restored from where."""
        if self.mode == "new":
            return f"new run {self.run_name}"
        verb = "continuing run" if self.mode == "continue" else f"new run {self.run_name} starting"
        line = f"{verb} from {self.checkpoint} (epoch {self.epoch})"
        if self.skipped:
            line += "; skipped incomplete: " + ", ".join(f"{n} ({why})" for n, why in self.skipped)
        return line


def _normalise(url: str) -> str:
    url = url.rstrip("/")
    if url.startswith("file://"):
        url = url[len("file://"):]
    return url if urls.is_s3(url) else os.path.abspath(url)


def checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """``(epoch, url)`` of the ``checkpoint_epoch_NNNN`` directories under ``run_dir``, newest first."""
    found = []
    for name in storage.listdir(run_dir):
        m = CHECKPOINT_RE.match(name)
        if m:
            found.append((int(m.group(1)), urls.join(run_dir, name)))
    return sorted(found, reverse=True)


def newest_complete(run_dir: str, *, deep: Optional[bool] = None) -> tuple[Optional[str], int, list[tuple[str, str]]]:
    """``(url, epoch, skipped)``: the newest complete checkpoint of ``run_dir`` (None if there is none)
    and the newer incomplete ones passed over, each with the first reason.

    Args:
        run_dir: the run directory (local or ``s3://``).
        deep: hash every file (default: locally yes; on S3 sizes only, the loader hashes its copy).
    """
    deep = not urls.is_s3(run_dir) if deep is None else deep
    skipped = []
    for epoch, url in checkpoints(run_dir):
        problems = ckpt_lib.verify(url, deep=deep)
        if not problems:
            return url, epoch, skipped
        name = url.rstrip("/").rpartition("/")[2]
        log.warning("skipping incomplete checkpoint %s: %s", url, "; ".join(problems[:3]))
        skipped.append((name, problems[0]))
    return None, 0, skipped


def _is_checkpoint(url: str, names: list[str]) -> bool:
    base = url.rstrip("/").rpartition("/")[2]
    return bool(CHECKPOINT_RE.match(base)) or any(
        n in names for n in (ckpt_lib.MANIFEST.format(rank=0), "meta.json", ckpt_lib.DS_TAG))


def _is_run(names: list[str]) -> bool:
    return RAY_SNAPSHOT in names or any(CHECKPOINT_RE.match(n) for n in names)


def checkpoint_config(url: str) -> dict[str, Any]:
    """The flat config stored in a (verified) checkpoint."""
    raw = yaml.safe_load(storage.read_bytes(urls.join(url, "config.yaml")))
    return model_io.saved_config(raw, url).flat()


def config_changes(old: dict[str, Any], cfg: Config) -> list[str]:
    """``key: old -> new`` for every non-operational key of ``cfg`` that differs from ``old`` (flat).

    Paths are compared the way the workers see them (absolute), so a relative path is no change.
    """
    from pipeline.train import absolute_paths

    new = absolute_paths(config_from_dict(cfg.to_dict())).flat()
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if not k.startswith(OPERATIONAL) and old.get(k) != new.get(k)]


def plan_resume(uri: str, cfg: Config, *, run_name: str) -> Plan:
    """What ``--resume uri`` means; raises :class:`ConfigError` (one line) when it cannot be honoured.

    A run directory continues itself from its newest complete checkpoint (same directory, same MLflow
    run; changed keys are reported). A checkpoint directory starts a new run, ``run_name`` under
    ``checkpoint.storage_path``, from that checkpoint, which must be complete. Anything else is refused.

    Args:
        uri: the ``--resume`` argument (path, ``file://`` or ``s3://``).
        cfg: the merged config of this invocation.
        run_name: the name a new run gets (``tracking.run_name`` or a generated one).
    """
    uri = _normalise(uri)
    try:
        names = storage.listdir(uri)
    except Exception as exc:  # noqa: BLE001 - any storage failure: one line naming the URL
        raise ConfigError(f"--resume: cannot read {uri} ({_first_line(exc)})") from None
    if not names:
        raise ConfigError(f"--resume: {uri} does not exist or is empty: neither a run nor a checkpoint")
    if _is_checkpoint(uri, names):
        problems = ckpt_lib.verify(uri, deep=not urls.is_s3(uri))
        if problems:
            raise ConfigError(f"--resume: {uri} is an incomplete checkpoint, not used ({problems[0]}); "
                              f"resume its run directory to use the newest complete one")
        epoch = int(json.loads(storage.read_bytes(urls.join(uri, "meta.json"))).get("epoch", 0))
        plan = Plan(cfg.checkpoint.storage_path, run_name, "fork", uri, epoch,
                    changed=config_changes(checkpoint_config(uri), cfg))
        clash = check_run_name(cfg, plan.storage_path, run_name, explicit=True)
        if clash is not None:
            raise ConfigError(f"tracking.run_name={run_name}: {_target(plan.storage_path, run_name)} already holds "
                              f"a run; a run started from {uri} needs a new tracking.run_name")
        return plan
    if not _is_run(names):
        raise ConfigError(f"--resume: {uri} holds neither a run (checkpoint_epoch_* or {RAY_SNAPSHOT}) "
                          f"nor a checkpoint")
    url, epoch, skipped = newest_complete(uri)
    if url is None:
        why = "; ".join(f"{n}: {w}" for n, w in skipped) or "no checkpoint_epoch_* directory"
        raise ConfigError(f"--resume: {uri} holds no complete checkpoint ({why})")
    parent, _, name = uri.rpartition("/")
    return Plan(parent, name, "continue", url, epoch, skipped, config_changes(checkpoint_config(url), cfg))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def _target(storage_path: str, run_name: str) -> str:
    return f"{_normalise(storage_path)}/{run_name}"


def check_run_name(cfg: Config, storage_path: str, run_name: str, *, explicit: bool = False) -> Optional[Plan]:
    """A new run's directory may already hold a run (``tracking.run_name`` re-used).

    Returns None when it holds no complete checkpoint. With the same hyper-parameters the old run is
    continued (a re-submitted job picks up where it stopped): the :class:`Plan` says from where. With
    different ones it is a :class:`ConfigError` naming ``tracking.run_name`` and the changed keys: a
    deliberate continuation goes through ``--resume``, a new experiment needs a new name.

    Args:
        cfg: this invocation's config.
        storage_path, run_name: where the new run would write.
        explicit: only report the clash (return a Plan whatever the config), for ``--resume <checkpoint>``.
    """
    run_dir = _target(storage_path, run_name)
    try:
        url, epoch, skipped = newest_complete(run_dir)
    except Exception as exc:  # noqa: BLE001 - any storage failure: one line naming the key
        raise ConfigError(f"checkpoint.storage_path={storage_path}: cannot list {run_dir} ({_first_line(exc)})") from None
    if url is None:
        return None
    plan = Plan(_normalise(storage_path), run_name, "continue", url, epoch, skipped,
                config_changes(checkpoint_config(url), cfg))
    if plan.changed and not explicit:
        shown = ", ".join(plan.changed[:4]) + (", ..." if len(plan.changed) > 4 else "")
        raise ConfigError(f"tracking.run_name={run_name}: {run_dir} already holds a run (epoch {epoch}) with other "
                          f"hyper-parameters ({shown}); continue it with --resume {run_dir} or choose another "
                          f"tracking.run_name")
    return plan


def plan_run(resume: Optional[str], cfg: Config, *, run_name: str) -> Plan:
    """The driver's one call: :func:`plan_resume` for ``--resume``, else :func:`check_run_name` for a
    re-used name, else a new run ``run_name`` under ``checkpoint.storage_path``."""
    if resume:
        return plan_resume(resume, cfg, run_name=run_name)
    return check_run_name(cfg, cfg.checkpoint.storage_path, run_name) or Plan(cfg.checkpoint.storage_path, run_name)
