"""Run the CPU benchmarks and write their ratios as one markdown table.

    .venv/bin/python bench/run_all.py --repeats 5 [--eval-repeats N] [--skip eval_speed ...]

``--skip`` keeps a bench's last results (dated in the table) instead of re-running it.

Runs, each in its own process with ``--repeats N --json bench/results/<name>.json``:
``bench/eval_speed.py`` (vectorised evaluate_rank / re_ranking vs. the plain loops),
``bench/data_throughput.py`` (shard stream vs. per-file loader and raw decode),
``bench/train_overhead.py`` (DeepSpeed worker loop vs. plain PyTorch loop) and
``bench/allreduce.py`` (gloo allreduce at the gradient sizes; informative, no target).
Every ratio is against a baseline measured in the same run, min/median/max over the repeats.
Writes ``bench/RESULTS.md`` and, if README.md has the markers ``<!-- bench:start -->`` /
``<!-- bench:end -->``, replaces the text between them (nothing else in README.md is touched).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
BENCHES = ("eval_speed", "data_throughput", "train_overhead", "allreduce")


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}"


def _row(bench, what, r, baseline, target, ok=None):
    fmt = lambda x: f"{x:.2f}x"  # noqa: E731
    status = "" if ok is None else ("met" if ok else "**not met**")
    return (f"| {bench} | {what} | {baseline} | {fmt(r['min'])} | {fmt(r['median'])} | {fmt(r['max'])} "
            f"| {target} | {status} |")


def _rows(name: str, res: dict) -> list[str]:
    out = []
    if name == "eval_speed":
        # Issue targets: evaluate_rank <= 0.5 s at MARS size with identical numbers; re_ranking >= 10x
        # the plain algorithm, peak <= 1.5 GB, max abs diff <= 1e-3. Wall and CPU-time ratios both shown:
        # on a shared machine the CPU-time ratio is the one other load does not distort.
        for r in res["rows"]:
            mm = {"min": r["ratio_min"], "median": r["ratio_median"], "max": r["ratio_max"]}
            cpu = sorted(lo / v for lo, v in zip(r["loop_cpu_s"], r["vec_cpu_s"]))
            mm_cpu = {"min": cpu[0], "median": statistics.median(cpu), "max": cpu[-1]}
            if r["name"] == "eval":
                best = min(r["vec_s"])
                exact = r["cmc_max_abs_diff"] == 0 and r["map_abs_diff"] == 0
                out.append(_row(name, f"evaluate_rank (fastest {best:.2f} s wall, {min(r['vec_cpu_s']):.2f} s CPU; "
                                f"identical: {exact})", mm, "plain per-query loop", "<= 0.5 s, identical",
                                best <= 0.5 and exact))
                out.append(_row(name, "evaluate_rank, CPU time", mm_cpu, "plain per-query loop, CPU time", "-"))
            else:
                fits = r["vec_peak_mb"] <= 1536 and r["max_abs_diff"] <= 1e-3
                out.append(_row(name, f"re_ranking (peak +{r['vec_peak_mb']:.0f} MB vs +{r['loop_peak_mb']:.0f} MB, "
                                f"max diff {r['max_abs_diff']:.1e})", mm, "plain loop algorithm (numpy)",
                                ">= 10x, <= 1.5 GB, diff <= 1e-3", r["ratio_median"] >= 10 and fits))
                out.append(_row(name, "re_ranking, CPU time", mm_cpu, "plain loop algorithm, CPU time", ">= 10x",
                                mm_cpu["median"] >= 10 and fits))
        # Busy machine (issue 15, E17): the same call with CPU-burning processes running, time as a
        # ratio to the quiet call of the same repeat (>1: slower); informative, no target.
        for r in res.get("busy", []):
            fn = "evaluate_rank" if r["name"].startswith("eval") else "re_ranking"
            for key, how in (("busy_ratio", "threads it chooses"), ("busy_all_cpus_ratio", "every CPU forced")):
                b = r[key]
                out.append(_row(name, f"{fn} with {r['burners']} CPU burners, {how} (time / quiet)",
                                {"min": b[0], "median": b[1], "max": b[2]}, "the same call, quiet", "-"))
    elif name == "data_throughput":
        raw, raw_cpu, pf, pf_cpu = ("raw JPEG decode (libjpeg-turbo), 1 core", "raw decode, per CPU-s",
                                    "per-file loader", "per-file loader, per CPU-s")
        u8 = "stream uint8 (persistent loader, as training)"
        f32 = "stream float32 (also normalises: not the training path)"
        fresh = "stream uint8, a new loader each epoch"
        dev = "stream decode=device on CPU"
        s3c = "stream uint8 over S3 with the node-local shard cache (data.cache_dir), later epochs"
        s3 = "stream uint8 over S3, no local cache (moto server in its own process on 127.0.0.1; the stream's CPU only)"
        labels = {"stream_local_u8_vs_per_file": (u8, pf, ">= 2x", 2.0),
                  "stream_local_u8_vs_raw_decode": (u8, raw, ">= 0.70x", 0.7),
                  "stream_local_u8_vs_per_file_cpu": (f"{u8}, frames per CPU-s", pf_cpu, ">= 2x", 2.0),
                  "stream_local_u8_vs_raw_decode_cpu": (f"{u8}, frames per CPU-s", raw_cpu, ">= 0.70x", 0.7),
                  "stream_local_u8_vs_raw_decode_steady": ("stream uint8, from the first batch on", raw, "-", None),
                  "stream_local_u8_vs_raw_decode_pil": ("stream uint8", "raw decode with PIL, 1 core", "-", None),
                  "stream_local_u8_first_epoch_vs_raw_decode": ("stream uint8, the loader's first epoch (fork)", raw,
                                                                "-", None),
                  "stream_local_vs_per_file": (f32, pf, ">= 2x", 2.0),
                  "stream_local_vs_per_file_cpu": (f"{f32}, frames per CPU-s", pf_cpu, ">= 2x", 2.0),
                  "stream_local_vs_raw_decode": (f32, raw, "-", None),
                  "stream_local_vs_raw_decode_cpu": (f"{f32}, frames per CPU-s", raw_cpu, "-", None),
                  "stream_local_vs_raw_decode_steady": ("stream float32, from the first batch on", raw, "-", None),
                  "stream_local_vs_raw_decode_pil": ("stream float32", "raw decode with PIL, 1 core", "-", None),
                  "stream_local_first_epoch_vs_raw_decode": ("stream float32, the loader's first epoch (fork)", raw,
                                                             "-", None),
                  "stream_local_u8_fresh_vs_per_file": (fresh, pf, "-", None),
                  "stream_local_u8_fresh_vs_per_file_cpu": (f"{fresh}, frames per CPU-s", pf_cpu, "-", None),
                  "stream_local_u8_fresh_vs_raw_decode": (fresh, raw, "-", None),
                  "stream_local_u8_fresh_vs_raw_decode_cpu": (f"{fresh}, frames per CPU-s", raw_cpu, "-", None),
                  "stream_local_u8_fresh_vs_raw_decode_steady": (f"{fresh}, from the first batch on", raw, "-", None),
                  "stream_local_u8_fresh_vs_raw_decode_pil": (fresh, "raw decode with PIL, 1 core", "-", None),
                  "stream_s3_vs_per_file": (s3, pf, ">= 2x", 2.0),
                  "stream_s3_vs_per_file_cpu": (f"{s3}, frames per CPU-s", pf_cpu, ">= 2x", 2.0),
                  "stream_s3_vs_raw_decode": (s3, raw, ">= 0.70x", 0.7),
                  "stream_s3_vs_raw_decode_cpu": (f"{s3}, frames per CPU-s", raw_cpu, ">= 0.70x", 0.7),
                  "stream_s3_cached_vs_per_file": (s3c, pf, ">= 2x", 2.0),
                  "stream_s3_cached_vs_per_file_cpu": (f"{s3c}, frames per CPU-s", pf_cpu, ">= 2x", 2.0),
                  "stream_s3_cached_vs_raw_decode": (s3c, raw, ">= 0.70x", 0.7),
                  "stream_s3_cached_vs_raw_decode_cpu": (f"{s3c}, frames per CPU-s", raw_cpu, ">= 0.70x", 0.7),
                  "stream_s3_cached_vs_raw_decode_steady": (f"{s3c}, from the first batch on", raw, "-", None),
                  "stream_s3_cached_vs_raw_decode_pil": (s3c, "raw decode with PIL, 1 core", "-", None),
                  "stream_s3_cached_first_epoch_vs_raw_decode": (f"{s3c}: its first epoch (fork; streams and "
                                                                 "copies every shard)", raw, "-", None),
                  "stream_s3_vs_raw_decode_steady": (f"{s3}, from the first batch on", raw, "-", None),
                  "stream_s3_vs_raw_decode_pil": (s3, "raw decode with PIL, 1 core", "-", None),
                  "stream_s3_first_epoch_vs_raw_decode": (f"{s3}, the loader's first epoch (fork)", raw, "-", None),
                  "stream_local_jpeg_vs_per_file": (f"{dev} (main process decodes)", pf, "-", None),
                  "stream_local_jpeg_vs_per_file_cpu": (f"{dev}, frames per CPU-s", pf_cpu, "-", None),
                  "stream_local_jpeg_vs_raw_decode": (f"{dev} (2 processes)", raw, "-", None),
                  "stream_local_jpeg_vs_raw_decode_cpu": (f"{dev}, frames per CPU-s", raw_cpu, "-", None),
                  "stream_local_jpeg_vs_raw_decode_steady": (f"{dev}, from the first batch on", raw, "-", None),
                  "stream_local_jpeg_vs_raw_decode_pil": (f"{dev} (2 processes)", "raw decode with PIL, 1 core",
                                                          "-", None),
                  "stream_local_jpeg_first_epoch_vs_raw_decode": (f"{dev}, the loader's first epoch (fork)", raw,
                                                                  "-", None),
                  "per_file_vs_raw_decode": ("per-file loader", raw, "-", None),
                  "raw_decode_pil_vs_raw_decode": ("raw decode with PIL", "raw decode with libjpeg-turbo (simplejpeg)",
                                                   "-", None),
                  "raw_decode_batches_vs_raw_decode": ("raw decode (libjpeg-turbo) into a ring of 5 batches, "
                                                       "each frame to its own place", "the same into one array", "-",
                                                       None),
                  "stream_local_u8_vs_raw_decode_batches": (u8, "raw decode into a ring of 5 batches, 1 core", "-",
                                                            None),
                  "stream_local_u8_vs_raw_decode_aligned": (u8, "raw decode into one 64-byte-aligned array, 1 core",
                                                            "-", None),
                  "raw_decode_aligned_vs_raw_decode": ("raw decode (libjpeg-turbo) into a 64-byte-aligned array "
                                                       "(non-temporal stores)", "the same into a frame_buffer", "-", None),
                  "per_file_vs_raw_decode_cpu": ("per-file loader, per CPU-s", raw_cpu, "-", None)}
        wds = "stock webdataset pipeline (tarfile_to_samples, sampled frames decoded, P x K)"
        for key, base in (("per_file", pf), ("raw_decode", raw), ("raw_decode_pil", "raw decode with PIL, 1 core"),
                          ("raw_decode_steady", raw), ("per_file_cpu", pf_cpu), ("raw_decode_cpu", raw_cpu),
                          ("first_epoch_vs_raw_decode", raw)):
            labels[f"wds_stock_{key}" if key.startswith("first") else f"wds_stock_vs_{key}"] = (wds, base, "-", None)
        labels["stream_local_u8_vs_wds_stock"] = (u8, wds, "-", None)
        labels["stream_local_u8_vs_wds_stock_cpu"] = (f"{u8}, frames per CPU-s", f"{wds}, per CPU-s", "-", None)
        for ab, what in (("stock_tar", "the same with webdataset's tar stage instead of the block stage"),
                         ("no_ring", "the same without batch-buffer reuse")):
            labels[f"stream_local_u8_vs_{ab}"] = (u8, what, "-", None)
            labels[f"stream_local_u8_vs_{ab}_cpu"] = (f"{u8}, frames per CPU-s", f"{what}, per CPU-s", "-", None)
            labels[f"stream_local_u8_{ab}_first_epoch_vs_raw_decode"] = (f"{u8}, {what[9:]}: its first epoch", raw,
                                                                      "-", None)
        # absolute rates on the headline rows (medians over the repeats)
        sm = res.get("summary", {})
        rate = lambda c: f" ({sm[c]['frames_per_s']:.0f} frames/s, {sm[c]['clips_per_s']:.0f} clips/s)"  # noqa: E731
        for key, case, base_case in (("stream_local_u8_vs_per_file", "stream_local_u8", "per_file"),
                                     ("stream_local_u8_vs_raw_decode", "stream_local_u8", "raw_decode"),
                                     ("stream_s3_vs_per_file", "stream_s3", "per_file"),
                                     ("stream_s3_cached_vs_per_file", "stream_s3_cached", "per_file")):
            if key in labels and case in sm and base_case in sm:
                what, base, target, thr = labels[key]
                labels[key] = (what + rate(case), base + rate(base_case), target, thr)
        for key, r in res["ratios"].items():
            what, base, target, thr = labels.get(key, (key, "", "-", None))
            out.append(_row(name, what, r, base, target, None if thr is None else r["median"] >= thr))
    elif name == "train_overhead":
        for r in res["rows"]:
            mm = {"min": r["ratio_min"], "median": r["ratio_median"], "max": r["ratio_max"]}
            out.append(_row(name, f"DeepSpeed run_epoch steps/s ({r['deepspeed_step_ms_median']:.0f} ms/step, "
                            f"overhead median {100 * r['overhead_median']:+.1f}%)", mm,
                            f"plain PyTorch loop ({r['plain_step_ms_median']:.0f} ms/step)",
                            ">= 0.91x (overhead <= 10%)", r["ratio_median"] >= 1 / 1.1))
    elif name == "allreduce":
        for r in res["rows"]:
            mm = {"min": r["ratio_min"], "median": r["ratio_median"], "max": r["ratio_max"]}
            secs = sorted(r["seconds"])
            out.append(_row(name, f"gloo 2 procs, {r['name']} ({r['bytes'] / 2**20:.1f} MB): "
                            f"median {1e3 * secs[len(secs) // 2]:.1f} ms", mm,
                            "memcpy of the same bytes (time ratio)", "- (no target)"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--eval-repeats", type=int, default=None,
                    help="repeats for eval_speed (its loop baselines are the slowest)")
    ap.add_argument("--skip", nargs="*", default=[], choices=BENCHES,
                    help="do not re-run these; their last JSON in bench/results/ is reported, dated")
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    a = ap.parse_args(argv)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    load_before = os.getloadavg()
    t_start = time.time()
    results, notes, rows = {}, [], []
    for name in BENCHES:
        js = os.path.join(HERE, "results", f"{name}.json")
        if name in a.skip:
            if os.path.exists(js):  # keep the last measured rows, and say when they were measured
                with open(js) as f:
                    results[name] = json.load(f)
                rows += _rows(name, results[name])
                when = datetime.datetime.fromtimestamp(os.path.getmtime(js), datetime.timezone.utc)
                notes.append(f"{name}: not re-run (--skip), rows from its run of {when:%Y-%m-%d %H:%M} UTC")
            else:
                notes.append(f"{name}: skipped (--skip)")
            continue
        reps = a.eval_repeats if name == "eval_speed" and a.eval_repeats else a.repeats
        cmd = [sys.executable, os.path.join(HERE, f"{name}.py"), "--repeats", str(reps), "--json", js]
        if name == "data_throughput":  # the generated JPEG data set is reused across runs
            cmd += ["--workdir", os.path.join(HERE, "results", "data_throughput_data"), "--s3"]
        print("$", " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd), flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT)
        dt = time.time() - t0
        if proc.returncode != 0 or not os.path.exists(js):
            notes.append(f"{name}: FAILED (exit {proc.returncode})")
            continue
        with open(js) as f:
            results[name] = json.load(f)
        rows += _rows(name, results[name])
        notes.append(f"{name}: {reps} repeats, {dt:.0f} s")

    load_after = os.getloadavg()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [f"Benchmarks run {stamp} by `bench/run_all.py --repeats {a.repeats}"
          f"{f' --eval-repeats {a.eval_repeats}' if a.eval_repeats else ''}` "
          f"({time.time() - t_start:.0f} s).",
          f"Machine: {_machine()}; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
          f"(shared machine: expect noise). Each ratio is against its baseline measured in the same "
          f"run; min/median/max over the repeats (`bench/README.md` explains each).", "",
          "| bench | measured | baseline | min | median | max | target | status |",
          "|---|---|---|---|---|---|---|---|", *rows, "",
          "Runs: " + "; ".join(notes) + "."]
    text = "\n".join(md) + "\n"
    with open(a.out, "w") as f:
        f.write("# Benchmark results\n\n" + text)
    print("\n" + text)
    readme = os.path.join(ROOT, "README.md")
    if os.path.exists(readme):
        with open(readme) as f:
            body = f.read()
        if START in body and END in body and body.index(START) < body.index(END):
            head, rest = body.split(START, 1)
            _, tail = rest.split(END, 1)
            with open(readme, "w") as f:
                f.write(f"{head}{START}\n{text}{END}{tail}")
            print("README.md: table written between the bench markers")
        else:
            print("README.md has no bench markers: only", os.path.relpath(a.out, ROOT), "written")
    return 0 if all("FAILED" not in n for n in notes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
