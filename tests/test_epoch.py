"""The Ray-free training epoch (pipeline.epoch.run_epoch): every loss term logged by its name, and a
non-finite loss stopped at the first sync after its step, naming the step and the terms."""
import pytest
import torch


class _Engine:
    """The part of a DeepSpeed engine run_epoch touches; train_step is replaced below."""

    def __init__(self):
        self.global_steps = 10

    def train(self):
        return self

    def get_lr(self):
        return [0.5]


def _fake_step(terms):
    def step(engine, batch, cfg, dtype, device):
        engine.global_steps += 1
        return {k: torch.tensor(float(v(engine.global_steps) if callable(v) else v)) for k, v in terms.items()}
    return step


def test_run_epoch_logs_every_loss_term_by_name(monkeypatch):
    from pipeline import epoch
    from pipeline.config import load_config

    cfg = load_config("configs/tiny.yaml", ["tracking.log_every_steps=2"])
    monkeypatch.setattr(epoch, "train_step", _fake_step({"total": 3.0, "triplet": 1.0, "center": 2.0}))
    logged = []
    batches = [{"clips": torch.zeros(4, 2, 3, 8, 4), "skipped": 1} for _ in range(4)]
    out = epoch.run_epoch(_Engine(), batches, cfg, dtype=torch.float32, device=torch.device("cpu"),
                           on_log=lambda step, values: logged.append((step, values)))
    assert out["loss_total"] == 3.0 and out["loss_center"] == 2.0 and out["loss_triplet"] == 1.0
    assert "reg_share" not in out and out["skipped_samples"] == 4 and out["batches"] == 4
    assert [s for s, _ in logged] == [12, 14]
    assert set(logged[0][1]) == {"step/loss_total", "step/loss_triplet", "step/loss_center", "step/lr"}


def test_run_epoch_stops_at_a_non_finite_loss_naming_step_and_terms(monkeypatch):
    from pipeline import epoch
    from pipeline.config import load_config

    cfg = load_config("configs/tiny.yaml", ["tracking.log_every_steps=3"])
    nan_at_12 = lambda step: float("nan") if step == 12 else 1.0  # noqa: E731
    monkeypatch.setattr(epoch, "train_step", _fake_step({"total": nan_at_12, "ce": nan_at_12, "reg": 0.25}))
    seen = []

    def batches():
        for i in range(6):
            seen.append(i)
            yield {"clips": torch.zeros(4, 2, 3, 8, 4)}

    with pytest.raises(epoch.NonFiniteLossError, match=r"global step 12 \(total=nan, ce=nan, reg=0.25\)"):
        epoch.run_epoch(_Engine(), batches(), cfg, dtype=torch.float32, device=torch.device("cpu"),
                         on_log=lambda step, values: None)
    assert seen == [0, 1, 2]  # stopped at the first sync after the bad step, not at the epoch's end


def test_train_step_applies_the_batch_flips_and_erasing_on_the_device(monkeypatch):
    """A loader's uint8 training batch carries its flips/erasing; train_step's input has them applied."""
    import numpy as np

    from pipeline import epoch
    from pipeline.config import load_config
    from pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD, augment_clips, mean_fill, normalize_clips

    seen = []

    class Engine:
        def __call__(self, x):
            seen.append(x)
            raise StopIteration  # the input is all this test needs

    cfg = load_config("configs/tiny.yaml", [])
    clips = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 2, 8, 4, 3), dtype=np.uint8))
    flips, erase = torch.tensor([True, False]), torch.tensor([[0, 0, 0, 0], [2, 1, 3, 2]])
    want = normalize_clips(augment_clips(clips.clone(), flips, erase, mean_fill(IMAGENET_MEAN)),
                           IMAGENET_MEAN, IMAGENET_STD)
    plain = normalize_clips(clips, IMAGENET_MEAN, IMAGENET_STD)
    batch = {"clips": clips, "flips": flips, "erase": erase, "pids": torch.tensor([0, 1]), "skipped": 0}
    with pytest.raises(StopIteration):
        epoch.train_step(Engine(), batch, cfg, torch.float32, torch.device("cpu"))
    assert torch.equal(seen[0], want) and not torch.equal(seen[0], plain)
