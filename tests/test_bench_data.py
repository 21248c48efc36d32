"""Smoke test of bench/data_throughput.py with tiny sizes (not a timed test: no figure is checked):
it runs end to end on real packed shards, measures the persistent loader's epochs and its first
epoch apart, counts the CPU of live loader processes, and run_all turns its JSON into table rows."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_all():
    spec = importlib.util.spec_from_file_location("bench_run_all", ROOT / "bench" / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_data_throughput", ROOT / "bench" / "data_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BUSY = "import time, sys\nfor s in sys.argv[1:]:\n    t = time.process_time()\n    while time.process_time() - t < float(s): pass\n    time.sleep(0.6)\n"


def test_loader_cpu_counts_live_and_reaped_children_once():
    """The CPU of loader processes: a live child counts its delta, a child reaped meanwhile counts
    in full less what it had used at the start, a child born and reaped meanwhile in full."""
    b = _bench_module()
    child = subprocess.Popen([sys.executable, "-c", BUSY, "0.3", "0.3"])  # busy, sleep, busy, sleep, exit
    try:
        import psutil

        deadline = time.time() + 20
        while sum(psutil.Process(child.pid).cpu_times()[:2]) < 0.3 and time.time() < deadline:
            time.sleep(0.02)  # until the first busy spell (0.3 s, not to be counted) is done
        start = b._kids_cpu()
        assert start[1][child.pid] >= 0.3
        time.sleep(0.05)
        live = b._kids_cpu_since(start)
        child.wait(timeout=30)  # second spell (0.3 s), then reaped
        subprocess.run([sys.executable, "-c", BUSY, "0.2"], check=True)  # born and reaped: 0.2 s
        total = b._kids_cpu_since(start)
    finally:
        child.kill()
    assert live < 0.25
    assert 0.45 <= total < 0.75, total  # 0.3 + 0.2 (+ interpreter start-ups), not + the first 0.3


def test_data_throughput_smoke_run(tmp_path):
    out = tmp_path / "data.json"
    cmd = [sys.executable, str(ROOT / "bench" / "data_throughput.py"), "--repeats", "2", "--num-ids", "8",
           "--tracklets-per-id", "2", "--frames", "4", "8", "--src-size", "32", "16", "--size", "32", "16",
           "--p", "2", "--k", "2", "--batches", "3", "--epochs", "2", "--shard-mb", "0.02", "--s3",
           "--json", str(out)]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    persistent = ("stream_local", "stream_local_u8", "stream_local_jpeg", "stream_s3",  # s3: moto on 127.0.0.1
                  "stream_s3_cached", "wds_stock",  # wds_stock: the stock webdataset peer row
                  "stream_local_u8_stock_tar", "stream_local_u8_no_ring")  # the A/B rows
    assert set(r["first_epoch"]) == set(persistent)
    for name in ("stream_s3", "stream_s3_cached"):  # the server's CPU is measured apart from the stream's
        assert all(x["server_cpu_s"] >= 0 for x in r["runs"][name]), r["runs"][name]
    for name in (*persistent, "stream_local_u8_fresh", "per_file"):
        runs = r["runs"][name]
        # 2 repeats of 2 epochs each, summed: 2 x 2 batches after each epoch's first
        assert len(runs) == 2 and all(x["epochs"] == 2 and x["batches"] == 4 and x["skipped"] == 0 for x in runs)
        assert all(x["raw_adjacent"]["frames_per_cpu_s"] > 0 for x in runs)
        assert all(x["loader_cpu_s"] >= 0 and x["cpu_s"] >= x["main_cpu_s"] for x in runs), (name, runs)
    for key in ("stream_local_u8_vs_raw_decode", "stream_local_u8_vs_raw_decode_cpu",
                "stream_local_u8_fresh_vs_raw_decode", "stream_local_u8_first_epoch_vs_raw_decode",
                "stream_local_u8_vs_wds_stock", "stream_local_u8_vs_wds_stock_cpu",
                "stream_local_u8_vs_stock_tar_cpu", "stream_local_u8_vs_no_ring_cpu"):
        v = r["ratios"][key]
        assert 0 < v["min"] <= v["median"] <= v["max"]
    rows = _run_all()._rows("data_throughput", r)
    assert len(rows) == len(r["ratios"])
    assert all(row.split(" | ")[2].strip() for row in rows), rows  # every ratio has its label and baseline
    u8 = [row for row in rows if row.startswith("| data_throughput | stream uint8 (persistent loader, as training) (")]
    assert len(u8) == 2 and all(">= 0.70x" in row or ">= 2x" in row for row in u8)
    assert all("frames/s" in row.split(" | ")[2] for row in u8)  # the baselines' rates too
