"""Clip sampling and clip-consistent augmentation for the streaming loaders (pure functions).

Frames travel as uint8 ``(H, W, 3)`` arrays, batches as uint8 ``(B, N, H, W, 3)`` (4x less to move
between processes or to a GPU than float32); ``normalize_clips`` turns a whole batch into
normalised float32 ``(B, N, 3, H, W)`` in two vectorised passes, on any device, which is much
cheaper than per-frame ToTensor + Normalize.
"""
from __future__ import annotations

import io
import math

import numpy as np
import simplejpeg
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- frame sampling
def restricted_indices(n_frames: int, clip_len: int, rng: np.random.Generator) -> list[int]:
    """Restricted random sampling (STA / RRS): ``clip_len`` frame indices in temporal order.

    The tracklet is split into ``clip_len`` equal chunks and one random frame is drawn from each.
    A tracklet shorter than ``clip_len`` keeps every frame once and repeats randomly chosen ones,
    still in order (e.g. 3 frames, N=5 -> [0, 0, 1, 2, 2]). A plain list: the training stream calls
    this once per clip, where numpy on such short arrays costs more than the loop."""
    if n_frames < 1 or clip_len < 1:
        raise ValueError(f"need n_frames >= 1 and clip_len >= 1, got {n_frames}, {clip_len}")
    if n_frames < clip_len:
        extra = rng.integers(0, n_frames, size=clip_len - n_frames)
        return np.sort(np.concatenate([np.arange(n_frames), extra])).tolist()
    out, lo = [], 0
    for i, u in enumerate(rng.random(clip_len).tolist()):  # chunk i = [lo, hi)
        hi = (i + 1) * n_frames // clip_len
        out.append(lo + int(u * (hi - lo)))  # truncation, as numpy's astype(int64)
        lo = hi
    return out


def eval_clip_indices(n_frames: int, clip_len: int) -> np.ndarray:
    """All frames cut into consecutive clips ``(ceil(T/N), N)``; the last clip is padded by
    repeating the tracklet's last frame (e.g. T=6, N=4 -> [[0,1,2,3],[4,5,5,5]])."""
    if n_frames < 1 or clip_len < 1:
        raise ValueError(f"need n_frames >= 1 and clip_len >= 1, got {n_frames}, {clip_len}")
    n_clips = math.ceil(n_frames / clip_len)
    idx = np.minimum(np.arange(n_clips * clip_len), n_frames - 1)
    return idx.reshape(n_clips, clip_len)


# --------------------------------------------------------------------------- decoding
def check_jpeg(data) -> tuple[int, int, str, str]:
    """The JPEG header ``(height, width, colorspace, subsampling)``; ``ValueError`` unless the data
    starts with a parseable one (about 1 us; truncated data is only found when decoding). Also the
    loader's check of frames it ships undecoded (``decode="device"``)."""
    if bytes(data[:2]) != b"\xff\xd8":
        raise ValueError("not a JPEG")
    return simplejpeg.decode_jpeg_header(data)


def _pil_decode(data, height: int, width: int) -> np.ndarray:
    """PIL decode + bilinear resize to ``(height, width, 3)`` uint8 (non-JPEG and odd JPEGs)."""
    im = Image.open(io.BytesIO(data))
    if im.format == "JPEG" and im.width >= 2 * width and im.height >= 2 * height:
        im.draft("RGB", (width, height))  # libjpeg DCT-domain downscale, never below the target
    if im.mode != "RGB":
        im = im.convert("RGB")
    else:
        im.load()
    if im.size != (width, height):
        im = im.resize((width, height), Image.BILINEAR)
    return np.asarray(im)


def frame_buffer(shape, shared: bool = False) -> torch.Tensor:
    """An uninitialised uint8 tensor of ``shape`` (..., H, W, 3) to decode frames into, its data
    starting 8 bytes past a 64-byte boundary (``shared``: in shared memory, for loader processes).

    libjpeg-turbo's x86 SIMD colour conversion writes an output row with non-temporal stores
    (``movntdq``, bypassing the cache) when the row is 16-byte (SSE2) or 32-byte (AVX2) aligned,
    which every large allocation is; rows that start 8 bytes off get ordinary cached stores, which
    decode faster (docs/performance.md, "Measurements behind the data path's code"). Rows stay off
    as long as a row (W*3 bytes) is a multiple of 16, as it is for the usual widths."""
    n = math.prod(shape)
    raw = torch.empty(n + 64, dtype=torch.uint8)
    if shared:
        raw.share_memory_()
    off = (8 - raw.data_ptr()) % 64
    return raw[off:off + n].view(shape)


def decode_into(data, out: np.ndarray, flip: bool = False) -> np.ndarray:
    """Decode an encoded image into ``out``, a C-contiguous uint8 ``(H, W, 3)`` array (RGB).

    JPEGs go through libjpeg-turbo (simplejpeg), which decodes straight into ``out`` when the
    stored size is the target (MARS frames are stored at 256x128): no intermediate image, no
    copies (faster than PIL: docs/performance.md). Other sizes are decoded with DCT-domain
    downscaling when the target is at most half the stored size on both axes, then resized
    bilinearly (PIL). Pixels equal ``_pil_decode``'s (PIL with ``draft``: the same libjpeg-turbo
    decode, the same scale, the same resize). PNG etc.,
    CMYK JPEGs, and JPEGs libjpeg-turbo flags as damaged go through PIL, so what PIL (and
    ``pipeline.pack``'s validation) accepts is accepted here. ``flip`` mirrors horizontally.
    Raises ``OSError``/``ValueError`` on undecodable or truncated data. Returns ``out``."""
    if not flip:
        return _decode(data, out, bgr=False)
    return mirror_bgr_rows(_decode(data, out, bgr=True))


def mirror_bgr_rows(out: np.ndarray) -> np.ndarray:
    """Reverse the bytes of every image row of ``out`` (``(..., W, 3)`` uint8, C-contiguous): BGR
    pixels become the horizontally mirrored RGB image. One vectorised byte reversal, where
    mirroring 3-byte pixels is a strided copy (slower: docs/performance.md). Returns ``out``."""
    rows = torch.from_numpy(out).view(-1, out.shape[-2] * 3)
    rows.copy_(rows.flip(1))
    return out


def _decode(data, out: np.ndarray, bgr: bool) -> np.ndarray:
    height, width = out.shape[:2]
    try:
        h, w, colorspace, _ = check_jpeg(data)
        if colorspace in ("CMYK", "YCCK"):
            raise ValueError("CMYK: PIL handles Adobe's inverted CMYK")
        if (h, w) == (height, width):
            simplejpeg.decode_jpeg(data, "BGR" if bgr else "RGB", buffer=out)
            return out
        # DCT-domain downscale by a power of two as PIL's draft picks it (libjpeg-turbo alone
        # would also take M/8 factors), so the pixels stay PIL's
        ratio = min(h // height, w // width)
        scale = next((f for f in (8, 4, 2) if ratio >= f), 1)
        arr = simplejpeg.decode_jpeg(data, "RGB", min_height=-(-h // scale), min_width=-(-w // scale))
        out[...] = np.asarray(Image.fromarray(arr).resize((width, height), Image.BILINEAR))
    except ValueError:
        out[...] = _pil_decode(data, height, width)
    if bgr:  # the rare paths above decode RGB
        out[...] = out[..., ::-1].copy()
    return out


# --------------------------------------------------------------------------- augmentation
def erase_box(height: int, width: int, rng: np.random.Generator, *, sl: float = 0.02,
              sh: float = 0.4, r1: float = 0.3) -> tuple[int, int, int, int] | None:
    """A random-erasing rectangle ``(y, x, h, w)`` (Zhong et al. 2017, torchreid's parameters:
    area fraction in [sl, sh], aspect ratio in [r1, 1/r1]); None if 100 draws found no fit."""
    area = height * width
    for _ in range(100):
        target = rng.uniform(sl, sh) * area
        aspect = rng.uniform(r1, 1.0 / r1)
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if 0 < h < height and 0 < w < width:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return None


def mean_fill(mean) -> np.ndarray:
    """uint8 RGB fill value for erased pixels: the dataset mean, so it normalises to ~0."""
    return np.clip(np.round(np.asarray(mean, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- normalisation
def normalize_clips(frames, mean, std, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 ``(..., H, W, 3)`` (numpy or torch, any device) -> float32 ``(..., 3, H, W)`` with
    ``(x/255 - mean) / std``; ``out`` receives the result when given.

    The fastest on CPU among the obvious variants (docs/performance.md): one strided uint8->float
    copy into the channel-first layout, then an in-place multiply-add, not a broadcast multiply of
    the permuted uint8 view."""
    src = torch.as_tensor(frames)
    if src.dtype != torch.uint8 or src.shape[-1] != 3:
        raise ValueError(f"need uint8 (..., H, W, 3), got {src.dtype} {tuple(src.shape)}")
    src = src.movedim(-1, -3)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=src.device).view(3, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=src.device).view(3, 1, 1)
    if out is None:
        out = torch.empty(src.shape, dtype=torch.float32, device=src.device)
    out.copy_(src)
    return out.mul_(1.0 / (255.0 * std_t)).add_(-mean_t / std_t)


def model_input(clips: torch.Tensor, device: torch.device, dtype: torch.dtype, mean=None, std=None,
                flips=None, erase=None) -> torch.Tensor:
    """A loader batch as the model's input on ``device``: uint8 ``(B, N, H, W, 3)`` clips are moved
    first, then flipped and erased as the batch's ``flips``/``erase`` say (a uint8 training batch
    leaves them to the device: :func:`augment_clips`), then normalised there (4x fewer bytes over
    PCIe/between processes); float clips are moved."""
    mean = IMAGENET_MEAN if mean is None else mean
    if clips.dtype == torch.uint8:
        clips = clips.to(device, non_blocking=True)
        if flips is not None:
            clips = augment_clips(clips, flips, erase, mean_fill(mean))
        clips = normalize_clips(clips, mean, IMAGENET_STD if std is None else std)
    elif flips is not None:
        raise ValueError("flips/erase are for uint8 clips: float clips come augmented")
    return clips.to(device=device, dtype=dtype, non_blocking=True)


# --------------------------------------------------------------------------- decoding on the consumer


def _nvjpeg(device: torch.device):
    """Batched GPU decode (nvJPEG through torchvision, which the GPU image installs)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as e:  # pragma: no cover - CPU installs have no torchvision
        raise RuntimeError(f"data.decode=device on {device} needs torchvision (nvJPEG): {e}") from None

    def decode_many(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)

    return decode_many


def decode_clips(jpegs: np.ndarray, offsets: np.ndarray, flips: np.ndarray, erase: np.ndarray, *,
                 clip_len: int, height: int, width: int, fill, pids, device: torch.device,
                 decode_many=None) -> tuple[torch.Tensor, int]:
    """Decode a batch the loader shipped as JPEG bytes (``train_loader(decode="device")``) on
    ``device``: returns uint8 ``(B, N, H, W, 3)`` clips (a view of channel-first memory on a
    GPU) with the loader's flips and erasing applied, and the number of clips replaced because a
    frame would not decode.

    ``jpegs`` holds the B*N frames back to back (clip-major), ``offsets`` their B*N+1 bounds,
    ``flips`` (B,) bool, ``erase`` (B, 4) int ``(y, x, h, w)`` rows, ``h == 0`` for none.
    On CPU (``decode_many=None``) frames go through ``decode_into``: pixels equal the loader's own
    decode. Elsewhere ``decode_many(list of 1-D uint8 CPU tensors) -> list of (3, h, w) uint8
    tensors on device`` decodes the batch in one call (default: nvJPEG); frames of another size are
    resized bilinearly on the device (antialiased; close to, not bit-equal with, PIL's resize).
    A frame that does not decode (also not on the CPU) is counted, and its clip replaced as
    ``replace_bad_clips`` says."""
    b = len(flips)
    fill = torch.as_tensor(np.asarray(fill, dtype=np.uint8))
    bad: set[int] = set()
    if decode_many is None and device.type == "cpu":
        out = frame_buffer((b, clip_len, height, width, 3))
        arr = out.numpy()
        for i in range(b * clip_len):
            c, n = divmod(i, clip_len)
            try:
                decode_into(jpegs[offsets[i]:offsets[i + 1]], arr[c, n])
            except (OSError, ValueError, SyntaxError):
                bad.add(c)
    else:
        decode_many = decode_many or _nvjpeg(device)
        buf = torch.from_numpy(jpegs)
        datas = [buf[offsets[i]:offsets[i + 1]] for i in range(b * clip_len)]
        try:
            imgs = list(decode_many(datas))
        except RuntimeError:  # the batched call returns nothing on any error: find the bad ones
            imgs = []
            for i, d in enumerate(datas):
                try:
                    imgs.append(decode_many([d])[0])
                except RuntimeError:
                    bad.add(i // clip_len)
                    imgs.append(torch.zeros((3, height, width), dtype=torch.uint8, device=device))
        for i, im in enumerate(imgs):
            if im.shape[-2:] != (height, width):
                im = torch.nn.functional.interpolate(im[None].float(), size=(height, width), mode="bilinear",
                                                     align_corners=False, antialias=True)[0]
                imgs[i] = im.round_().clamp_(0, 255).to(torch.uint8)
        out = torch.stack(imgs).view(b, clip_len, 3, height, width).permute(0, 1, 3, 4, 2)
    augment_clips(out, flips, erase, fill)  # the same step as for the loader's uint8 batches
    replace_bad_clips(out, bad, pids, fill.to(out.device))
    return out, len(bad)


def augment_clips(clips: torch.Tensor, flips, erase, fill) -> torch.Tensor:
    """The training stream's per-clip draws applied to uint8 ``(B, N, H, W, 3)`` clips, in place, on
    whatever device holds them: clips with ``flips`` set are mirrored horizontally, then each
    ``erase`` row ``(y, x, h, w)`` (``h == 0``: none) is filled with ``fill`` on every frame.

    ``decode="loader"`` batches with ``normalize=False`` carry these draws instead of applying them
    in the loader process: on a GPU they cost nothing, where mirroring in the loader took ~5% of its
    CPU (docs/performance.md §2, eighth round). ``model_input`` and ``normalize=True`` loaders call
    this. Returns ``clips``.

    Args:
        clips: uint8 ``(B, N, H, W, 3)`` tensor.
        flips: ``(B,)`` bool (array or tensor).
        erase: ``(B, 4)`` int rows ``(y, x, h, w)``.
        fill: uint8 RGB of erased pixels (``mean_fill``).
    """
    flips, erase = (np.asarray(x.cpu() if torch.is_tensor(x) else x) for x in (flips, erase))
    flips = flips.astype(bool, copy=False)
    if flips.shape != clips.shape[:1] or erase.shape != (len(flips), 4):
        raise ValueError(f"flips {flips.shape} / erase {erase.shape} do not fit clips {tuple(clips.shape)}")
    if clips.device.type == "cpu":  # clip by clip: a batched index_put costs ~4x more on CPU
        for c in np.flatnonzero(flips).tolist():
            clips[c] = clips[c].flip(-2)
    elif flips.any():  # one kernel per step, not one per clip
        idx = torch.from_numpy(np.flatnonzero(flips)).to(clips.device)
        clips[idx] = clips.index_select(0, idx).flip(-2)
    rows = np.flatnonzero(erase[:, 2])
    if len(rows):
        fill = torch.as_tensor(np.asarray(fill, dtype=np.uint8)).to(clips.device)
        for c in rows:
            y, x, h, w = (int(v) for v in erase[c])
            clips[c, :, y:y + h, x:x + w] = fill
    return clips


def replace_bad_clips(clips, bad, pids, fill, flips=None, erase=None) -> None:
    """The training streams' bad-frame policy, one for both decode paths (``decode="loader"`` in
    the loader process, ``decode_clips`` on the device): a clip with a frame that does not decode
    is overwritten, in place, by the first good clip of the same identity in the batch (P x K
    stays intact), or by the fill colour when its identity has none. The caller counts each such
    clip once in the batch's ``skipped``.

    Args:
        clips: the batch, ``(B, ...)`` (tensor or array).
        bad: indices of the clips to replace.
        pids: ``(B,)`` identity of each clip.
        fill: what a clip without a donor becomes (broadcast; the mean colour).
        flips, erase: the batch's draws when they are still to apply (``augment_clips``): a
            replaced clip takes its donor's, so it ends up equal to the donor after them too
            (None: ``clips`` come with flips and erasing applied).
    """
    pids = np.asarray(pids)
    for c in sorted(bad):
        donors = [d for d in np.flatnonzero(pids == pids[c]) if d not in bad]
        clips[c] = clips[donors[0]] if donors else fill
        if flips is not None:
            flips[c] = flips[donors[0]] if donors else False
            erase[c] = erase[donors[0]] if donors else 0
