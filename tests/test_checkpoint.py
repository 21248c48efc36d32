"""Training checkpoints without Ray: manifests, ZeRO-3 detection, refusing pickled code (the export
round trip is in test_model_io.py).

Training checkpoints come from real single-process DeepSpeed engines (gloo, world size 1), made in a
spawned process so this process never holds a process group.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pipeline import checkpoint as ckpt_lib
from pipeline import model_io
from pipeline.checkpoint import CheckpointError
from pipeline.config import load_config
from pipeline.train import free_port

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 8


def _cfg(*overrides):
    return load_config(ROOT / "configs" / "tiny.yaml", list(overrides))


def _engine(stage: int):
    """A one-rank DeepSpeed engine on the tiny model (the caller's process joins a gloo group of 1)."""
    import torch.distributed as dist

    from pipeline.deepspeed_engine import build_engine

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = _cfg(f"deepspeed.zero_stage={stage}")
    torch.manual_seed(0)
    engine, _, _ = build_engine(model_io.build_model_from_config(cfg, NUM_CLASSES), cfg, world_size=1,
                                steps_per_epoch=3)
    return engine, cfg


def _save_after_one_step(stage: int, out: str, q) -> None:
    """Spawned: one optimizer step, then ``checkpoint.save`` into ``out``; puts the weights on ``q``."""
    engine, cfg = _engine(stage)
    torch.manual_seed(1)
    loss = engine(torch.randn(8, 2, 3, 64, 32))["embedding"].pow(2).mean()
    engine.backward(loss)
    engine.step()
    ckpt_lib.save(engine, out, rank=0, world_size=1, cfg=cfg,
                  meta={"epoch": 1, "global_step": 1, "num_classes": NUM_CLASSES, "mlflow_run_id": None})
    q.put(_as_bytes(model_io.full_state_dict(engine) if stage < 3 else {}))


def _load_into_fresh_engine(directory: str, q) -> None:
    """Spawned: ``checkpoint.load`` into a fresh stage-1 engine; puts (meta, weights) or the error text."""
    engine, _ = _engine(1)
    try:
        meta = ckpt_lib.load(engine, directory)
    except Exception as exc:  # reported to the test, which checks the type and the message
        q.put(("error", type(exc).__name__, str(exc)))
        return
    q.put(("ok", meta, _as_bytes(model_io.full_state_dict(engine))))


def _as_bytes(state: dict) -> bytes:
    """Tensors cross the process boundary as bytes (a queued tensor's shared memory dies with the child)."""
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> dict:
    import io

    return torch.load(io.BytesIO(data), weights_only=True)


def _spawn(fn, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(*args, q))
    p.start()
    try:
        return q.get(timeout=240)
    finally:
        p.join(timeout=60)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ck") / "checkpoint_epoch_0001")
    weights = _from_bytes(_spawn(_save_after_one_step, 1, out))
    return out, weights


@pytest.fixture
def copy_of(tmp_path):
    def make(src: str) -> Path:
        dst = tmp_path / Path(src).name
        shutil.copytree(src, dst)
        return dst
    return make


def _craft(path: Path, marker: Path) -> None:
    """Overwrite ``path`` with a torch file whose unpickling runs ``touch marker``."""
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"module": Payload()}, path)


def _rewrite_manifest(directory: Path) -> None:
    """What someone who can write the bucket can do too: make the manifest match the new bytes."""
    ckpt_lib.write_manifest(str(directory), rank=0, world_size=1)


def test_training_checkpoint_manifest_and_round_trip(stage1):
    out, weights = stage1
    man = json.loads(Path(out, "manifest.rank0.json").read_text())
    assert man["world_size"] == 1 and {"meta.json", "config.yaml", "ds/mp_rank_00_model_states.pt"} <= set(man["files"])
    assert ckpt_lib.verify(out) == []
    model, cfg, meta = model_io.load_training_checkpoint(out)
    assert meta["epoch"] == 1 and cfg.model.kind == "sta"
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, weights[k].float() if v.is_floating_point() else weights[k], msg=k)
    # DeepSpeed's own load (through the weights-only reader) restores the same weights and the meta
    status, meta2, restored = _spawn(_load_into_fresh_engine, out)
    assert status == "ok" and meta2["epoch"] == 1
    for k, v in _from_bytes(restored).items():
        torch.testing.assert_close(v, weights[k], msg=k)


def test_verify_finds_missing_truncated_changed_and_missing_rank_files(stage1, copy_of):
    out, _ = stage1
    ck = copy_of(out)
    (ck / "config.yaml").unlink()
    assert any("config.yaml missing" in p for p in ckpt_lib.verify(str(ck)))
    with pytest.raises(CheckpointError, match="incomplete checkpoint.*config.yaml missing"):
        model_io.load_training_checkpoint(str(ck))
    shutil.rmtree(ck)

    ck = copy_of(out)
    states = ck / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    states.write_bytes(states.read_bytes()[:100])  # an upload cut short
    assert any("has 100 bytes" in p for p in ckpt_lib.verify(str(ck), deep=False))
    shutil.rmtree(ck)

    ck = copy_of(out)
    data = bytearray((ck / "meta.json").read_bytes())
    data[-2] = ord(" ") if data[-2] != ord(" ") else ord("\t")  # same size, other bytes
    (ck / "meta.json").write_bytes(bytes(data))
    assert ckpt_lib.verify(str(ck), deep=False) == []  # sizes agree...
    assert any("sha256" in p for p in ckpt_lib.verify(str(ck)))  # ...the digest does not
    shutil.rmtree(ck)

    ck = copy_of(out)
    man = json.loads((ck / "manifest.rank0.json").read_text())
    (ck / "manifest.rank0.json").write_text(json.dumps({**man, "world_size": 2}))  # rank 1 never finished
    assert ckpt_lib.verify(str(ck)) == ["no manifest.rank1.json of 2 ranks' manifests"]
    (ck / "manifest.rank0.json").unlink()  # rank 0 never finished
    assert "never finished" in ckpt_lib.verify(str(ck))[0]


def test_zero3_is_detected_and_refused_without_deepspeed(tmp_path):
    out = str(tmp_path / "checkpoint_epoch_0001")
    _spawn(_save_after_one_step, 3, out)
    assert ckpt_lib.verify(out) == [] and ckpt_lib.is_zero3(out)
    with pytest.raises(CheckpointError, match="ZeRO-3.*final/ or best/ export"):
        model_io.load_training_checkpoint(out)


@pytest.mark.parametrize("victim", ["ds/mp_rank_00_model_states.pt", "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_crafted_pickle_is_refused_and_never_runs(stage1, copy_of, tmp_path, victim):
    out, _ = stage1
    ck = copy_of(out)
    marker = tmp_path / "pwned"
    _craft(ck / victim, marker)
    _rewrite_manifest(ck)  # the manifest is integrity, not a signature: the loader must refuse anyway
    assert ckpt_lib.verify(str(ck)) == []
    if victim.startswith("ds/mp_rank"):
        with pytest.raises(CheckpointError, match="refused.*posix.system|refused.*os.system") as err:
            model_io.load_training_checkpoint(str(ck))
        assert "weights_only" not in str(err.value)
    status, *rest = _spawn(_load_into_fresh_engine, str(ck))  # DeepSpeed's own reader, as --resume uses
    assert status == "error" and rest[0] == "CheckpointError" and "refused" in rest[1], rest
    assert "weights_only" not in rest[1]
    assert not marker.exists(), "the crafted pickle ran"


def test_evaluate_cli_refuses_a_crafted_checkpoint_in_one_line(stage1, copy_of, tmp_path):
    out, _ = stage1
    ck = copy_of(out)
    marker = tmp_path / "pwned"
    _craft(ck / "ds" / "mp_rank_00_model_states.pt", marker)
    _rewrite_manifest(ck)
    res = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--checkpoint", str(ck)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 2, res.stderr[-2000:]
    err = [line for line in res.stderr.splitlines() if "refused" in line]
    assert len(err) == 1 and "Traceback" not in res.stderr and "weights_only" not in res.stderr, res.stderr[-2000:]
    assert not marker.exists()


def test_safe_load_message_never_advises_weights_only_false(tmp_path):
    f = tmp_path / "model.pt"
    f.write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError) as err:
        ckpt_lib.safe_load(f)
    assert "weights_only" not in str(err.value) and str(f) in str(err.value)
