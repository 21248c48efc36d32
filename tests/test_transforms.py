"""Clip sampling / decoding / augmentation helpers of the streaming loaders."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.transforms import (IMAGENET_MEAN, IMAGENET_STD, _pil_decode, decode_into,
                                 erase_box, eval_clip_indices, frame_buffer, mean_fill, mirror_bgr_rows,
                                 normalize_clips, restricted_indices)


def _jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def decode_frame(data, height: int, width: int, flip: bool = False) -> np.ndarray:
    """``decode_into`` a new ``(height, width, 3)`` array."""
    return decode_into(data, np.empty((height, width, 3), np.uint8), flip)


def restricted_sample(n_frames: int, clip_len: int, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(restricted_indices(n_frames, clip_len, rng), dtype=np.int64)


@pytest.mark.parametrize("n_frames,clip_len", [(4, 4), (10, 4), (17, 5), (100, 4), (9, 1)])
def test_restricted_indices_one_frame_per_chunk_in_order(n_frames, clip_len):
    rng = np.random.default_rng(0)
    edges = (np.arange(clip_len + 1) * n_frames) // clip_len
    seen = set()
    for _ in range(200):
        idx = restricted_sample(n_frames, clip_len, rng)
        assert idx.shape == (clip_len,)
        assert np.all((idx >= edges[:-1]) & (idx < edges[1:])), (idx, edges)
        seen.update(idx.tolist())
    assert seen == set(range(n_frames))  # every frame can be drawn


def test_restricted_indices_short_tracklet_keeps_all_frames_in_order():
    rng = np.random.default_rng(1)
    for _ in range(50):
        idx = restricted_sample(3, 8, rng)
        assert idx.shape == (8,)
        assert np.all(np.diff(idx) >= 0)
        assert set(idx.tolist()) == {0, 1, 2}
    assert restricted_sample(1, 4, rng).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        restricted_sample(0, 4, rng)


def test_restricted_indices_are_the_chunk_formula_with_the_same_draws():
    # the stream's list version must draw from rng exactly as the numpy formula of STA's RRS
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    for n_frames in list(range(1, 70)) + [999, 1000, 1001]:
        for clip_len in (1, 3, 4, 8):
            got = restricted_indices(n_frames, clip_len, a)
            assert isinstance(got, list) and all(type(i) is int for i in got)
            if n_frames < clip_len:
                want = np.sort(np.concatenate([np.arange(n_frames), b.integers(0, n_frames, clip_len - n_frames)]))
            else:
                edges = (np.arange(clip_len + 1) * n_frames) // clip_len
                want = edges[:-1] + (b.random(clip_len) * np.diff(edges)).astype(np.int64)
            assert got == want.tolist(), (n_frames, clip_len)


def test_eval_clip_indices_pads_with_last_frame():
    assert eval_clip_indices(6, 4).tolist() == [[0, 1, 2, 3], [4, 5, 5, 5]]
    assert eval_clip_indices(8, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert eval_clip_indices(1, 3).tolist() == [[0, 0, 0]]
    assert eval_clip_indices(5, 1).tolist() == [[0], [1], [2], [3], [4]]


def test_decode_into_new_array_same_size_is_exact_decode():
    arr = np.random.default_rng(2).integers(0, 256, (32, 16, 3), dtype=np.uint8)
    data = _jpeg(arr)
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    out = decode_frame(data, 32, 16)
    assert out.dtype == np.uint8 and out.shape == (32, 16, 3)
    np.testing.assert_array_equal(out, ref)


def test_decode_into_new_array_draft_downscale_close_to_full_resize():
    # smooth content, so the DCT-domain downscale and a full decode + resize agree closely
    y, x = np.mgrid[0:128, 0:64]
    arr = np.stack([y * 2, x * 4, (x + y) % 256], -1).astype(np.uint8)
    data = _jpeg(arr)
    out = decode_frame(data, 32, 16)  # 4x smaller: draft kicks in
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((16, 32), Image.BILINEAR))
    assert out.shape == (32, 16, 3)
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 6
    up = decode_frame(data, 200, 100)  # upscaling works too (no draft)
    assert up.shape == (200, 100, 3)
    flipped = decode_frame(data, 32, 16, flip=True)
    np.testing.assert_array_equal(flipped, out[:, ::-1])


def test_decode_into_new_array_grayscale_and_png():
    g = np.full((20, 10), 77, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(g).save(buf, "PNG")
    out = decode_frame(buf.getvalue(), 20, 10)
    assert out.shape == (20, 10, 3) and np.all(out == 77)


@pytest.mark.parametrize("src", [(128, 64), (131, 67)])
@pytest.mark.parametrize("dst", [(128, 64), (64, 32), (32, 16), (30, 14), (40, 20), (15, 7), (60, 10),
                                 (200, 100), (100, 50)])
def test_decode_into_equals_pil_decode_at_every_scale(src, dst):
    # libjpeg-turbo's own scaler would pick 3/8 for 128x64 -> 40x20; we must pick PIL's power of 2
    arr = np.random.default_rng(sum(src)).integers(0, 256, (*src, 3), dtype=np.uint8)
    data = _jpeg(arr)
    out = np.full((*dst, 3), 7, np.uint8)
    assert decode_into(data, out) is out
    np.testing.assert_array_equal(out, _pil_decode(data, *dst))
    np.testing.assert_array_equal(decode_into(memoryview(data), np.empty_like(out), flip=True), out[:, ::-1])


def test_decode_into_writes_the_callers_buffer():
    data = _jpeg(np.random.default_rng(4).integers(0, 256, (32, 16, 3), dtype=np.uint8))
    batch = np.zeros((2, 3, 32, 16, 3), np.uint8)
    decode_into(data, batch[1, 2])
    np.testing.assert_array_equal(batch[1, 2], np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    assert not batch[:1].any() and not batch[1, :2].any()


@pytest.mark.parametrize("shared", [False, True])
def test_frame_buffer_rows_start_off_vector_alignment_and_decode_the_same(shared):
    """A frame_buffer starts 8 bytes past a 64-byte boundary and none of its rows is 16-byte
    aligned (libjpeg-turbo then uses cached stores, not non-temporal ones); decoding into it
    gives the same pixels."""
    buf = frame_buffer((3, 2, 32, 16, 3), shared=shared)
    assert buf.shape == (3, 2, 32, 16, 3) and buf.dtype == torch.uint8 and buf.is_contiguous()
    assert buf.is_shared() == shared
    arr = buf.numpy()
    assert arr.ctypes.data % 64 == 8
    starts = {arr[c, n, y].ctypes.data % 16 for c in range(3) for n in range(2) for y in range(32)}
    assert starts == {8}  # never 16- (SSE2) or 32-byte (AVX2) aligned
    data = _jpeg(np.random.default_rng(5).integers(0, 256, (32, 16, 3), dtype=np.uint8))
    for flip in (False, True):
        decode_into(data, arr[2, 1], flip)
        np.testing.assert_array_equal(arr[2, 1], decode_frame(data, 32, 16, flip))
    assert frame_buffer((0, 32, 16, 3)).shape == (0, 32, 16, 3)


def test_flipped_decode_is_the_mirrored_decode_on_every_path():
    """decode_into(flip=True) (frames decoded as BGR, then every row byte-reversed) gives exactly
    the mirrored plain decode, whatever path a frame takes (same-size JPEG, downscaled JPEG, PNG,
    CMYK and grayscale JPEG via PIL)."""
    rng = np.random.default_rng(6)
    frames = [_jpeg(rng.integers(0, 256, (32, 16, 3), dtype=np.uint8)),
              _jpeg(rng.integers(0, 256, (70, 35, 3), dtype=np.uint8))]
    for mode, fmt in (("RGB", "PNG"), ("CMYK", "JPEG"), ("L", "JPEG")):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 16, 3), dtype=np.uint8)).convert(mode).save(buf, fmt)
        frames.append(buf.getvalue())
    clip = frame_buffer((len(frames), 32, 16, 3)).numpy()
    for i, data in enumerate(frames):
        out = clip[i]
        assert decode_into(data, out, flip=True) is out
        np.testing.assert_array_equal(out, decode_frame(data, 32, 16)[:, ::-1])
    row = clip[0].copy()
    assert mirror_bgr_rows(row) is row
    np.testing.assert_array_equal(row, clip[0][:, ::-1, ::-1])


def test_decode_into_cmyk_and_grayscale_jpeg_via_the_same_pixels_as_pil():
    arr = np.random.default_rng(5).integers(0, 256, (32, 16, 3), dtype=np.uint8)
    for mode in ("CMYK", "L"):
        buf = io.BytesIO()
        Image.fromarray(arr).convert(mode).save(buf, "JPEG", quality=90)
        ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        np.testing.assert_array_equal(decode_frame(buf.getvalue(), 32, 16), ref)


def test_decode_into_new_array_rejects_garbage_and_truncation():
    data = _jpeg(np.zeros((32, 16, 3), np.uint8))
    with pytest.raises((OSError, ValueError, SyntaxError)):
        decode_frame(b"definitely not an image", 32, 16)
    with pytest.raises((OSError, ValueError, SyntaxError)):
        decode_frame(data[: len(data) // 2], 32, 16)


def test_normalize_clips_matches_reference():
    frames = np.random.default_rng(3).integers(0, 256, (2, 3, 8, 4, 3), dtype=np.uint8)
    out = normalize_clips(frames, IMAGENET_MEAN, IMAGENET_STD)
    assert out.shape == (2, 3, 3, 8, 4) and out.dtype == torch.float32
    ref = (torch.from_numpy(frames).permute(0, 1, 4, 2, 3).float() / 255
           - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    dst = torch.empty(2, 3, 3, 8, 4)
    assert normalize_clips(frames, (0, 0, 0), (1, 1, 1), out=dst) is dst
    torch.testing.assert_close(dst * 255, torch.from_numpy(frames).permute(0, 1, 4, 2, 3).float())
    torch.testing.assert_close(normalize_clips(torch.from_numpy(frames), IMAGENET_MEAN, IMAGENET_STD), ref,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        normalize_clips(frames.astype(np.float32), IMAGENET_MEAN, IMAGENET_STD)


def test_erase_box_within_bounds_and_mean_fill():
    rng = np.random.default_rng(4)
    for _ in range(200):
        box = erase_box(32, 16, rng)
        assert box is not None
        y, x, h, w = box
        assert 0 < h < 32 and 0 < w < 16 and 0 <= y and y + h <= 32 and 0 <= x and x + w <= 16
    assert mean_fill(IMAGENET_MEAN).tolist() == [124, 116, 104]


def test_model_input_normalises_uint8_like_the_float_path():
    import torch

    from pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD, model_input, normalize_clips

    u8 = torch.randint(0, 256, (2, 3, 8, 4, 3), dtype=torch.uint8)
    want = normalize_clips(u8, IMAGENET_MEAN, IMAGENET_STD)
    got = model_input(u8, torch.device("cpu"), torch.float32)
    assert got.shape == (2, 3, 3, 8, 4)
    torch.testing.assert_close(got, want)
    # float input passes through (already normalised by the loader), cast to the engine's dtype
    assert model_input(want, torch.device("cpu"), torch.bfloat16).dtype == torch.bfloat16
    torch.testing.assert_close(model_input(want, torch.device("cpu"), torch.float32), want)


def _cpu_decode_many(datas):
    """A stand-in for nvJPEG: the same call shape, (3, h, w) tensors, on CPU."""
    import simplejpeg
    out = []
    for d in datas:
        try:
            out.append(torch.from_numpy(simplejpeg.decode_jpeg(d.numpy().tobytes(), "RGB")).permute(2, 0, 1))
        except ValueError as e:
            raise RuntimeError(str(e)) from None
    return out


def _batch(frames):
    offsets = np.zeros(len(frames) + 1, np.int64)
    np.cumsum([len(f) for f in frames], out=offsets[1:])
    return np.frombuffer(b"".join(frames), np.uint8).copy(), offsets


def test_decode_clips_cpu_and_batched_paths_agree():
    from pipeline.transforms import decode_clips
    rng = np.random.default_rng(6)
    frames = [_jpeg(rng.integers(0, 256, (32, 16, 3), dtype=np.uint8)) for _ in range(6)]
    jpegs, offsets = _batch(frames)
    flips = np.array([True, False, True])
    erase = np.array([[0, 0, 0, 0], [4, 2, 10, 5], [0, 0, 0, 0]])
    kw = dict(clip_len=2, height=32, width=16, fill=(1, 2, 3), pids=[0, 0, 1], device=torch.device("cpu"))
    cpu, bad = decode_clips(jpegs, offsets, flips, erase, **kw)
    assert bad == 0 and cpu.shape == (3, 2, 32, 16, 3)
    ref = np.stack([decode_frame(f, 32, 16) for f in frames]).reshape(3, 2, 32, 16, 3)
    ref[0] = ref[0][:, :, ::-1]
    ref[2] = ref[2][:, :, ::-1]
    ref[1, :, 4:14, 2:7] = (1, 2, 3)
    np.testing.assert_array_equal(cpu.numpy(), ref)
    batched, bad = decode_clips(jpegs, offsets, flips, erase, decode_many=_cpu_decode_many, **kw)
    assert bad == 0 and torch.equal(batched, cpu)


def test_decode_clips_batched_resizes_and_replaces_bad_clips():
    from pipeline.transforms import decode_clips
    y, x = np.mgrid[0:64, 0:32]
    smooth = np.stack([y * 3, x * 6, (x + y) % 256], -1).astype(np.uint8)
    good = _jpeg(smooth)
    broken = good[:len(good) // 3]
    jpegs, offsets = _batch([good, good, good, broken, good, good])
    kw = dict(clip_len=2, height=32, width=16, fill=(9, 9, 9), flips=np.zeros(3, bool),
              erase=np.zeros((3, 4), np.int64), device=torch.device("cpu"), decode_many=_cpu_decode_many)
    out, bad = decode_clips(jpegs, offsets, pids=[5, 5, 6], **kw)
    assert bad == 1 and out.shape == (3, 2, 32, 16, 3)
    assert torch.equal(out[1], out[0])  # clip 1 (broken frame) replaced by pid 5's other clip
    ref = decode_frame(good, 32, 16)  # PIL's bilinear; the device resize is close, not equal
    assert np.abs(out[2, 0].numpy().astype(int) - ref).mean() < 3
    out, bad = decode_clips(jpegs, offsets, pids=[5, 7, 6], **kw)
    assert bad == 1 and (out[1] == 9).all()  # no other clip of pid 7: the fill colour


def test_replace_bad_clips_policy():
    """The one bad-frame policy: a bad clip becomes its identity's first good clip, else the fill."""
    from pipeline.transforms import replace_bad_clips

    clips = np.arange(6, dtype=np.uint8).repeat(3).reshape(6, 1, 3)
    pids = [0, 0, 1, 1, 2, 2]
    replace_bad_clips(clips, [1, 2, 3], pids, fill=np.array([7, 8, 9], np.uint8))
    assert clips[:, 0, 0].tolist() == [0, 0, 7, 7, 4, 5] and clips[2, 0].tolist() == [7, 8, 9]
    t = torch.zeros(4, 2)
    t[0] = 5
    replace_bad_clips(t, {1}, [3, 3, 4, 4], fill=0)
    assert t[1].tolist() == [5, 5]


def test_augment_clips_flips_then_erases_in_place_and_model_input_applies_it():
    from pipeline.transforms import augment_clips, model_input, replace_bad_clips

    rng = np.random.default_rng(0)
    clips = torch.from_numpy(rng.integers(0, 256, (3, 2, 6, 5, 3), dtype=np.uint8))
    flips, erase = np.array([True, False, True]), np.array([[0, 0, 0, 0], [1, 2, 3, 2], [0, 0, 2, 1]])
    want = clips.numpy().copy()
    want[[0, 2]] = want[[0, 2], :, :, ::-1]  # mirrored along W, pixels kept RGB
    want[1, :, 1:4, 2:4] = (7, 8, 9)
    want[2, :, 0:2, 0:1] = (7, 8, 9)  # the box is in the mirrored frame
    src = clips.clone()
    assert augment_clips(clips, flips, erase, (7, 8, 9)) is clips
    assert np.array_equal(clips.numpy(), want)
    fill = mean_fill(IMAGENET_MEAN)
    got = model_input(src.clone(), torch.device("cpu"), torch.float32, flips=torch.from_numpy(flips),
                      erase=torch.from_numpy(erase))
    ref = normalize_clips(augment_clips(src.clone(), flips, erase, fill), IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="do not fit"):
        augment_clips(src, flips[:2], erase, fill)
    with pytest.raises(ValueError, match="uint8"):
        model_input(ref, torch.device("cpu"), torch.float32, flips=flips, erase=erase)
    # a replaced clip takes its donor's pending draws, so both match once they are applied
    pids, f, e = np.array([4, 4, 5]), flips.copy(), erase.copy()
    c = src.clone().numpy()  # as in the loader process
    replace_bad_clips(c, [1], pids, fill, f, e)
    assert f[1] == f[0] and (e[1] == e[0]).all()
    replace_bad_clips(c, [2], pids, fill, f, e)  # no donor: the fill colour, no draws
    assert not f[2] and not e[2].any() and (c[2] == fill).all()
    out = augment_clips(torch.from_numpy(c), f, e, fill)
    assert torch.equal(out[0], out[1])
