"""The logged MLflow model can be picked up without this checkout: a fresh venv with only torch and
mlflow loads it (`mlflow.pytorch.load_model`) and embeds a clip; its signature, input example and
requirements say what it takes. Slow: creating the venv installs torch (set STA_FRESH_VENV to an
existing venv with exactly `torch` and `mlflow` to reuse one)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.config import load_config
from pipeline.model_io import build_model_from_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _fresh_venv(tmp_path_factory) -> Path:
    given = os.environ.get("STA_FRESH_VENV")
    if given:
        return Path(given)
    import mlflow

    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pins = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *pins], capture_output=True, text=True,
                       timeout=1800)
    if r.returncode:
        pytest.skip(f"could not build a fresh venv with {pins}: {r.stderr[-500:]}")
    return venv


def test_logged_model_loads_in_a_fresh_venv_without_the_project(tmp_path, tmp_path_factory):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"tracking.uri=sqlite:///{tmp_path}/m.db",
                                                       f"tracking.registered_model=sta-tiny-{uuid.uuid4().hex[:6]}"])
    torch.manual_seed(0)
    model = build_model_from_config(cfg, num_classes=8).eval()
    t = tracking.Tracker()
    run_id = t.start(cfg)
    info = t.log_model(model, cfg, metrics={"eval/mAP": 0.5, "eval/rank1": 0.6})
    t.end()
    assert info is not None and str(info.registered_model_version) == "1"

    # What the model page shows: signature (B, N, 3, H, W) -> (B, D), an input example, pinned requirements.
    N, H, W = cfg.eval.clip_len, cfg.data.height, cfg.data.width
    sig = info.signature.to_dict()
    inputs = json.loads(sig["inputs"])[0]["tensor-spec"]
    outputs = json.loads(sig["outputs"])[0]["tensor-spec"]
    assert inputs["shape"][1:] == [N, 3, H, W] and outputs["shape"][1:] == [cfg.model.embed_dim]
    local = Path(tmp_path / "dl")
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking.uri)
    try:
        path = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(local)))
    finally:
        mlflow.set_tracking_uri(None)
    reqs = (path / "requirements.txt").read_text()
    assert f"torch=={torch.__version__.split('+')[0]}" in reqs and "numpy==" in reqs
    assert (path / "code" / "sta_model" / "model.py").exists()
    assert list(path.glob("input_example*")) or list(path.glob("serving_input_example*"))
    logged = MlflowClient(cfg.tracking.uri).get_logged_model(info.model_id)
    assert {m.key for m in logged.metrics} >= {"eval/mAP", "eval/rank1"}

    clip = np.random.default_rng(0).random((2, N, 3, H, W), dtype=np.float32)
    np.save(tmp_path / "clip.npy", clip)
    with torch.no_grad():
        expected = model(torch.from_numpy(clip)).numpy()
    np.save(tmp_path / "expected.npy", expected)

    venv = _fresh_venv(tmp_path_factory)
    script = f"""
import importlib.util, sys
assert importlib.util.find_spec("sta_model") is None, "sta_model must not be installed here"
assert importlib.util.find_spec("pipeline") is None
import numpy as np, torch, mlflow.pytorch
m = mlflow.pytorch.load_model({str(path)!r}).eval()
with torch.no_grad():
    out = m(torch.from_numpy(np.load({str(tmp_path / 'clip.npy')!r}))).numpy()
np.testing.assert_allclose(out, np.load({str(tmp_path / 'expected.npy')!r}), rtol=1e-4, atol=1e-5)
print("EMBEDDED", out.shape)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    r = subprocess.run([str(venv / "bin" / "python"), "-I", "-c", script], cwd="/", env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"EMBEDDED (2, {cfg.model.embed_dim})" in r.stdout
    assert run_id
