"""pipeline.resume: what --resume and a re-used tracking.run_name mean, decided in the driver before Ray.

Checkpoint directories here are laid out like real ones (meta.json, config.yaml, ds/ files and every
rank's manifest written by pipeline.checkpoint.write_manifest); the Ray round trips are in test_train.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import checkpoint as ckpt_lib
from pipeline import resume, storage
from pipeline.config import ConfigError, config_from_dict, load_config
from pipeline.train import absolute_paths

ROOT = Path(__file__).resolve().parents[1]


def _cfg(*overrides):
    return load_config(ROOT / "configs" / "tiny.yaml", list(overrides))


def _checkpoint(directory: Path, epoch: int, cfg, *, world: int = 2, finished_ranks: int = 2) -> Path:
    """A checkpoint as the workers write it; ``finished_ranks < world`` leaves later ranks' manifests out."""
    stored = absolute_paths(config_from_dict(cfg.to_dict()))  # the workers store absolute paths
    for rank in range(world):
        part = directory / f".rank{rank}"
        (part / "ds").mkdir(parents=True)
        (part / "ds" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(bytes([epoch, rank]) * 100)
        if rank == 0:
            (part / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"w" * 64)
            (part / "meta.json").write_text(json.dumps({"epoch": epoch, "global_step": 2 * epoch}))
            (part / "config.yaml").write_text(stored.to_yaml())
        ckpt_lib.write_manifest(str(part), rank=rank, world_size=world)
    # what Ray does: merge every rank's directory into one
    for rank in range(world):
        part = directory / f".rank{rank}"
        for f in sorted(part.rglob("*")):
            if f.is_file() and (rank < finished_ranks or not f.name.startswith("manifest")):
                dst = directory / f.relative_to(part)
                dst.parent.mkdir(parents=True, exist_ok=True)
                f.rename(dst)
        subprocess.run(["rm", "-rf", str(part)], check=True)
    return directory


def test_run_dir_continues_from_newest_complete_checkpoint_without_ray_snapshot(tmp_path):
    cfg = _cfg()
    run = tmp_path / "runs" / "r"
    _checkpoint(run / "checkpoint_epoch_0001", 1, cfg)
    _checkpoint(run / "checkpoint_epoch_0002", 2, cfg)
    _checkpoint(run / "checkpoint_epoch_0003", 3, cfg, finished_ranks=1)  # Ctrl-C: rank 1 never finished
    plan = resume.plan_resume(str(run), cfg, run_name="ignored")
    assert (plan.mode, plan.storage_path, plan.run_name, plan.epoch) == ("continue", str(tmp_path / "runs"), "r", 2)
    assert plan.checkpoint == str(run / "checkpoint_epoch_0002")
    assert plan.skipped == [("checkpoint_epoch_0003", "no manifest.rank1.json of 2 ranks' manifests")]
    assert "continuing run from" in plan.describe() and "skipped incomplete: checkpoint_epoch_0003" in plan.describe()
    assert plan.changed == []


def test_changed_keys_are_reported_on_resume(tmp_path):
    run = tmp_path / "r"
    _checkpoint(run / "checkpoint_epoch_0001", 1, _cfg())
    plan = resume.plan_resume(str(run), _cfg("optim.lr=0.01", "optim.epochs=4", "scaling.num_workers=1"),
                              run_name="x")
    assert plan.changed == ["optim.epochs: 2 -> 4", "optim.lr: 0.001 -> 0.01"]  # scaling.* is not a hyper-parameter


def test_checkpoint_dir_starts_a_new_run_and_incomplete_ones_are_refused(tmp_path):
    cfg = _cfg(f"checkpoint.storage_path={tmp_path}/runs")
    ck = _checkpoint(tmp_path / "old" / "checkpoint_epoch_0002", 2, cfg)
    plan = resume.plan_resume(str(ck), cfg, run_name="new")
    assert (plan.mode, plan.run_name, plan.checkpoint, plan.epoch) == ("fork", "new", str(ck), 2)
    bad = _checkpoint(tmp_path / "old" / "checkpoint_epoch_0003", 3, cfg, finished_ranks=1)
    with pytest.raises(ConfigError, match="incomplete checkpoint, not used"):
        resume.plan_resume(str(bad), cfg, run_name="new")
    (ck / "config.yaml").write_text("name: other\n")  # size no longer matches its manifest
    with pytest.raises(ConfigError, match="config.yaml has"):
        resume.plan_resume(str(ck), cfg, run_name="new")
    # a new run may not be started inside a directory that already holds a run
    good = _checkpoint(tmp_path / "old2" / "checkpoint_epoch_0001", 1, cfg)
    _checkpoint(tmp_path / "runs" / "taken" / "checkpoint_epoch_0001", 1, cfg)
    with pytest.raises(ConfigError, match="tracking.run_name=taken"):
        resume.plan_resume(str(good), cfg, run_name="taken")


def test_neither_run_nor_checkpoint_is_refused(tmp_path):
    cfg = _cfg()
    folder = tmp_path / "notes"
    (folder / "data").mkdir(parents=True)
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="neither a run .* nor a checkpoint"):
        resume.plan_resume(str(folder), cfg, run_name="x")
    with pytest.raises(ConfigError, match="does not exist"):
        resume.plan_resume(str(tmp_path / "missing"), cfg, run_name="x")
    run = tmp_path / "only-incomplete"
    _checkpoint(run / "checkpoint_epoch_0001", 1, cfg, finished_ranks=0)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resume.plan_resume(str(run), cfg, run_name="x")


def test_cli_refuses_before_ray_in_one_line_and_writes_nothing(tmp_path):
    folder = tmp_path / "notes"
    (folder / "data").mkdir(parents=True)
    (folder / "notes.txt").write_text("hello")
    before = sorted(p.name for p in folder.rglob("*"))
    res = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", "configs/tiny.yaml",
                          f"data.root={tmp_path}/raw", f"data.shards={tmp_path}/shards",
                          f"checkpoint.storage_path={tmp_path}/runs", "--resume", str(folder)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().count("\n") == 0 and "neither a run" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "ray" not in res.stdout.lower()
    assert sorted(p.name for p in folder.rglob("*")) == before
    assert not (tmp_path / "shards").exists()  # refused before any data preparation


def test_reused_run_name_with_other_hyper_parameters_is_an_error(tmp_path):
    cfg = _cfg(f"checkpoint.storage_path={tmp_path}/runs")
    _checkpoint(tmp_path / "runs" / "done" / "checkpoint_epoch_0002", 2, cfg)
    with pytest.raises(ConfigError, match=r"^tracking.run_name=done: .* \(optim.epochs: 2 -> 4, optim.lr: 0.001 -> 0.01\);"
                                          r" continue it with --resume"):
        resume.plan_run(None, _cfg(f"checkpoint.storage_path={tmp_path}/runs", "optim.lr=0.01", "optim.epochs=4"),
                        run_name="done")
    # the same hyper-parameters: a re-submitted job continues where the run stopped
    plan = resume.plan_run(None, cfg, run_name="done")
    assert (plan.mode, plan.epoch) == ("continue", 2)
    assert resume.plan_run(None, cfg, run_name="fresh").mode == "new"


def test_plan_on_s3(s3_bucket, tmp_path):
    cfg = _cfg()
    run = tmp_path / "r"
    _checkpoint(run / "checkpoint_epoch_0001", 1, cfg)
    _checkpoint(run / "checkpoint_epoch_0002", 2, cfg, finished_ranks=1)
    url = f"s3://{s3_bucket}/runs/r"
    storage.upload_dir(str(run), url)
    plan = resume.plan_resume(url, cfg, run_name="x")
    assert (plan.mode, plan.storage_path, plan.run_name, plan.epoch) == ("continue", f"s3://{s3_bucket}/runs", "r", 1)
    assert plan.checkpoint == f"{url}/checkpoint_epoch_0001" and plan.skipped[0][0] == "checkpoint_epoch_0002"
