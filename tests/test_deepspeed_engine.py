"""DeepSpeed engine from our config: precision, schedule, and data-parallel equivalence (real engines, gloo)."""
import os
import queue
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import load_config
from pipeline.deepspeed_engine import deepspeed_config, lr_factor, resolve_precision
from pipeline.train import free_port


def _cfg(*overrides):
    return load_config("configs/tiny.yaml", list(overrides))


def test_precision_auto_is_fp32_on_cpu():
    assert resolve_precision("auto", use_gpu=False) == "fp32"
    assert resolve_precision("bf16", use_gpu=False) == "bf16"


def test_deepspeed_config_batch_arithmetic():
    cfg = _cfg("deepspeed.grad_accum=3", "deepspeed.grad_clip=1.5", "deepspeed.zero_stage=2")
    ds = deepspeed_config(cfg, world_size=4, precision="bf16")
    assert ds["train_micro_batch_size_per_gpu"] == cfg.data.p * cfg.data.k
    assert ds["train_batch_size"] == cfg.data.p * cfg.data.k * 3 * 4
    assert ds["gradient_clipping"] == 1.5 and ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"]["stage"] == 2
    assert "fp16" in deepspeed_config(cfg, 1, "fp16") and "bf16" not in deepspeed_config(cfg, 1, "fp32")


def test_deepspeed_config_bucket_sizes():
    zero = deepspeed_config(_cfg(), world_size=2, precision="fp32")["zero_optimization"]
    assert zero["stage"] == 1 and zero["overlap_comm"] is True
    assert (zero["reduce_bucket_size"], zero["allgather_bucket_size"]) == (50_000_000, 50_000_000)
    assert isinstance(zero["reduce_bucket_size"], int) and isinstance(zero["allgather_bucket_size"], int)
    cfg = _cfg("deepspeed.reduce_bucket_size=2e6", "deepspeed.allgather_bucket_size=300000000")
    zero = deepspeed_config(cfg, world_size=2, precision="bf16")["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["allgather_bucket_size"]) == (2_000_000, 300_000_000)
    # ZeRO-0 has no buckets of its own (DeepSpeed's plain allreduce after backward)
    assert deepspeed_config(_cfg("deepspeed.zero_stage=0"), 2, "fp32")["zero_optimization"] == {"stage": 0}


def test_lr_schedule_warmup_and_milestones():
    cfg = _cfg("optim.warmup_epochs=2", "optim.warmup_factor=0.1", "optim.milestones=[4, 6]", "optim.gamma=0.1")
    f = [lr_factor(s, 10, cfg) for s in (0, 10, 20, 39, 40, 59, 60)]
    assert f[0] == pytest.approx(0.1) and f[1] == pytest.approx(0.55)
    assert f[2] == pytest.approx(1.0) and f[3] == pytest.approx(1.0)
    assert f[4] == pytest.approx(0.1) and f[5] == pytest.approx(0.1) and f[6] == pytest.approx(0.01)


def _one_step(rank, world, port, overrides, clips, pids, out):
    """One real DeepSpeed step on this rank's slice; puts the parameter update on the queue."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from pipeline.deepspeed_engine import build_engine
    from pipeline.epoch import train_step
    from pipeline.model_io import build_model_from_config

    cfg = _cfg(*overrides, f"data.p={clips.shape[0] // world // 2}", "data.k=2")
    torch.manual_seed(0)
    model = build_model_from_config(cfg, num_classes=int(pids.max()) + 1).train()
    for m in model.modules():  # batch statistics differ between B and 2B by construction; compare the rest
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    layouts = []  # per conv call: input is channels_last
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_pre_hook(lambda mod, args: layouts.append(
                args[0].is_contiguous(memory_format=torch.channels_last)))
    engine, _, _ = build_engine(model, cfg, world_size=world, steps_per_epoch=10)
    b = clips.shape[0] // world
    sl = slice(rank * b, (rank + 1) * b)
    losses = train_step(engine, {"clips": clips[sl], "pids": pids[sl]}, cfg, torch.float32, torch.device("cpu"))
    if rank == 0:
        after = dict(engine.module.named_parameters())
        update = {k: (after[k].detach() - before[k]).numpy().copy() for k in before}  # numpy: no fd sharing
        out.put({"update": update, "loss": float(losses["total"]), "layouts": layouts,
                 "compiled": engine.is_compiled,
                 "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]})
    dist.barrier()
    dist.destroy_process_group()


def _run(world, overrides, clips, pids):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_one_step, args=(r, world, port, overrides, clips, pids, q)) for r in range(world)]
    for p in procs:
        p.start()
    # Generous on a loaded CI machine (two processes import torch and DeepSpeed and build an engine),
    # and fail fast when a rank dies instead of waiting out the deadline.
    deadline = time.monotonic() + 600
    while True:
        try:
            result = q.get(timeout=5)
            break
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead and time.monotonic() < deadline, f"rank exit codes {[p.exitcode for p in procs]}"
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    return result


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, bucket", [(0, 5e6), (2, 5e6), (2, 1e4)])  # 1e4: several buckets per step
def test_data_parallel_equivalence(zero_stage, bucket):
    """1 worker × batch 2B and 2 workers × B give the same update (SGD: update = -lr · mean gradient)."""
    torch.manual_seed(1)
    clips = torch.randn(8, 2, 3, 64, 32)
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    overrides = ["optim.optimizer=sgd", "optim.momentum=0", "optim.weight_decay=0", "optim.lr=0.1",
                 "loss.w_tri=0", "loss.lambda_reg=0", "deepspeed.grad_clip=0",
                 f"deepspeed.zero_stage={zero_stage}", "optim.warmup_epochs=0",
                 f"deepspeed.reduce_bucket_size={bucket:g}"]
    one = _run(1, overrides, clips, pids)["update"]
    two = _run(2, overrides, clips, pids)["update"]
    moved = sum(float(abs(v).sum()) for v in one.values())
    assert moved > 0
    for k in one:
        torch.testing.assert_close(torch.from_numpy(two[k]), torch.from_numpy(one[k]), rtol=1e-4, atol=1e-6, msg=k)


_STEP = (torch.randn(8, 2, 3, 64, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
_SGD = ["optim.optimizer=sgd", "optim.momentum=0", "optim.lr=0.1"]  # update = -lr * grad: comparable, unlike Adam's sign-like first step


def test_channels_last_engine_step_equals_default():
    """A real ZeRO-1 engine step with model.channels_last: every conv input is NHWC (parameters
    keep their strides, which DeepSpeed's initial broadcast needs) and the update is the same."""
    ref = _run(1, _SGD, *_STEP)
    cl = _run(1, _SGD + ["model.channels_last=true"], *_STEP)
    assert cl["layouts"] and all(cl["layouts"]) and not any(ref["layouts"])
    assert cl["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    for k in ref["update"]:
        torch.testing.assert_close(torch.from_numpy(cl["update"][k]), torch.from_numpy(ref["update"][k]),
                                   rtol=1e-3, atol=1e-6, msg=k)


@pytest.mark.slow
def test_compiled_engine_step_equals_eager():
    """model.compile: the engine's module runs through inductor (tiny trunk, 64x32, CPU; the clips
    have N=2 frames, so the Reg pair drawn by eager and compiled RNGs is the same pair)."""
    ref = _run(1, _SGD, *_STEP)
    comp = _run(1, _SGD + ["model.compile=true"], *_STEP)
    assert comp["compiled"] and comp["graphs"] >= 1 and not ref["compiled"] and ref["graphs"] == 0
    assert comp["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    for k in ref["update"]:
        torch.testing.assert_close(torch.from_numpy(comp["update"][k]), torch.from_numpy(ref["update"][k]),
                                   rtol=1e-3, atol=1e-5, msg=k)
