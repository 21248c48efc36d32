"""`python -m pipeline.evaluate` on things that are not a model: one line on stderr, exit 2, and never
torch's advice to unpickle with weights_only=False (the real CLI, in a subprocess)."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def _evaluate(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--checkpoint", *args], cwd=cwd or ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def _one_line_error(out: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert len(lines) == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "weights_only" not in out.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _export_dir(path: Path, model_bytes: bytes) -> Path:
    """An export-shaped directory (valid config and meta) holding ``model_bytes`` as model.pt."""
    from pipeline.config import load_config

    path.mkdir(parents=True)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [])
    (path / "config.yaml").write_text(cfg.to_yaml())
    (path / "meta.json").write_text(json.dumps({"num_classes": 8, "model": "sta"}))
    (path / "model.pt").write_bytes(model_bytes)
    return path


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/sta-evaluate-pwned",))


def test_missing_directory_plain_file_and_non_checkpoint_dirs(tmp_path):
    _one_line_error(_evaluate(str(tmp_path / "nope")), "checkpoint error:", "nope: no such directory")
    (tmp_path / "file.pt").write_bytes(b"x")
    _one_line_error(_evaluate(str(tmp_path / "file.pt")), "file.pt: is a file, not a directory")
    (tmp_path / "empty").mkdir()
    _one_line_error(_evaluate(str(tmp_path / "empty")), "empty directory")
    notes = tmp_path / "notes"
    (notes / "data").mkdir(parents=True)
    (notes / "README.txt").write_text("hello")
    _one_line_error(_evaluate(str(notes)), "notes: neither an exported model")
    run = tmp_path / "run"
    for d in ("checkpoint_epoch_0001", "checkpoint_epoch_0002", "final"):
        (run / d).mkdir(parents=True)
    _one_line_error(_evaluate(str(run)), "a run directory", "final", "checkpoint_epoch_0002")
    _one_line_error(_evaluate("gs://bucket/run/final"), "unsupported URL scheme", "gs://bucket/run/final")


def test_garbage_and_pickled_code_model_pt(tmp_path):
    garbage = _export_dir(tmp_path / "garbage", os.urandom(4096))
    _one_line_error(_evaluate(str(garbage)), "checkpoint error:", "garbage")
    evil = _export_dir(tmp_path / "evil", pickle.dumps({"w": _Evil()}))
    if os.path.exists("/tmp/sta-evaluate-pwned"):
        os.remove("/tmp/sta-evaluate-pwned")
    _one_line_error(_evaluate(str(evil)), "checkpoint error:", "evil")
    assert not os.path.exists("/tmp/sta-evaluate-pwned")
    broken = _export_dir(tmp_path / "badcfg", b"")
    (broken / "config.yaml").write_bytes(b"\x00\x01 not: [yaml")
    _one_line_error(_evaluate(str(broken)), "checkpoint error:", "badcfg")


def test_s3_missing_bucket_and_empty_prefix(s3_server, s3_bucket):
    _one_line_error(_evaluate("s3://no-such-bucket-x/run/final"), "bucket 'no-such-bucket-x' does not exist")
    _one_line_error(_evaluate(f"s3://{s3_bucket}/run/final"), "nothing under this prefix")
