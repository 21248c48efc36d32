"""Speed/memory benchmark of ``evaluate_rank`` and ``re_ranking`` against the plain loop versions.

Synthetic MARS-sized features (1,980 queries x 9,330 gallery, 1024-d, 6 cameras, 625 ids): identity
centroids plus heavy Gaussian noise, so mAP lands in the middle of [0, 1].

Method: every measurement runs in a fresh subprocess that imports torch/numpy and loads the
inputs from .npy files, then resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5),
reads the current RSS, runs the function once under a wall clock (and process CPU time), and reads
the peak RSS (``VmHWM``); "peak MB" is peak minus the RSS before the call, i.e. the extra memory the
call needed at its high point (imports and inputs excluded). Where clear_refs is unavailable,
``ru_maxrss`` growth is used instead (a lower bound). Outputs go back through .npy files and are
compared in the parent. Timings on a shared machine depend on its load: the load average is printed.

Busy machine (``--busy N``, default 2): the vectorised call again while N CPU-burning processes run,
as a ratio to the quiet call of the same repeat; once with the threads ``sta_model`` chooses (the
CPUs idle at the call) and once with ``num_threads`` = every CPU forced.

    python bench/eval_speed.py [--repeats 5] [--busy 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np



def make_data(out_dir: str, num_q=1980, num_g=9330, dim=1024, num_ids=625, num_cams=6, noise=2.8, seed=0):
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((num_ids, dim)).astype(np.float32)
    q_pids = rng.integers(0, num_ids, num_q)
    g_pids = rng.integers(0, num_ids, num_g)
    q_cams = rng.integers(0, num_cams, num_q)
    g_cams = rng.integers(0, num_cams, num_g)
    qf = centroids[q_pids] + noise * rng.standard_normal((num_q, dim)).astype(np.float32)
    gf = centroids[g_pids] + noise * rng.standard_normal((num_g, dim)).astype(np.float32)
    sq_q, sq_g = (qf ** 2).sum(1), (gf ** 2).sum(1)
    dist = (sq_q[:, None] + sq_g[None, :] - 2 * qf @ gf.T).astype(np.float32)
    for name, arr in dict(qf=qf, gf=gf, dist=dist, q_pids=q_pids, g_pids=g_pids, q_cams=q_cams,
                          g_cams=g_cams).items():
        np.save(os.path.join(out_dir, name + ".npy"), arr)


def worker(task: str, data_dir: str, out_path: str, num_threads: int | None = None) -> None:
    """Run one measurement in this (fresh) process; print a JSON line.

    Args:
        num_threads: passed to the vectorised functions (None: they choose).
    """
    # Each measuring process imports only the implementation it measures (peak memory is per process).
    ld = lambda n: np.load(os.path.join(data_dir, n + ".npy"))  # noqa: E731
    if task.startswith("eval"):
        args = (ld("dist"), ld("q_pids"), ld("g_pids"), ld("q_cams"), ld("g_cams"))
        if task == "eval_vec":
            from sta_model.metrics import evaluate_rank as fn
        else:
            from _loop_baselines import eval_rank_loop as fn
    else:
        args = (ld("qf"), ld("gf"))
        if task == "rerank_vec":
            from sta_model.rerank import re_ranking as fn
        else:
            from _loop_baselines import re_ranking_loop as fn
        import torch  # noqa: F401  (import cost outside the measurement for both)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before, hwm = _status_kb("VmRSS"), True
    except OSError:
        before, hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, False
    kw = {"num_threads": num_threads} if task.endswith("_vec") else {}
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kw)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _status_kb("VmHWM") if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mb = (peak - before) / 1024
    if task.startswith("eval"):
        np.save(out_path, np.concatenate([out[0].astype(np.float64), [out[1]]]))
    else:
        np.save(out_path, out)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_mb": peak_mb}))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def measure(task: str, data_dir: str, out_path: str, threads: int | None, *, num_threads: int | None = None,
            busy: int = 0) -> dict:
    """One call in a fresh process. ``threads``: OMP/MKL/OpenBLAS env for the process; ``num_threads``:
    the argument of the vectorised call; ``busy``: CPU-burning processes running meanwhile."""
    env = dict(os.environ)
    if threads:  # torch intra-op and numpy's BLAS alike
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        cmd = [sys.executable, os.path.abspath(__file__), "--_worker", task, "--_data", data_dir, "--_out", out_path]
        if num_threads:
            cmd += ["--_threads", str(num_threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    return json.loads(res.stdout.strip().splitlines()[-1])


def _spread(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def busy_rows(what: str, data_dir: str, repeats: int, busy: int, threads: int | None) -> dict:
    """Quiet vs busy (``busy`` burners) for the vectorised call, chosen threads and one per CPU."""
    runs = {"quiet": [], "busy": [], "busy_all_cpus": []}
    out = os.path.join(data_dir, f"{what}_busy.npy")
    for r in range(repeats):
        runs["quiet"].append(measure(f"{what}_vec", data_dir, out, threads))
        runs["busy"].append(measure(f"{what}_vec", data_dir, out, threads, busy=busy))
        runs["busy_all_cpus"].append(measure(f"{what}_vec", data_dir, out, threads, busy=busy,
                                             num_threads=os.cpu_count()))
        print(f"  {what:6s} busy run {r + 1}/{repeats}: quiet {runs['quiet'][-1]['seconds']:.3f} s, "
              f"{busy} burners {runs['busy'][-1]['seconds']:.3f} s, same with {os.cpu_count()} threads "
              f"{runs['busy_all_cpus'][-1]['seconds']:.3f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    row = {"name": f"{what}_busy", "repeats": repeats, "burners": busy}
    for k, v in runs.items():
        row[f"{k}_s"] = [m["seconds"] for m in v]
        row[f"{k}_cpu_s"] = [m["cpu_seconds"] for m in v]
    for k in ("busy", "busy_all_cpus"):
        row[f"{k}_ratio"] = _spread([b["seconds"] / q["seconds"] for q, b in zip(runs["quiet"], runs[k])])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the result rows here")
    ap.add_argument("--noise", type=float, default=2.8)
    ap.add_argument("--threads", type=int, default=None, help="threads per measurement (default: library default)")
    ap.add_argument("--only", choices=("eval", "rerank"), default=None, help="run one of the two benchmarks")
    ap.add_argument("--busy", type=int, default=2, help="CPU-burning processes for the busy rows (0: skip them)")
    ap.add_argument("--busy-only", action="store_true", help="only the busy rows (no loop baselines)")
    ap.add_argument("--_worker"), ap.add_argument("--_data"), ap.add_argument("--_out")
    ap.add_argument("--_threads", type=int, default=None)
    a = ap.parse_args()
    if a._worker:
        return worker(a._worker, a._data, a._out, a._threads)

    from sta_model.metrics import evaluate_rank  # here: the --_worker processes above need not load it

    with tempfile.TemporaryDirectory() as tmp:
        make_data(tmp, noise=a.noise)
        ld = lambda n: np.load(os.path.join(tmp, n + ".npy"))  # noqa: E731
        labels = (ld("q_pids"), ld("g_pids"), ld("q_cams"), ld("g_cams"))
        rows, busy = [], []  # busy rows apart: bench/run_all.py reads "rows" as vec-vs-loop rows
        for what in (a.only,) if a.only else ("eval", "rerank"):
            if a.busy_only:
                busy.append(busy_rows(what, tmp, a.repeats, a.busy or 2, a.threads))
                continue
            runs = {"vec": [], "loop": []}
            for r in range(a.repeats):
                for impl in ("vec", "loop"):
                    m = measure(f"{what}_{impl}", tmp, os.path.join(tmp, f"{what}_{impl}.npy"), a.threads)
                    runs[impl].append(m)
                    print(f"  {what:6s} {impl:4s} run {r + 1}/{a.repeats}: {m['seconds']:.3f} s "
                          f"(cpu {m['cpu_seconds']:.3f} s), peak +{m['peak_mb']:.0f} MB, "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
            vec, loop = np.load(os.path.join(tmp, f"{what}_vec.npy")), np.load(os.path.join(tmp, f"{what}_loop.npy"))
            ratios = [lo["seconds"] / v["seconds"] for v, lo in zip(runs["vec"], runs["loop"])]
            cpu_ratios = [lo["cpu_seconds"] / v["cpu_seconds"] for v, lo in zip(runs["vec"], runs["loop"])]
            row = {"name": what, "repeats": a.repeats,
                   "vec_s": [m["seconds"] for m in runs["vec"]], "loop_s": [m["seconds"] for m in runs["loop"]],
                   "vec_cpu_s": [m["cpu_seconds"] for m in runs["vec"]],
                   "loop_cpu_s": [m["cpu_seconds"] for m in runs["loop"]],
                   "vec_peak_mb": max(m["peak_mb"] for m in runs["vec"]),
                   "loop_peak_mb": max(m["peak_mb"] for m in runs["loop"]),
                   "ratio_min": min(ratios), "ratio_median": statistics.median(ratios), "ratio_max": max(ratios),
                   "cpu_ratio": _spread(cpu_ratios)}
            if what == "eval":
                row.update(cmc_max_abs_diff=float(np.abs(vec[:-1] - loop[:-1]).max()),
                           map_abs_diff=float(abs(vec[-1] - loop[-1])), mAP=float(vec[-1]),
                           rank1=float(vec[0]), agree=bool(np.array_equal(vec[:-1], loop[:-1])))
            else:
                cmc_v, map_v = evaluate_rank(vec, *labels)
                cmc_l, map_l = evaluate_rank(loop, *labels)
                # Rows whose 10 nearest gallery entries come out in the same order.
                same_rank = np.mean(np.all(np.argsort(vec, 1, kind="stable")[:, :10]
                                           == np.argsort(loop, 1, kind="stable")[:, :10], 1))
                row.update(max_abs_diff=float(np.abs(vec - loop).max()), mAP=float(map_v),
                           mAP_loop=float(map_l), rank1=float(cmc_v[0]), rank1_loop=float(cmc_l[0]),
                           same_top10_frac=float(same_rank),
                           agree=bool(np.array_equal(cmc_v, cmc_l) and map_v == map_l))
            rows.append(row)
            if a.busy:
                busy.append(busy_rows(what, tmp, a.repeats, a.busy, a.threads))

    import torch
    threads = a.threads or torch.get_num_threads()
    load = os.getloadavg()[0]
    print(f"\nMARS-size synthetic (1980 x 9330, 1024-d), torch {torch.__version__}, {threads} threads, "
          f"repeats={a.repeats}, load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"{'task':7s} {'vec s (med)':>11s} {'loop s (med)':>12s} {'speedup min/med/max':>22s} "
          f"{'vec MB':>7s} {'loop MB':>8s}  agreement")
    for r in rows:
        agree = (f"cmc diff {r['cmc_max_abs_diff']:.1e}, mAP diff {r['map_abs_diff']:.1e}, mAP {r['mAP']:.4f}"
                 if r["name"] == "eval" else
                 f"max|diff| {r['max_abs_diff']:.1e}, same top-10 order {100 * r['same_top10_frac']:.1f}% rows, "
                 f"mAP {r['mAP']:.4f} vs {r['mAP_loop']:.4f}")
        print(f"{r['name']:7s} {statistics.median(r['vec_s']):11.3f} {statistics.median(r['loop_s']):12.3f} "
              f"{r['ratio_min']:6.1f}/{r['ratio_median']:5.1f}/{r['ratio_max']:5.1f}x "
              f"{r['vec_peak_mb']:7.0f} {r['loop_peak_mb']:8.0f}  {agree}; agree={r['agree']}")
    for r in rows:
        c = r["cpu_ratio"]
        print(f"{r['name']:12s} speed-up by CPU time {c[0]:.1f}/{c[1]:.1f}/{c[2]:.1f}x "
              f"(vec {statistics.median(r['vec_cpu_s']):.3f} s, loop {statistics.median(r['loop_cpu_s']):.3f} s CPU)")
    for r in busy:
        b, c = r["busy_ratio"], r["busy_all_cpus_ratio"]
        print(f"{r['name']:12s} quiet {statistics.median(r['quiet_s']):.3f} s; with {r['burners']} burners "
              f"{b[0]:.2f}/{b[1]:.2f}/{b[2]:.2f}x quiet (chosen threads), {c[0]:.2f}/{c[1]:.2f}/{c[2]:.2f}x "
              f"(num_threads={os.cpu_count()} forced)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"benchmark": "eval_speed", "threads": threads, "load_avg_1min": load, "rows": rows,
                       "busy": busy}, f, indent=1)


if __name__ == "__main__":
    main()
