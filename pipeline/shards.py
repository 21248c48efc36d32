"""The shard format, in one place for ``pipeline.pack`` (the writer) and the loaders (the readers).

A dataset at a prefix is ``manifest.json`` (``FORMAT``) plus WebDataset tar shards
``<split>-NNNNNN.tar``. One sample per tracklet, key ``<split>_<7-digit index>`` (no dots):
``<key>.json`` first (``pid``, ``camid``, ``n_frames``, ``index``, ``tracklet``, ``dataset``,
``split`` and ``frame_bytes``, the frames' sizes), then the frames ``<key>.NNN.jpg`` in temporal
order as plain ustar members. Stock ``webdataset``, ``tarfile`` and ``tar`` read them as they are;
``frame_bytes`` lets a reader locate every frame of a tracklet without parsing its header
(``frame_layout``). The manifest is written last, so a prefix without one is not a dataset.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pipeline import storage, urls

FORMAT = "sta-reid-shards/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "query", "gallery")
SHARD_RE = re.compile(r"^(train|query|gallery)-\d{6}\.tar$")
BLOCK = 512  # tar block: every member is a header block plus its data padded to blocks
_FRAME = re.compile(r"(\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def sample_key(split: str, index: int) -> str:
    """A tracklet's key: its split and its position among the split's packed tracklets."""
    return f"{split}_{index:07d}"


def frame_name(key: str, i: int) -> str:
    return f"{key}.{i:03d}.jpg"


def member_bytes(n: int) -> int:
    """Bytes a tar member of ``n`` data bytes takes: its header and its data padded to blocks."""
    return BLOCK + (n + BLOCK - 1) // BLOCK * BLOCK


def frame_layout(meta) -> tuple[list[int], list[int], int] | None:
    """The json's ``frame_bytes`` when usable: ``(sizes, offsets, total)``, frame i's member
    starting at ``offsets[i]`` in the block of ``total`` bytes that follows the json member.
    None for anything else (older shards without ``frame_bytes``, a malformed list).
    Plain Python: for ~40 ints it is twice as fast as numpy."""
    sizes = meta.get("frame_bytes") if isinstance(meta, dict) else None
    if not (isinstance(sizes, list) and sizes and len(sizes) == meta.get("n_frames")):
        return None
    offsets, end = [], 0
    for size in sizes:
        if type(size) is not int or size < 0:  # bools and floats too
            return None
        offsets.append(end)
        end += (size + 1023) >> 9 << 9  # member_bytes(size), inlined: called per tracklet
    return sizes, offsets, end


def check_meta(key: str, meta) -> dict:
    """``meta`` if it is a usable sample json; ValueError says why not."""
    if not isinstance(meta, dict):
        raise ValueError(f"sample {key!r}: json is not an object")
    for name in ("pid", "camid", "n_frames", "index"):
        if not isinstance(meta.get(name), int):
            raise ValueError(f"sample {key!r}: json field {name!r} missing or not an int")
    return meta


def make_sample(key: str, members: dict) -> tuple[dict, list]:
    """One tracklet from its tar members (extension -> bytes, as webdataset groups them, e.g.
    ``{"json": ..., "000.jpg": ...}``): ``(meta, frames in temporal order)``.
    ValueError says why the sample is unusable (no or bad json, frame count != ``n_frames``,
    a gap in the frame numbers).

    Args:
        key: the sample's key, for messages.
        members: its members by extension; ``json`` may already be parsed (a dict).
    """
    if "json" not in members:
        raise ValueError(f"sample {key!r} has no {key}.json")
    raw = members["json"]
    if isinstance(raw, dict):
        meta = raw
    else:
        try:
            meta = json.loads(bytes(raw))
        except ValueError as e:
            raise ValueError(f"sample {key!r}: bad json ({e})") from None
    check_meta(key, meta)
    frames = sorted((int(m.group(1)), data) for ext, data in members.items()
                    if (m := _FRAME.fullmatch(ext)))
    if len(frames) != meta["n_frames"] or [i for i, _ in frames] != list(range(len(frames))):
        raise ValueError(f"sample {key!r}: {len(frames)} frames, json says n_frames={meta['n_frames']}")
    if not frames:
        raise ValueError(f"sample {key!r}: no frames")
    return meta, [d for _, d in frames]


@dataclass(frozen=True)
class Split:
    """One split of a manifest: its shard URLs in manifest order and their entries."""

    name: str
    urls: tuple[str, ...]
    shards: tuple[dict, ...]  # the manifest's entries: name, bytes, sha256, identities, num_tracklets
    num_tracklets: int
    num_identities: int
    num_frames: int

    def identities(self) -> dict[str, frozenset]:
        """Shard URL -> the identities it holds (empty where the manifest does not say)."""
        return {u: frozenset(s.get("identities") or ()) for u, s in zip(self.urls, self.shards)}

    def tracklets(self) -> dict[str, int]:
        """Shard URL -> its number of samples (readers check that they saw all of them)."""
        return {u: int(s["num_tracklets"]) for u, s in zip(self.urls, self.shards) if "num_tracklets" in s}


@dataclass(frozen=True, eq=False)
class Manifest:
    """A dataset's ``manifest.json``, read once (``read_manifest``) and passed to the loaders.
    Picklable: loader worker processes get a copy."""

    url: str
    raw: dict  # the json as written by pipeline.pack

    @property
    def num_classes(self) -> int:
        return int(self.raw.get("num_classes") or self.raw["splits"]["train"]["num_identities"])

    def split(self, name: str) -> Split:
        """ValueError for an unknown split or one the manifest lacks."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r} (expected one of {SPLITS})")
        if name not in self.raw["splits"]:
            raise ValueError(f"{self.url}: the manifest has no {name!r} split")
        s = self.raw["splits"][name]
        shards = tuple(s["shards"])
        return Split(name, tuple(urls.join(self.url, sh["name"]) for sh in shards), shards,
                     int(s["num_tracklets"]), int(s["num_identities"]), int(s["num_frames"]))


def read_manifest(url) -> Manifest:
    """The dataset at ``url``. FileNotFoundError "not a dataset (no manifest.json)" if there is
    none, ValueError if it is not a ``FORMAT`` manifest."""
    murl = urls.join(url, MANIFEST)
    try:
        raw = storage.read_bytes(murl)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: not a dataset (no {MANIFEST})") from None
    try:
        man: Any = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{murl}: unreadable manifest ({e})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT or not isinstance(man.get("splits"), dict):
        got = man.get("format") if isinstance(man, dict) else None
        raise ValueError(f"{murl}: not a {FORMAT} manifest (format={got!r})")
    return Manifest(str(url), man)


def as_manifest(source) -> Manifest:
    """``source`` if it is a Manifest, else the one read from that URL."""
    return source if isinstance(source, Manifest) else read_manifest(source)
