"""pipeline.viz: every plot writes a real PNG of the documented size; bad inputs raise ValueError."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import viz


def _png(path, size=None):
    """Open the PNG, check its format/size, and that it is not a blank canvas."""
    with Image.open(path) as img:
        assert img.format == "PNG"
        if size is not None:
            assert img.size == size
        pixels = np.asarray(img.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 5.0, "image is (nearly) uniform"
    return pixels


def _clip(n=4, h=64, w=32, fh=16, fw=8, k=4, seed=0):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    feat = rng.random((n, fh, fw)) ** 4
    maps = feat / feat.sum(axis=(1, 2), keepdims=True)  # each map sums to 1, like the model's g_n
    stripe = maps.reshape(n, k, fh // k, fw).sum(axis=(2, 3))
    scores = stripe / stripe.sum(axis=0, keepdims=True)  # columns sum to 1
    return frames, maps, scores


# --------------------------------------------------------------------------- CMC

def test_plot_cmc_png(tmp_path):
    cmc = np.minimum(1.0, 0.7 + 0.02 * np.arange(50))
    out = viz.plot_cmc(cmc, tmp_path / "sub" / "cmc.png", label="STA",
                       extra={"STA + rerank": np.minimum(1.0, cmc + 0.05)})
    assert out == tmp_path / "sub" / "cmc.png"
    _png(out, (round(viz.CMC_SIZE[0] * viz.DPI), round(viz.CMC_SIZE[1] * viz.DPI)))


def test_plot_cmc_short_curve_and_dpi(tmp_path):
    out = viz.plot_cmc(torch.tensor([0.5, 0.8, 1.0]), tmp_path / "c.png", dpi=50)
    _png(out, (round(viz.CMC_SIZE[0] * 50), round(viz.CMC_SIZE[1] * 50)))


@pytest.mark.parametrize("bad", [np.zeros((3, 3)), np.array([]), np.array([0.5, 1.2]),
                                 np.array([0.9, 0.5]), np.array([0.5, np.nan])])
def test_plot_cmc_rejects_bad_curves(tmp_path, bad):
    with pytest.raises(ValueError):
        viz.plot_cmc(bad, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_cmc_rejects_bad_extra(tmp_path):
    with pytest.raises(ValueError, match="extra"):
        viz.plot_cmc(np.ones(5), tmp_path / "x.png", extra={"other": np.ones((2, 2))})


# --------------------------------------------------------------------------- attention

def _plot_one(frames, maps, scores, path, **kw):
    return viz.plot_attention_grid([(frames, maps, scores, None)], path, **kw)


def test_plot_attention_png(tmp_path):
    frames, maps, scores = _clip()
    out = _plot_one(frames, maps, scores, tmp_path / "att.png", title="query 7")
    img4 = _png(out)
    assert img4.shape[0] == round((viz.ATTENTION_ROW_HEIGHT + 0.4) * viz.DPI)
    # Width grows with the number of frames (frames are columns).
    frames2, maps2, scores2 = _clip(n=2)
    img2 = _png(_plot_one(frames2, maps2, scores2, tmp_path / "att2.png"))
    assert img2.shape[0] == round(viz.ATTENTION_ROW_HEIGHT * viz.DPI)
    assert img4.shape[1] > img2.shape[1]


def test_plot_attention_heatmap_is_overlaid(tmp_path):
    # Black frames: anything coloured in the frame panels comes from the heatmap overlay.
    frames, maps, scores = _clip()
    frames[:] = 0
    pixels = _png(_plot_one(frames, maps, scores, tmp_path / "a.png"))
    saturated = (np.abs(pixels[..., 0] - pixels[..., 2]) > 60).mean()
    assert saturated > 0.02


def test_plot_attention_accepts_torch(tmp_path):
    frames, maps, scores = _clip()
    out = _plot_one(torch.from_numpy(frames), torch.from_numpy(maps).float(),
                    torch.from_numpy(scores).float(), tmp_path / "t.png")
    _png(out)


@pytest.mark.parametrize("which,bad", [
    ("frames", np.zeros((4, 64, 32, 3), dtype=np.float32)),  # not uint8
    ("frames", np.zeros((4, 64, 32), dtype=np.uint8)),  # no channels
    ("maps", np.zeros((3, 16, 8))),  # N mismatch
    ("maps", np.zeros((4, 16))),  # not 3-D
    ("scores", np.zeros((3, 4))),  # N mismatch
    ("scores", np.zeros((4, 3))),  # 16 rows not divisible into 3 stripes
])
def test_plot_attention_rejects_mismatched_shapes(tmp_path, which, bad):
    frames, maps, scores = _clip()
    args = {"frames": frames, "maps": maps, "scores": scores}
    args[which] = bad
    with pytest.raises(ValueError):
        _plot_one(args["frames"], args["maps"], args["scores"], tmp_path / "x.png")


def test_plot_attention_grid(tmp_path):
    items = [(*_clip(seed=i), f"query {i}") for i in range(3)]
    items.append((*_clip(n=3, seed=9), "short clip"))
    pixels = _png(viz.plot_attention_grid(items, tmp_path / "grid.png"))
    assert pixels.shape[0] == round(viz.ATTENTION_ROW_HEIGHT * 4 * viz.DPI)
    with pytest.raises(ValueError, match=r"items\[1\]"):
        viz.plot_attention_grid([items[0], (items[1][0], items[1][1][:2], items[1][2], "bad")],
                                tmp_path / "bad.png")
    with pytest.raises(ValueError):
        viz.plot_attention_grid([], tmp_path / "empty.png")


def test_denormalize_round_trip():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 24, 12, 3), dtype=np.uint8)
    mean, std = np.array(viz.IMAGENET_MEAN), np.array(viz.IMAGENET_STD)
    normed = (images.transpose(0, 3, 1, 2) / 255.0 - mean[None, :, None, None]) / std[None, :, None, None]
    back = viz.denormalize(torch.from_numpy(normed).float(), mean, std)
    assert back.dtype == np.uint8 and back.shape == images.shape
    np.testing.assert_array_equal(back, images)
    np.testing.assert_array_equal(viz.denormalize(normed.astype(np.float32)), images)


def test_denormalize_clips_out_of_range_and_validates():
    out = viz.denormalize(np.full((1, 3, 2, 2), 100.0, dtype=np.float32), (0, 0, 0), (1, 1, 1))
    assert out.max() == 255
    with pytest.raises(ValueError):
        viz.denormalize(np.zeros((2, 4, 8, 8)))  # 4 channels
    with pytest.raises(ValueError):
        viz.denormalize(np.zeros((3, 8, 8)))  # no frame axis
    with pytest.raises(ValueError):
        viz.denormalize(np.zeros((1, 3, 8, 8)), mean=(0.5, 0.5), std=(1, 1, 1))


# --------------------------------------------------------------------------- curves / sweep

def test_plot_curves(tmp_path):
    history = {
        "loss/total": [(s, 5.0 / (s + 1)) for s in range(30)],
        "loss/triplet": [(s, 1.0 / (s + 1)) for s in reversed(range(30))],
        "eval/mAP": [(10, 0.3), (20, 0.5), (30, 0.6)],
        "lr": [(s, 3e-4) for s in range(30)],
        "unused": [],
    }
    out = viz.plot_curves(history, tmp_path / "curves.png", title="run")
    # 3 groups (loss, eval, lr) → one row of 3 panels.
    _png(out, (round(3 * viz.CURVE_PANEL[0] * viz.DPI), round((viz.CURVE_PANEL[1] + 0.4) * viz.DPI)))
    assert viz.metric_group("loss/ce") == "loss" and viz.metric_group("eval.rank1") == "eval"


def test_plot_curves_rejects_bad_history(tmp_path):
    with pytest.raises(ValueError):
        viz.plot_curves({}, tmp_path / "x.png")
    with pytest.raises(ValueError):
        viz.plot_curves({"a": [(1, 2, 3)]}, tmp_path / "x.png")


def test_plot_sweep(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"optim.lr": float(10 ** rng.uniform(-5, -2)), "loss.lambda_reg": float(rng.uniform(0, 1e-3)),
             "model.trunk": ["tiny", "resnet18"][i % 2], "mAP": float(rng.uniform(0.2, 0.8))} for i in range(8)]
    rows.append({"optim.lr": 1e-4, "model.trunk": "tiny", "mAP": float("nan")})  # failed trial: skipped
    out = viz.plot_sweep(rows, ["optim.lr", "loss.lambda_reg", "model.trunk"], "mAP", tmp_path / "sweep.png")
    _png(out, (round((1.7 * 4 + 2.0) * viz.DPI), round(viz.SWEEP_HEIGHT * viz.DPI)))


def test_plot_sweep_rejects(tmp_path):
    with pytest.raises(ValueError):
        viz.plot_sweep([{"a": 1}], ["a"], "mAP", tmp_path / "x.png")  # no metric anywhere
    with pytest.raises(ValueError):
        viz.plot_sweep([{"a": 1, "mAP": 0.5}], [], "mAP", tmp_path / "x.png")
    with pytest.raises(ValueError):
        viz.plot_sweep([{"a": 1, "mAP": 0.5}], ["mAP"], "mAP", tmp_path / "x.png")


def test_plot_ranked_visrank(tmp_path):
    """torchreid-style ranked results: query + top-k frames, green/red frames for right/wrong identities."""
    from PIL import Image

    rng = np.random.default_rng(0)
    frame = lambda: rng.integers(0, 255, (64, 32, 3), dtype=np.uint8)  # noqa: E731
    rows = [(frame(), f"query id {q}", [(frame(), k % 3 == 0, f"id {k}") for k in range(10)]) for q in range(3)]
    out = viz.plot_ranked(rows, tmp_path / "visrank.png", title="t")
    img = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3).astype(int)
    green = ((img[:, 1] > 150) & (img[:, 0] < 80) & (img[:, 2] < 90)).sum()
    red = ((img[:, 0] > 190) & (img[:, 1] < 70) & (img[:, 2] < 70)).sum()
    assert green > 500 and red > 500  # both kinds of border are drawn
    with pytest.raises(ValueError):
        viz.plot_ranked([], tmp_path / "x.png")


def test_ranked_rows_follow_the_evaluation_protocol():
    """Top-k by distance, same-identity same-camera gallery entries left out, only queries with a true match."""
    import torch

    from pipeline.visrank import ranked_rows

    thumbs = lambda n: [np.full((4, 2, 3), i, np.uint8) for i in range(n)]  # noqa: E731
    q = {"index": [0, 1], "feats": torch.tensor([[0.0], [10.0]]), "pids": np.array([1, 7]),
         "camids": np.array([0, 0]), "thumbs": thumbs(2)}
    g = {"index": list(range(5)), "feats": torch.tensor([[0.0], [0.1], [0.2], [5.0], [10.0]]),
         "pids": np.array([1, 1, 2, 1, 7]), "camids": np.array([0, 1, 1, 1, 0]), "thumbs": thumbs(5)}
    rows = ranked_rows(q, g, n_queries=4, topk=3)
    assert len(rows) == 1  # query pid 7 has only a same-camera match: skipped, as in evaluation
    qframe, label, ranked = rows[0]
    assert label == "query id 1 c0"
    assert [r[1] for r in ranked] == [True, False, True]  # g1 (0.1), g2 (0.2, wrong id), g3 (5.0); g0 dropped
    assert [int(r[0][0, 0, 0]) for r in ranked] == [1, 2, 3]
