"""Procedural video re-ID dataset in the DukeMTMC-VideoReID layout (the embedded default).

Identity lives in the *spatial layout* of colours: hair/hat, torso colour and pattern (solid,
stripes, checks, split), sleeves, legs (trousers/shorts/skirt), shoes and a bag. All parts draw
from one small shared palette, so two identities often wear the same colours in different
places and colour histograms confuse them. Each camera has its own colour cast, brightness,
noise, JPEG quality and scene; each tracklet has its own clutter and walking view; each frame
jitters pose, scale and position, and with ``occlusion_prob`` an object hides a random
horizontal stripe of the person (the case STA's stripe attention is built for).

``generate(root, ...)`` is deterministic from ``seed`` (same bytes) and idempotent: the
``synthetic.json`` marker is written last and a complete generation with the same parameters
is not redone. ``python -m pipeline.synthetic ROOT`` generates the defaults.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import time

import numpy as np
from PIL import Image, ImageDraw

FORMAT = "sta-synthetic/1"
MARKER = "synthetic.json"
PARTIAL = ".synthetic-partial"  # present while a generation is in progress

# Shared clothing palette (RGB). Small on purpose: colours recur across identities.
PALETTE = np.array([
    (200, 30, 30), (30, 150, 40), (35, 60, 190), (230, 200, 40), (235, 235, 235),
    (25, 25, 25), (130, 130, 130), (150, 80, 30), (130, 40, 150)], dtype=np.float32)
SKIN = np.array([(240, 200, 170), (200, 150, 110), (120, 80, 55)], dtype=np.float32)
HAIR = np.array([(20, 15, 10), (90, 55, 25), (210, 180, 90), (160, 160, 160)], dtype=np.float32)
PATTERNS = ("solid", "hstripes", "vstripes", "checks", "split")
LEGWEAR = ("trousers", "shorts", "skirt")
BAGS = ("none", "backpack", "bag_left", "bag_right")

DEFAULTS = dict(num_ids=80, tracklets_per_id=4, frames_per_tracklet=(8, 16), height=64, width=32,
                num_cameras=6, num_test_ids=60, occlusion_prob=0.3, seed=0)


# --------------------------------------------------------------------------- sampling
def _rng(seed: int, *keys: int) -> np.random.Generator:
    """Independent stream per (seed, keys): results do not depend on generation order."""
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _identity(rng: np.random.Generator) -> dict:
    n = len(PALETTE)
    torso, torso2, legs = rng.choice(n, 3, replace=False)
    return {
        "skin": int(rng.integers(len(SKIN))),
        "hat": bool(rng.random() < 0.35), "hat_color": int(rng.integers(n)),
        "hair": int(rng.integers(len(HAIR))), "long_hair": bool(rng.random() < 0.3),
        "torso": int(torso), "torso2": int(torso2), "pattern": str(rng.choice(PATTERNS)),
        "long_sleeves": bool(rng.random() < 0.5),
        "legs": int(legs), "legwear": str(rng.choice(LEGWEAR, p=[0.6, 0.25, 0.15])),
        "shoes": int(rng.integers(n)),
        "bag": str(rng.choice(BAGS)), "bag_color": int(rng.integers(n)),
        "build_w": float(rng.uniform(0.85, 1.15)), "build_h": float(rng.uniform(0.9, 1.05)),
    }


def _identities(seed: int, count: int) -> list[dict]:
    """``count`` identities whose main clothing layout (torso, pattern, legs, head) is unique."""
    out, seen, k = [], set(), 0
    while len(out) < count:
        ident = _identity(_rng(seed, 1, k))
        k += 1
        sig = (ident["torso"], ident["torso2"] if ident["pattern"] != "solid" else -1,
               ident["pattern"], ident["legs"], ident["hat"], ident["hat_color"] if ident["hat"] else -1)
        if sig in seen:
            continue
        seen.add(sig)
        out.append(ident)
    return out


def _camera(seed: int, cam: int) -> dict:
    rng = _rng(seed, 2, cam)
    return {
        "gain": rng.uniform(0.65, 1.35, 3), "brightness": float(rng.uniform(0.65, 1.25)),
        "offset": rng.uniform(-25, 25, 3), "noise": float(rng.uniform(2, 9)),
        "quality": int(rng.integers(75, 96)),
        "wall": rng.uniform(40, 220, 3), "floor": rng.uniform(40, 220, 3),
        "horizon": float(rng.uniform(0.3, 0.7)),
    }


# --------------------------------------------------------------------------- drawing
def _c(rgb) -> tuple:
    return tuple(int(v) for v in rgb)


def _fill_pattern(d: ImageDraw.ImageDraw, box, ident: dict, unit: float):
    x0, y0, x1, y1 = box
    c1, c2 = _c(PALETTE[ident["torso"]]), _c(PALETTE[ident["torso2"]])
    d.rectangle(box, fill=c1)
    p, s = ident["pattern"], max(2, int(round(unit)))
    if p == "hstripes":
        for y in range(int(y0), int(y1), 2 * s):
            d.rectangle((x0, y, x1, min(y + s - 1, y1)), fill=c2)
    elif p == "vstripes":
        for x in range(int(x0), int(x1), 2 * s):
            d.rectangle((x, y0, min(x + s - 1, x1), y1), fill=c2)
    elif p == "checks":
        for i, y in enumerate(range(int(y0), int(y1), s)):
            for j, x in enumerate(range(int(x0), int(x1), s)):
                if (i + j) % 2:
                    d.rectangle((x, y, min(x + s - 1, x1), min(y + s - 1, y1)), fill=c2)
    elif p == "split":
        d.rectangle(((x0 + x1) / 2, y0, x1, y1), fill=c2)


def _draw_person(d: ImageDraw.ImageDraw, ident: dict, cx: float, feet: float, bh: float,
                 phase: float, view: str):
    skin = _c(SKIN[ident["skin"]])
    side = view == "side"
    tw = bh * 0.27 * ident["build_w"] * (0.7 if side else 1.0)
    top = feet - bh
    y_neck, y_hip, y_knee, y_sole = top + 0.17 * bh, top + 0.53 * bh, top + 0.75 * bh, feet - 0.04 * bh
    swing = np.sin(phase)
    # legs (two, walking)
    lw, stride = bh * 0.11, bh * 0.09 * swing
    leg_c, shoe_c = _c(PALETTE[ident["legs"]]), _c(PALETTE[ident["shoes"]])
    for sgn in (-1, 1):
        lx = cx + sgn * (tw / 4) + (sgn * stride if side else sgn * stride * 0.3)
        d.rectangle((lx - lw / 2, y_hip, lx + lw / 2, y_sole), fill=skin)
        cover_to = {"trousers": y_sole, "shorts": y_knee - 0.05 * bh, "skirt": y_hip}[ident["legwear"]]
        d.rectangle((lx - lw / 2, y_hip, lx + lw / 2, cover_to), fill=leg_c)
        d.rectangle((lx - lw / 2 - 1, y_sole, lx + lw / 2 + 2, feet), fill=shoe_c)
    if ident["legwear"] == "skirt":
        d.polygon([(cx - tw / 2, y_hip - 2), (cx + tw / 2, y_hip - 2),
                   (cx + tw * 0.7, y_knee), (cx - tw * 0.7, y_knee)], fill=leg_c)
    # backpack behind the torso when seen from the back or side
    bag_c = _c(PALETTE[ident["bag_color"]])
    if ident["bag"] == "backpack" and view != "front":
        bx = cx + (tw * 0.35 if side else 0)
        d.rectangle((bx - tw * 0.4, y_neck + 0.03 * bh, bx + tw * 0.4, y_neck + 0.3 * bh), fill=bag_c)
    # arms
    aw = bh * 0.07
    arm_c = _c(PALETTE[ident["torso"]]) if ident["long_sleeves"] else skin
    for sgn in (-1, 1):
        ax = cx + sgn * (tw / 2 + aw / 2) + (0 if not side else -sgn * tw / 2)
        ay = -sgn * swing * 0.05 * bh
        d.rectangle((ax - aw / 2, y_neck + 0.02 * bh, ax + aw / 2, y_neck + 0.18 * bh + ay),
                    fill=_c(PALETTE[ident["torso"]]))
        d.rectangle((ax - aw / 2, y_neck + 0.18 * bh + ay, ax + aw / 2, y_hip - 0.02 * bh + ay), fill=arm_c)
        d.rectangle((ax - aw / 2, y_hip - 0.02 * bh + ay, ax + aw / 2, y_hip + 0.03 * bh + ay), fill=skin)
    # torso
    torso = (cx - tw / 2, y_neck, cx + tw / 2, y_hip)
    if ident["bag"] == "backpack" and view == "back":
        _fill_pattern(d, torso, ident, bh * 0.05)
        d.rectangle((cx - tw * 0.38, y_neck + 0.03 * bh, cx + tw * 0.38, y_neck + 0.3 * bh), fill=bag_c)
    else:
        _fill_pattern(d, torso, ident, bh * 0.05)
        if ident["bag"] == "backpack":  # straps from the front
            for sgn in (-1, 1):
                x = cx + sgn * tw * 0.28
                d.rectangle((x - 1, y_neck, x + 1, y_neck + 0.25 * bh), fill=bag_c)
    if ident["bag"] in ("bag_left", "bag_right"):
        sgn = -1 if ident["bag"] == "bag_left" else 1
        if view == "back":
            sgn = -sgn  # the left side is on the right when seen from behind
        bx = cx + sgn * (tw / 2 + aw * 1.2)
        d.line((cx - sgn * tw / 2, y_neck, bx, y_hip - 0.05 * bh), fill=bag_c, width=2)
        d.rectangle((bx - bh * 0.07, y_hip - 0.08 * bh, bx + bh * 0.07, y_hip + 0.08 * bh), fill=bag_c)
    # head
    r = bh * 0.075
    hy = top + r + 0.01 * bh
    hx = cx + (r * 0.2 if side else 0)
    hair = _c(HAIR[ident["hair"]])
    if ident["long_hair"]:
        d.rectangle((hx - r, hy, hx + r, hy + 1.6 * r), fill=hair)
    d.ellipse((hx - r, hy - r, hx + r, hy + r), fill=hair if view == "back" else skin)
    if ident["hat"]:
        hat = _c(PALETTE[ident["hat_color"]])
        d.rectangle((hx - r * 1.1, hy - r * 1.15, hx + r * 1.1, hy - r * 0.2), fill=hat)
        d.rectangle((hx - r * 1.5, hy - r * 0.35, hx + r * 1.5, hy - r * 0.1), fill=hat)
    else:
        d.chord((hx - r, hy - r, hx + r, hy + r), 180, 360, fill=hair)


def _render_tracklet(ident: dict, cam: dict, seed: int, key: tuple, n_frames: int,
                     height: int, width: int, occlusion_prob: float) -> list[bytes]:
    """JPEG bytes of the frames of one tracklet."""
    rng = _rng(seed, 3, *key)
    H, W = 2 * height, 2 * width  # draw at 2x, downsample for anti-aliasing
    view = str(rng.choice(["front", "back", "side"]))
    # per-tracklet scene: camera background plus clutter in palette colours
    bg = Image.new("RGB", (W, H), _c(cam["wall"]))
    bd = ImageDraw.Draw(bg)
    bd.rectangle((0, cam["horizon"] * H, W, H), fill=_c(cam["floor"]))
    for _ in range(int(rng.integers(3, 8))):
        x, y = rng.uniform(-0.2, 1.0) * W, rng.uniform(-0.1, 1.0) * H
        w, h = rng.uniform(0.1, 0.5) * W, rng.uniform(0.05, 0.4) * H
        col = _c(PALETTE[rng.integers(len(PALETTE))] * rng.uniform(0.7, 1.1))
        (bd.ellipse if rng.random() < 0.4 else bd.rectangle)((x, y, x + w, y + h), fill=col)
    light = rng.uniform(0.9, 1.1, 3)  # per-tracklet lighting on top of the camera cast
    phase0, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.2)
    base_tx, base_scale = rng.uniform(-0.06, 0.06) * W, rng.uniform(0.85, 1.0)
    gain = cam["gain"] * cam["brightness"] * light
    out = []
    for f in range(n_frames):
        img = bg.copy()
        d = ImageDraw.Draw(img)
        scale = base_scale * rng.uniform(0.94, 1.06) * ident["build_h"]
        cx = W / 2 + base_tx + rng.uniform(-0.06, 0.06) * W
        feet = H * rng.uniform(0.95, 1.0)
        _draw_person(d, ident, cx, feet, H * 0.9 * scale, phase0 + speed * f, view)
        if rng.random() < occlusion_prob:  # an object hides a horizontal stripe
            sh = rng.uniform(0.2, 0.45) * H
            y0 = rng.uniform(0.1 * H, H - sh)
            x0, x1 = rng.uniform(-0.1, 0.3) * W, rng.uniform(0.7, 1.1) * W
            col = PALETTE[rng.integers(len(PALETTE))] * rng.uniform(0.6, 1.0)
            d.rectangle((x0, y0, x1, y0 + sh), fill=_c(col))
            if rng.random() < 0.5:  # a textured object (e.g. a car door, a railing)
                col2 = _c(col * 0.6)
                for y in range(int(y0), int(y0 + sh), 4):
                    d.line((x0, y, x1, y), fill=col2, width=1)
        arr = np.asarray(img.resize((width, height), Image.BILINEAR), dtype=np.float32)
        arr = arr * gain + cam["offset"] + rng.normal(0, cam["noise"], arr.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=cam["quality"])
        out.append(buf.getvalue())
    return out


# --------------------------------------------------------------------------- generation
def generator_params(**kw) -> dict:
    """The generator's full, validated parameters: ``DEFAULTS`` updated by ``kw``, with
    ``frames_per_tracklet`` as ``[min, max]``. They are what the marker (and pack's manifest)
    record, so a config can tell whether existing data was made with the parameters it asks for.

    Args:
        **kw: any of ``generate``'s keyword arguments.

    Raises:
        ValueError: naming the parameter that is out of range.
    """
    p = dict(DEFAULTS)
    p.update(kw)
    fpt = p["frames_per_tracklet"]
    p["frames_per_tracklet"] = [int(fpt), int(fpt)] if np.isscalar(fpt) else [int(v) for v in fpt]
    if not 1 <= p["frames_per_tracklet"][0] <= p["frames_per_tracklet"][1]:
        raise ValueError(f"frames_per_tracklet must be n or (min, max) with 1 <= min <= max: {fpt}")
    if p["num_cameras"] < 2:
        raise ValueError("num_cameras must be >= 2 (query and gallery come from different cameras)")
    if p["num_cameras"] > 9:
        raise ValueError("num_cameras must be <= 9 (one digit in C<cam>)")
    if p["tracklets_per_id"] < 2:
        raise ValueError("tracklets_per_id must be >= 2 (a query and at least one gallery tracklet)")
    if p["num_ids"] < 1 or p["num_test_ids"] < 1:
        raise ValueError("num_ids and num_test_ids must be >= 1")
    if p["height"] < 16 or p["width"] < 8:
        raise ValueError("images must be at least 16x8")
    if not 0.0 <= p["occlusion_prob"] <= 1.0:
        raise ValueError("occlusion_prob must be in [0, 1]")
    return p


def read_marker(root: str) -> dict | None:
    """The marker of a finished generation under ``root`` (format, parameters, summary), or None
    when there is none (never generated, or interrupted: the marker is written last).

    Args:
        root (str): the generated tree (local path).
    """
    try:
        with open(os.path.join(root, MARKER)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def generate(root: str, *, num_ids: int = DEFAULTS["num_ids"],
             tracklets_per_id: int = DEFAULTS["tracklets_per_id"],
             frames_per_tracklet=DEFAULTS["frames_per_tracklet"],
             height: int = DEFAULTS["height"], width: int = DEFAULTS["width"],
             num_cameras: int = DEFAULTS["num_cameras"], num_test_ids: int = DEFAULTS["num_test_ids"],
             occlusion_prob: float = DEFAULTS["occlusion_prob"], seed: int = DEFAULTS["seed"]) -> dict:
    """Write the dataset under ``root`` (local path) in the DukeMTMC-VideoReID layout.

    Train ids are 1..num_ids, test ids follow. Each identity's tracklets come from distinct
    cameras while there are enough; per test id, tracklet 1 (one camera) is the query and the
    others (other cameras) the gallery. Returns a summary dict (counts, parameters, seconds,
    ``reused``: True if a complete generation with the same parameters was already there)."""
    p = generator_params(num_ids=num_ids, tracklets_per_id=tracklets_per_id,
                         frames_per_tracklet=frames_per_tracklet, height=height, width=width,
                         num_cameras=num_cameras, num_test_ids=num_test_ids,
                         occlusion_prob=occlusion_prob, seed=seed)
    root = os.path.abspath(root)
    marker = read_marker(root)
    if marker and marker.get("format") == FORMAT and marker.get("params") == p \
            and not os.path.exists(os.path.join(root, PARTIAL)):
        return {**marker["summary"], "reused": True}
    splits = [os.path.join(root, s) for s in ("train", "query", "gallery")]
    ours = marker is not None or os.path.exists(os.path.join(root, PARTIAL))
    if not ours and any(os.path.exists(s) for s in splits):
        raise FileExistsError(f"{root} holds train/query/gallery folders that are not a synthetic "
                              "generation; refusing to overwrite them")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, PARTIAL), "w") as f:
        f.write("generation in progress\n")
    if os.path.exists(os.path.join(root, MARKER)):
        os.remove(os.path.join(root, MARKER))
    for s in splits:
        shutil.rmtree(s, ignore_errors=True)

    t0 = time.time()
    idents = _identities(p["seed"], p["num_ids"] + p["num_test_ids"])
    cams = [_camera(p["seed"], c) for c in range(p["num_cameras"])]
    counts = {s: {"tracklets": 0, "identities": 0, "frames": 0} for s in ("train", "query", "gallery")}
    xcount = 0
    lo, hi = p["frames_per_tracklet"]
    for i, ident in enumerate(idents):
        pid = i + 1
        rng = _rng(p["seed"], 4, pid)
        T = p["tracklets_per_id"]
        if T <= p["num_cameras"]:
            cam_ids = rng.choice(p["num_cameras"], T, replace=False)
        else:  # more tracklets than cameras: every camera once, then repeats off the query camera
            cam_ids = np.concatenate([rng.permutation(p["num_cameras"]),
                                      rng.integers(1, p["num_cameras"], T - p["num_cameras"])])
            cam_ids[p["num_cameras"]:] = (cam_ids[0] + cam_ids[p["num_cameras"]:]) % p["num_cameras"]
        is_test = i >= p["num_ids"]
        for t, cam in enumerate(cam_ids.tolist()):
            split = ("query" if t == 0 else "gallery") if is_test else "train"
            n = int(rng.integers(lo, hi + 1))
            first = int(rng.integers(1, 500))
            frames = _render_tracklet(ident, cams[cam], p["seed"], (pid, t), n, p["height"],
                                      p["width"], p["occlusion_prob"])
            tdir = os.path.join(root, split, f"{pid:04d}", f"{t + 1:04d}")
            os.makedirs(tdir, exist_ok=True)
            for k, data in enumerate(frames):
                xcount += 1
                name = f"{pid:04d}_C{cam + 1}_F{first + k:04d}_X{xcount:05d}.jpg"
                with open(os.path.join(tdir, name), "wb") as f:
                    f.write(data)
            counts[split]["tracklets"] += 1
            counts[split]["frames"] += n
        if is_test:
            counts["query"]["identities"] += 1
            counts["gallery"]["identities"] += 1
        else:
            counts["train"]["identities"] += 1
    summary = {"format": FORMAT, "root": root, "params": p, "splits": counts,
               "seconds": round(time.time() - t0, 3)}
    tmp = os.path.join(root, MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "params": p, "summary": summary}, f, indent=1)
    os.replace(tmp, os.path.join(root, MARKER))  # the marker LAST: now it is a dataset
    os.remove(os.path.join(root, PARTIAL))
    return {**summary, "reused": False}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root")
    for k, v in DEFAULTS.items():
        if k == "frames_per_tracklet":
            ap.add_argument("--frames-per-tracklet", type=int, nargs=2, default=list(v), metavar=("MIN", "MAX"))
        else:
            ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    a = ap.parse_args(argv)
    s = generate(a.root, **{k: getattr(a, k) for k in DEFAULTS})
    print(json.dumps({k: s[k] for k in ("root", "splits", "seconds", "reused")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
