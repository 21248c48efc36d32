"""pipeline.reading: shards to validated tracklets through webdataset's tar stage or the block stage;
every kind of damage counted exactly once, never silent; the samples before it kept."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from pipeline import storage
from pipeline import reading
from pipeline.reading import Skips, eval_assignment, shard_samples
from shard_writer import LAYOUTS, _jpeg, _make_tracklets, _tar_bytes, _write_dataset, eval_set  # noqa: F401


def _read(url, **kw):
    skips = Skips()
    got = [(pos, meta["index"], [bytes(f) for f in frames]) for pos, meta, frames in shard_samples(url, skips, **kw)]
    return got, skips.total


@pytest.fixture(scope="module")
def tracks():
    return _make_tracklets(21, 4, 2, frames=(1, 6))


@pytest.fixture(params=["mapped", "streamed"])
def source(request, monkeypatch):
    """Every test reads its shard both ways: memory-mapped (local files, cached copies) and
    streamed (S3 without the cache: ``storage.open_read``)."""
    if request.param == "streamed":
        monkeypatch.setattr(storage, "map_local", lambda url: None)
    return request.param


def _want(tracks):
    return [(i, i, t["frames"]) for i, t in enumerate(tracks)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("blocks", [True, False])
def test_reads_every_sample_byte_equal(tmp_path, tracks, layout, blocks, source):
    url = str(tmp_path / "s.tar")
    storage.write_bytes(url, _tar_bytes("train", list(enumerate(tracks)), layout))
    assert _read(url, blocks=blocks, expected=len(tracks)) == (_want(tracks), 0)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_any_tar_writer(tmp_path, tracks, fmt, source):
    """Any WebDataset writer's tar (GNU long names, pax records, directories) reads alike."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for i, t in enumerate(tracks):
            key = f"train_{i:07d}"
            meta = {"pid": t["pid"], "camid": t["camid"], "n_frames": len(t["frames"]), "index": i}
            for name, data in [(f"{key}.json", json.dumps(meta).encode())] + [
                    (f"{key}.{j:03d}.jpg", f) for j, f in enumerate(t["frames"])]:
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime = len(data), 1.5
                tf.addfile(ti, io.BytesIO(data))
    url = str(tmp_path / "s.tar")
    storage.write_bytes(url, buf.getvalue())
    assert _read(url, expected=len(tracks)) == (_want(tracks), 0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_cut_anywhere_is_counted_once_and_the_samples_before_it_kept(tmp_path, tracks, layout, source):
    raw = _tar_bytes("train", list(enumerate(tracks)), layout)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        members = tf.getmembers()
    bounds = sorted({m.offset for m in members} | {m.offset_data for m in members})
    end = members[-1].offset_data + -(-members[-1].size // 512) * 512  # the end-of-archive block
    url = str(tmp_path / "s.tar")
    for cut in sorted({c + d for c in bounds for d in (0, 100, 511)} | {end - 1}):
        if cut >= end:  # only the end-of-archive blocks and padding lost: no sample is
            continue
        storage.write_bytes(url, raw[:cut])
        got, skipped = _read(url, expected=len(tracks))
        assert skipped == 1, cut
        assert got == _want(tracks)[:len(got)], cut  # a prefix, every frame intact
        complete = sum(1 for m in members if m.name.endswith(".json") and
                       max(x.offset_data + x.size for x in members if x.name.startswith(m.name[:-5])) <= cut)
        assert len(got) <= complete


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_corrupt_header_is_counted_once(tmp_path, tracks, layout, source):
    raw = _tar_bytes("train", list(enumerate(tracks)), layout)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        js = [m for m in tf.getmembers() if m.name.endswith(".json")]
    url = str(tmp_path / "s.tar")
    for hit in (js[2].offset + 3, js[2].offset + 150):  # the name, the checksum's neighbour (mode)
        bad = bytearray(raw)
        bad[hit] ^= 0x5A
        storage.write_bytes(url, bytes(bad))
        got, skipped = _read(url, expected=len(tracks))
        assert skipped == 1 and got == _want(tracks)[:len(got)] and len(got) <= 2
    storage.write_bytes(url, bytes(bad))
    with pytest.raises(Exception):
        list(shard_samples(url, None, expected=len(tracks)))  # without a counter: errors raise


def test_block_stage_hands_the_rest_of_a_shard_to_the_stock_stage(tmp_path, tracks, source):
    """A sample without frame_bytes mid-shard (another writer appended to it): read member by member."""
    a = _tar_bytes("train", list(enumerate(tracks[:3])), "block")[:-1024].rstrip(b"\0")
    a += bytes(-len(a) % 512)
    b = _tar_bytes("train", list(enumerate(tracks))[3:], "members")
    url = str(tmp_path / "s.tar")
    storage.write_bytes(url, a + b)
    assert _read(url, expected=len(tracks)) == (_want(tracks), 0)


def test_the_block_stage_reads_packed_shards_mapped_and_streamed(tmp_path, tracks, source, monkeypatch):
    """pack's layout never reaches the stock stage (which parses and copies every frame member),
    whether the shard is in memory or streamed."""
    url = str(tmp_path / "s.tar")
    storage.write_bytes(url, _tar_bytes("train", list(enumerate(tracks)), "block"))

    def no_stock(*a, **k):
        raise AssertionError("the stock stage was used")
    monkeypatch.setattr(reading, "stock_samples", no_stock)
    assert _read(url, expected=len(tracks)) == (_want(tracks), 0)


def test_parts_split_a_shard_by_position(tmp_path, tracks, source):
    url = str(tmp_path / "s.tar")
    storage.write_bytes(url, _tar_bytes("train", list(enumerate(tracks)), "block"))
    parts = [_read(url, part=q, parts=3)[0] for q in range(3)]
    assert sorted(x for p in parts for x in p) == _want(tracks)
    assert all(pos % 3 == q for q, p in enumerate(parts) for pos, _, _ in p)


def test_a_missing_shard_is_counted(tmp_path):
    assert _read(str(tmp_path / "nothing.tar")) == ([], 1)


def test_eval_assignment_each_tracklet_once():
    names = [f"s{i}" for i in range(3)]
    units = [u for r in range(2) for w in range(2)
             for u in eval_assignment(names, rank=r, world_size=2, worker=w, num_workers=2)]
    assert len(units) == len(set(units)) and {(s, q) for s, q, _ in units} == {(s, q) for s in names for q in range(2)}


def _header(name: str, size: int, fmt=tarfile.USTAR_FORMAT, **fields) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = size, 1_700_000_000
    for k, v in fields.items():
        setattr(info, k, v)
    return info.tobuf(fmt, "utf-8", "surrogateescape")[:512]


def _with_checksum(hdr: bytearray) -> bytes:
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr)


def test_json_header_short_path_answers_as_tarfile():
    """The block stage's header check gives tarfile's answer for pack's headers and for every
    variation around them (other types, formats, fields, damage, base-256 numbers...)."""
    import random

    rng = random.Random(0)
    headers = [_header("train_0000012.json", 480), _header("a.json", 0), _header("a.jpg", 5),
               _header("x" * 95 + ".json", 3), _header("dir/a.json", 7), _header("a.json", 8 ** 11 - 1),
               _header("a.json", 9, fmt=tarfile.GNU_FORMAT), _header("a.json", 9, type=tarfile.AREGTYPE),
               _header("a.json", 9, type=tarfile.DIRTYPE), _header("é.json", 9),
               _header("a.json", 9, fmt=tarfile.GNU_FORMAT, uid=8 ** 8),
               _header("a.json", 8 ** 11, fmt=tarfile.GNU_FORMAT),
               _header("a.b.json", 4), _header(".json", 4), _header("a.JSON", 4), bytes(512), b"\0" * 100]
    long_prefix = bytearray(_header("a.json", 1))
    long_prefix[345:348] = b"pre"
    headers.append(_with_checksum(long_prefix))
    base = _header("train_0000012.json", 480)
    for _ in range(3000):  # damaged fields, with the checksum repaired or not
        h = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            field = rng.choice([(0, 100), (100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156),
                                (156, 157), (257, 265), (329, 337), (337, 345), (345, 500)])
            i = rng.randrange(*field)
            h[i] = rng.choice([0, 0x20, 0x30, 0x37, 0x38, 0x2E, 0x80, 0xFF, 0x1C, 0x5F, 0x2B, rng.randrange(256)])
        headers.append(_with_checksum(h) if rng.random() < 0.7 else bytes(h))
    short = 0
    for h in headers:
        want = reading._json_member_tarfile(h)
        assert reading._json_member(h) == want, h
        short += want is not None
    assert short > 500  # the variations include many that the short path answers
    assert reading._json_member(base) == ("train_0000012", 480)
