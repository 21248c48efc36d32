"""Checks that need a CUDA GPU (skipped without one; run them where a GPU is lent:
``pytest -m gpu tests/test_gpu.py``): nvJPEG decoding of ``decode="device"`` batches against the
CPU decode, channels_last + bf16 on the device, and ``bench/gpu_step.py`` end to end on CUDA."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import storage, urls
from pipeline.transforms import decode_clips

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _batch(frames):
    offsets = np.zeros(len(frames) + 1, np.int64)
    np.cumsum([len(f) for f in frames], out=offsets[1:])
    return np.frombuffer(b"".join(frames), np.uint8).copy(), offsets


def test_nvjpeg_batch_close_to_cpu_decode():
    pytest.importorskip("torchvision")
    y, x = np.mgrid[0:256, 0:128]
    rng = np.random.default_rng(0)
    frames = [_jpeg(np.stack([(y + s) % 256, (x * 2 + s) % 256, (x + y) % 256], -1).astype(np.uint8))
              for s in rng.integers(0, 255, 8)]
    frames[5] = _jpeg(rng.integers(0, 256, (300, 150, 3), dtype=np.uint8))  # another size: resized on device
    jpegs, offsets = _batch(frames)
    kw = dict(clip_len=2, height=256, width=128, fill=(124, 116, 104), pids=[0, 0, 1, 1],
              flips=np.array([True, False, False, True]), erase=np.array([[0, 0, 0, 0], [10, 20, 50, 30],
                                                                          [0, 0, 0, 0], [0, 0, 0, 0]]))
    gpu, bad = decode_clips(jpegs, offsets, device=CUDA, **kw)
    cpu, _ = decode_clips(jpegs, offsets, device=torch.device("cpu"), **kw)
    assert bad == 0 and gpu.device.type == "cuda" and gpu.shape == cpu.shape == (4, 2, 256, 128, 3)
    diff = (gpu.cpu().int() - cpu.int()).abs()
    same_size = torch.ones(4, 2, dtype=torch.bool)
    same_size[2, 1] = False
    assert diff[same_size].float().mean() < 1.0  # nvJPEG's IDCT/upsampling may differ by a level or two
    assert diff[2, 1].float().mean() < 6.0  # antialiased bilinear on the device vs PIL's


def test_device_decode_loader_batches_match_loader_decode(tmp_path):
    pytest.importorskip("torchvision")
    from pipeline.pack import pack
    from pipeline.train_data import train_loader
    from pipeline.synthetic import generate

    gen = generate(str(tmp_path / "raw"), num_ids=8, num_test_ids=2, tracklets_per_id=2,
                   frames_per_tracklet=(4, 8), height=64, width=32, seed=0)
    url = str(tmp_path / "shards")
    pack("synthetic", gen["root"], url, progress=False)
    kw = dict(clip_len=4, p=4, k=2, height=64, width=32, batches_per_epoch=3, epoch=0, seed=0,
              num_workers=1, normalize=False, random_erasing=0.5)
    ref = list(train_loader(url, **kw))
    got = list(train_loader(url, decode="device", device="cuda", **kw))
    from pipeline.transforms import IMAGENET_MEAN, augment_clips, mean_fill

    for a, b in zip(ref, got, strict=True):
        assert b["clips"].device.type == "cuda" and torch.equal(a["pids"], b["pids"])
        # the loader's uint8 batches carry their flips/erasing: applied here on the GPU, as training does
        want = augment_clips(a["clips"].to(CUDA), a["flips"], a["erase"], mean_fill(IMAGENET_MEAN))
        assert (want.int() - b["clips"].int()).abs().float().mean() < 1.0
    assert storage.exists(urls.join(url, "manifest.json"))


def test_channels_last_bf16_forward_matches():
    from sta_model.model import STA

    torch.manual_seed(0)
    a = STA(16, trunk="resnet18", num_blocks=4, embed_dim=64).to(CUDA).eval()
    b = STA(16, trunk="resnet18", num_blocks=4, embed_dim=64, channels_last=True).to(CUDA).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 3, 256, 128, device=CUDA)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ea, eb = a(x), b(x)
    ea = ea if torch.is_tensor(ea) else ea["embedding"]
    eb = eb if torch.is_tensor(eb) else eb["embedding"]
    torch.testing.assert_close(ea.float(), eb.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("decode", ["loader", "device"])
def test_gpu_step_bench_runs_on_cuda(tmp_path, decode):
    out = tmp_path / "gpu_step.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_step.py"), "--device", "cuda", "--trunk", "resnet18",
           "--p", "4", "--k", "2", "--steps", "3", "--warmup", "2", "--repeats", "1", "--num-workers", "2",
           "--ids", "16", "--channels-last", "--decode", decode, "--data", str(tmp_path / "data"),
           "--json", str(out)]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["setup"]["precision"] == "bf16" and r["flops_per_step"] > 1e11
    assert all(r[m]["mfu"] > 0 for m in ("synthetic", "real"))
