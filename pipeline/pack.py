"""Pack a dataset at rest into WebDataset tar shards at a storage URL (contract: docs/interfaces.md).

    python -m pipeline.pack --dataset {mars,dukev,synthetic} --root PATH --out URL \
        [--shard-size-mb 256] [--resize HxW] [--strict] [--quiet]

One sample per tracklet: ``<key>.json`` then frames ``<key>.<i:03d>.jpg`` in temporal order
as plain ustar members (the json's ``frame_bytes`` lists their sizes, so a reader can locate
every frame without parsing its header),
key ``<split>_<7-digit index>`` (index = position among the split's packed tracklets, in the
reader's order; train is grouped by identity, which the readers' order already is).
Train shards close only at identity boundaries; query/gallery keep the dataset's order.
A shard is closed before the next identity (train) or tracklet (query/gallery) would push it
over the target size, so shards stay under it unless one identity alone is larger.

Safety: the old ``manifest.json`` is removed first and the new one written last, atomically,
so an interrupted pack never looks complete. Shards are byte-deterministic (fixed tar
metadata), built in a local temp file and hashed; one already at the destination with the
same sha256 is not uploaded again. Every frame is decoded to validate it: a corrupt one is
logged with its path, skipped and counted (a tracklet left without frames is dropped), or with
``strict`` the pack fails. JPEG bytes are copied as-is unless ``resize`` re-encodes them.

For ``--dataset synthetic`` the CLI generates the default synthetic dataset at ``--root`` if
there is no complete generation there yet; ``pack()`` itself never generates.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile

from PIL import Image

from pipeline import s3_errors, storage, urls
from pipeline.shards import FORMAT, MANIFEST, SHARD_RE, SPLITS, frame_name, member_bytes, sample_key, shard_name
from pipeline.datasets import DatasetError, Tracklet, load_dataset
from pipeline.synthetic import generate, read_marker

log = logging.getLogger(__name__)

TAR_MTIME = 946684800  # fixed member metadata -> same bytes for the same input
RESIZE_QUALITY = 95
MAX_EXAMPLES = 20


class PackError(RuntimeError):
    """A strict pack met bad input, or the input cannot be packed."""


def _tar_size(entries_bytes: int) -> int:
    """Exact size of a tar holding entries of ``entries_bytes`` (end blocks, record padding)."""
    rec = tarfile.RECORDSIZE
    return (entries_bytes + 1024 + rec - 1) // rec * rec


def _frame(path: str, resize) -> bytes:
    """Validated JPEG bytes of one frame (copied as-is, or re-encoded when resizing / not JPEG)."""
    with open(path, "rb") as f:
        data = f.read()
    im = Image.open(io.BytesIO(data))
    im.load()  # full decode: catches truncated and corrupt files
    if resize is None and im.format == "JPEG":
        return data
    im = im.convert("RGB")
    if resize is not None:
        im = im.resize((resize[1], resize[0]), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=RESIZE_QUALITY)
    return buf.getvalue()


def _load_tracklet(t: Tracklet, resize, strict: bool, skipped: dict) -> list[bytes]:
    frames = []
    for path in t.frames:
        try:
            frames.append(_frame(path, resize))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            if strict:
                raise PackError(f"corrupt or unreadable image {path}: {e}") from e
            log.warning("skipping corrupt/unreadable image %s: %s", path, e)
            skipped["corrupt_images"] += 1
            if len(skipped["examples"]) < MAX_EXAMPLES:
                skipped["examples"].append(path)
    if not frames:
        log.warning("dropping tracklet %s: none of its %d frames is readable", t.tracklet, len(t.frames))
        skipped["tracklets_dropped"] += 1
    return frames


def _groups(split: str, tracklets: list[Tracklet]) -> list[list[Tracklet]]:
    """Units that must not span shards: an identity's tracklets (train), one tracklet otherwise."""
    if split != "train":
        return [[t] for t in tracklets]
    by_pid: dict[int, list[Tracklet]] = {}
    for t in tracklets:  # first-appearance order of identities, reader order within
        by_pid.setdefault(t.pid, []).append(t)
    return list(by_pid.values())


def _add(tar: tarfile.TarFile, name: str, data: bytes):
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), TAR_MTIME, 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    tar.addfile(ti, io.BytesIO(data))


class _Shard:
    """The shard being built in a local temp file."""

    def __init__(self, path: str):
        self.path = path
        self.file = open(path, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.bytes = 0  # sum of entry sizes so far
        self.pids: set[int] = set()
        self.tracklets = self.frames = 0

    def close(self) -> str:
        self.tar.close()
        self.file.close()
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()


def _publish(local: str, url: str, digest: str, nbytes: int) -> bool:
    """Upload ``local`` to ``url`` unless the same bytes are already there; True if uploaded."""
    try:
        if storage.size(url) == nbytes and storage.sha256(url) == digest:
            return False
    except FileNotFoundError:
        pass
    with open(local, "rb") as src, storage.open_write(url) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return True


def pack(dataset: str, root: str, out: str, *, shard_bytes: int = 256 << 20, resize=None,
         strict: bool = False, progress: bool = True) -> dict:
    """Pack dataset ``dataset`` read from ``root`` into shards under the URL ``out``.

    Returns the manifest (as written to ``<out>/manifest.json``) plus a ``transfer`` entry
    ``{"uploaded": [names], "reused": [names]}`` that is not written to the file."""
    from tqdm import tqdm

    if shard_bytes <= 0:
        raise ValueError("shard_bytes must be positive")
    if resize is not None:
        resize = (int(resize[0]), int(resize[1]))
        if min(resize) < 1:
            raise ValueError(f"bad resize {resize}")
    ds = load_dataset(dataset, root)
    storage.remove(urls.join(out, MANIFEST), missing_ok=True)  # not a dataset until the end

    skipped = {"corrupt_images": 0, "tracklets_dropped": 0, "examples": [],
               "reader_entries": len(ds.skipped)}
    manifest = {"format": FORMAT, "dataset": dataset, "created": None,
                "resize": list(resize) if resize else None, "num_classes": ds.num_train_pids,
                "splits": {}, "skipped": skipped}
    if dataset == "synthetic":  # the generator's parameters: a config asking for other data can tell
        manifest["synthetic"] = (read_marker(root) or {}).get("params")
    uploaded, reused = [], []
    total = sum(len(ds.split(s)) for s in SPLITS)
    bar = tqdm(total=total, unit="tracklet", desc=f"pack {dataset}", disable=not progress)
    written_bytes = 0
    with tempfile.TemporaryDirectory(prefix="sta-pack-") as tmpdir:
        for split in SPLITS:
            shards, index, cur = [], 0, None
            pids, n_frames = set(), 0

            def finish(shard: _Shard):
                name = shard_name(split, len(shards))
                digest = shard.close()
                nbytes = os.path.getsize(shard.path)
                (uploaded if _publish(shard.path, urls.join(out, name), digest, nbytes)
                 else reused).append(name)
                os.remove(shard.path)
                shards.append({"name": name, "bytes": nbytes, "sha256": digest,
                               "identities": sorted(shard.pids), "num_tracklets": shard.tracklets,
                               "num_frames": shard.frames})

            for group in _groups(split, ds.split(split)):
                samples = []
                for t in group:
                    frames = _load_tracklet(t, resize, strict, skipped)
                    bar.update(1)
                    if frames:
                        samples.append((t, frames))
                if not samples:
                    continue
                entries = []  # (member name, bytes) of the whole group, in order
                for k, (t, frames) in enumerate(samples):
                    key = sample_key(split, index + k)
                    meta = {"pid": t.pid, "camid": t.camid, "dataset": dataset, "split": split,
                            "n_frames": len(frames), "index": index + k, "tracklet": t.tracklet,
                            # lets readers take the frames as one block, no per-frame header parse
                            "frame_bytes": [len(f) for f in frames]}
                    entries.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
                    entries += [(frame_name(key, i), data) for i, data in enumerate(frames)]
                size = sum(member_bytes(len(d)) for _, d in entries)
                if cur is not None and cur.tracklets and _tar_size(cur.bytes + size) > shard_bytes:
                    finish(cur)
                    cur = None
                if cur is None:
                    cur = _Shard(os.path.join(tmpdir, f"{split}.tar"))
                for name, data in entries:
                    _add(cur.tar, name, data)
                for t, frames in samples:
                    cur.tracklets += 1
                    cur.frames += len(frames)
                    cur.pids.add(t.pid)
                    pids.add(t.pid)
                    n_frames += len(frames)
                    written_bytes += sum(len(f) for f in frames)
                index += len(samples)
                cur.bytes += size
                bar.set_postfix(MB=f"{written_bytes / 2**20:.1f}", shards=len(uploaded) + len(reused))
            if cur is not None:
                finish(cur)
            manifest["splits"][split] = {"num_tracklets": index, "num_identities": len(pids),
                                         "num_frames": n_frames, "shards": shards}
    bar.close()
    names = {s["name"] for sp in manifest["splits"].values() for s in sp["shards"]}
    for name in storage.listdir(out):  # shards of an earlier, different pack at this prefix
        if SHARD_RE.match(name) and name not in names:
            storage.remove(urls.join(out, name), missing_ok=True)
    manifest["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    storage.write_bytes(urls.join(out, MANIFEST), json.dumps(manifest, indent=1).encode())
    if skipped["corrupt_images"] or skipped["tracklets_dropped"]:
        log.warning("pack %s: skipped %d corrupt images, dropped %d tracklets (see manifest 'skipped')",
                    dataset, skipped["corrupt_images"], skipped["tracklets_dropped"])
    return {**manifest, "transfer": {"uploaded": uploaded, "reused": reused}}


def _parse_resize(s: str):
    m = re.fullmatch(r"(\d+)[xX](\d+)", s)
    if not m:
        raise argparse.ArgumentTypeError(f"--resize wants HxW, e.g. 256x128, got {s!r}")
    return int(m.group(1)), int(m.group(2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.pack",
                                 description="Pack a video re-ID dataset into WebDataset shards.")
    ap.add_argument("--dataset", required=True, choices=("mars", "dukev", "synthetic"))
    ap.add_argument("--root", required=True, help="local dataset root")
    ap.add_argument("--out", required=True, help="output prefix: path, file://... or s3://bucket/prefix")
    ap.add_argument("--shard-size-mb", type=float, default=256)
    ap.add_argument("--resize", type=_parse_resize, default=None, metavar="HxW")
    ap.add_argument("--strict", action="store_true", help="fail on a corrupt image instead of skipping")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:  # missing bucket, endpoint down, no or wrong credentials: one line before any work
        s3_errors.check(a.out)
    except s3_errors.StorageError as e:
        print(f"pack failed: {e}", file=sys.stderr)
        return 2
    try:
        if a.dataset == "synthetic" and not os.path.exists(os.path.join(a.root, "synthetic.json")):
            log.info("no synthetic dataset at %s: generating the default one", a.root)
            generate(a.root)
        m = pack(a.dataset, a.root, a.out, shard_bytes=int(a.shard_size_mb * 2**20),
                 resize=a.resize, strict=a.strict, progress=not a.quiet)
    except (DatasetError, PackError) as e:
        print(f"pack failed: {e}", file=sys.stderr)
        return 1
    summary = {s: {k: v for k, v in m["splits"][s].items() if k != "shards"} | {
        "shards": len(m["splits"][s]["shards"])} for s in SPLITS}
    print(json.dumps({"out": a.out, "splits": summary, "skipped": m["skipped"],
                      "transfer": {k: len(v) for k, v in m["transfer"].items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
