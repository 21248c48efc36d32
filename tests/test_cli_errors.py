"""One-line errors before Ray starts (exit 2) from `pipeline.train` and `pipeline.pack` for stores that
cannot be used, through the real CLIs; the synthetic data follows data.synthetic; the CPU warning."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cli(module: str, *args: str, env: dict | None = None, cwd=None) -> tuple[subprocess.CompletedProcess, float]:
    t = time.monotonic()
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=300)
    return out, time.monotonic() - t


def _train(tmp_path, *overrides: str, env: dict | None = None):
    return _cli("pipeline.train", "--config", str(ROOT / "configs" / "tiny.yaml"), f"data.root={tmp_path}/raw",
                f"checkpoint.storage_path={tmp_path}/runs", "tracking.enabled=false",  # no MLflow DB creation lines
                *overrides, env=env, cwd=tmp_path)


def _one_line(out: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_train_unsupported_scheme_and_invalid_manifest(tmp_path):
    out, _ = _train(tmp_path, "data.shards=gs://bucket/shards")
    _one_line(out, "config error: data.shards:", "unsupported URL scheme", "gs://bucket/shards")
    bad = tmp_path / "shards"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    out, _ = _train(tmp_path, f"data.shards={bad}")
    _one_line(out, "config error: data.shards:", "manifest.json")
    (bad / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    out, _ = _train(tmp_path, f"data.shards={bad}")
    _one_line(out, "config error: data.shards:", "manifest.json")


def test_train_and_pack_missing_bucket(s3_server, s3_bucket, tmp_path):
    out, _ = _train(tmp_path, "data.shards=s3://no-such-bucket-t/shards")
    _one_line(out, "config error: data.shards:", "s3://no-such-bucket-t/shards", "does not exist")
    out, _ = _train(tmp_path, f"data.shards=s3://{s3_bucket}/shards", "checkpoint.storage_path=s3://no-such-runs/r")
    _one_line(out, "config error: checkpoint.storage_path: s3://no-such-runs/r", "bucket 'no-such-runs' does not exist")
    out, _ = _cli("pipeline.pack", "--dataset", "synthetic", "--root", str(tmp_path / "raw"),
                  "--out", "s3://no-such-bucket-p/shards")
    _one_line(out, "pack failed:", "s3://no-such-bucket-p/shards", "does not exist")
    assert not (tmp_path / "raw").exists()  # refused before generating anything


def test_train_and_pack_endpoint_down_is_quick(tmp_path):
    from pipeline.train import free_port

    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s"}
    out, took = _train(tmp_path, "data.shards=s3://b/shards", env=env)
    _one_line(out, "config error: data.shards: s3://b/shards: cannot reach the S3 endpoint http://127.0.0.1:")
    assert took < 60, took  # python + torch import included; the check itself takes seconds
    out, _ = _cli("pipeline.pack", "--dataset", "synthetic", "--root", str(tmp_path / "raw"), "--out",
                  "s3://b/shards", env=env)
    _one_line(out, "pack failed: s3://b/shards: cannot reach the S3 endpoint")


def test_train_no_and_wrong_credentials(s3_auth_server, tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    none = {**base, "AWS_ENDPOINT_URL": s3_auth_server, "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
                          f"data.root={tmp_path}/raw", "data.shards=s3://b/shards", "tracking.enabled=false"], cwd=tmp_path, env=none,
                         capture_output=True, text=True, timeout=300)
    _one_line(out, "config error: data.shards: s3://b/shards: no S3 credentials found")
    wrong = {**none, "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0", "AWS_SECRET_ACCESS_KEY": "wrong"}
    out = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
                          f"data.root={tmp_path}/raw", "data.shards=s3://b/shards", "tracking.enabled=false"], cwd=tmp_path, env=wrong,
                         capture_output=True, text=True, timeout=300)
    _one_line(out, "config error: data.shards: s3://b/shards: access denied (403")


def test_changed_synthetic_parameters_regenerate_the_data(tmp_path, capsys):
    """data.synthetic.* changed while the shards exist: the data is made again from the new parameters
    (before: the old shards were used while MLflow recorded the new parameters)."""
    from pipeline.config import load_config
    from pipeline.train import prepare_data

    over = [f"data.root={tmp_path}/raw", f"data.shards={tmp_path}/shards"]
    man = prepare_data(load_config(ROOT / "configs" / "tiny.yaml", over))
    assert man["synthetic"]["num_ids"] == 8 and man["splits"]["train"]["num_identities"] == 8
    assert prepare_data(load_config(ROOT / "configs" / "tiny.yaml", over))["created"] == man["created"]  # reused
    capsys.readouterr()
    man2 = prepare_data(load_config(ROOT / "configs" / "tiny.yaml", over + ["data.synthetic.num_ids=6"]))
    assert "data.synthetic differs" in capsys.readouterr().out
    assert man2["synthetic"]["num_ids"] == 6 and man2["splits"]["train"]["num_identities"] == 6
    # a manifest packed before the parameters were stored: the raw root's marker tells
    path = tmp_path / "shards" / "manifest.json"
    raw = json.loads(path.read_text())
    del raw["synthetic"]
    path.write_text(json.dumps(raw))
    man3 = prepare_data(load_config(ROOT / "configs" / "tiny.yaml", over + ["data.synthetic.seed=5"]))
    assert man3["synthetic"]["seed"] == 5


def test_cpu_warning_before_ray_starts(monkeypatch, capsys):
    import ray

    from pipeline.config import load_config
    from pipeline.train import init_ray, shutdown_ray
    from sta_model.threads import usable_cpus

    class Stop(Exception):
        pass

    def no_ray(**kw):
        raise Stop

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    n = usable_cpus(omp=False)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"scaling.cpus_per_worker={n}"])  # 2 workers
    with pytest.raises(Stop):
        init_ray(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: scaling.num_workers=2 x scaling.cpus_per_worker={n} ")
    assert f"this machine has {n} usable" in err[0]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["scaling.num_workers=1", "data.p=4"])
    with pytest.raises(Stop):
        init_ray(cfg)
    assert capsys.readouterr().err == ""
    shutdown_ray()
