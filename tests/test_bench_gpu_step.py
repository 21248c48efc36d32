"""Smoke test of bench/gpu_step.py on CPU with tiny sizes: it runs end to end (synthetic data set
generated and packed, real DeepSpeed engine, real loader) and writes the JSON the GPU run reports."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = str(ROOT / "bench" / "gpu_step.py")


@pytest.mark.parametrize("decode", ["loader", "device"])
def test_cpu_smoke_run_writes_json(tmp_path, decode):
    out = tmp_path / "gpu_step.json"
    cmd = [sys.executable, BENCH, "--device", "cpu", "--trunk", "tiny", "--height", "64", "--width", "32",
           "--p", "4", "--k", "2", "--precision", "fp32", "--steps", "2", "--warmup", "1", "--repeats", "2",
           "--num-workers", "1", "--ids", "8", "--peak-tflops", "0.5", "--channels-last", "--threads", "1",
           "--decode", decode, "--data", str(tmp_path / "data"), "--json", str(out)]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "real/synthetic throughput" in proc.stdout
    r = json.loads(out.read_text())
    s = r["setup"]
    assert (s["batch_clips"], s["frames_per_step"], s["precision"], s["channels_last"]) == (8, 32, "fp32", True)
    assert s["decode"] == decode
    assert r["flops_per_step"] > 1e8 and r["peak_tflops"] == 0.5
    for mode in ("synthetic", "real"):
        m = r[mode]
        assert len(m["runs"]) == 2 and all(x["step_s"] > 0 for x in m["runs"])
        assert m["clips_per_s"] == pytest.approx(8 / m["step_s"])
        assert m["frames_per_s"] == pytest.approx(4 * m["clips_per_s"])
        assert m["tflops"] == pytest.approx(r["flops_per_step"] / m["step_s"] / 1e12)
        assert m["mfu"] == pytest.approx(m["tflops"] / 0.5)
    ratio = r["ratio_real_over_synthetic"]
    assert len(ratio["per_repeat"]) == 2 and ratio["min"] <= ratio["median"] <= ratio["max"]
    assert r["target"] == 0.95 and r["met"] == (ratio["median"] >= 0.95)
    assert os.path.exists(os.path.join(s["shards"], "manifest.json"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_gpu_is_a_usage_error():
    proc = subprocess.run([sys.executable, BENCH, "--device", "cuda"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
