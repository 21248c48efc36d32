"""Turn the ablation sweeps (``pipeline.tune`` outputs) into ``docs/ablation.md`` and its figure.

    python bench/ablation.py [--runs runs/ablation] [--out docs]

Reads ``<runs>/<sweep>/trials.csv`` for the sweeps of ``configs/ablation/*.yaml`` that exist, groups
trials by the swept setting (the seed is the repeat), and writes mean ± sample std, min–max and the
number of seeds per setting, the paired (same seed) STA − temporal-pooling difference, and the wall time
of each run (from the trials' MLflow runs). Sweeps that were not run are listed as such.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import load_config  # noqa: E402
from pipeline.viz import _new_figure, _save  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# sweep name -> (swept column, caption, order of its values)
SWEEPS = {
    "variants": ("variant", "Model variants (N=4, K=4, λ=3e-4 where it applies)",
                 ["temporal_pooling", "sta_no_reg", "sta", "sta_max_only", "sta_avg_only"]),
    "clip_len": ("variant", "Clip length N (train and test clips; STA, K=4)", ["N2", "N4", "N8"]),
    "stripes": ("model.num_blocks", "Stripes K (STA, N=4)", ["1", "2", "4"]),
    "lambda_reg": ("loss.lambda_reg", "Inter-frame regularisation λ (STA, N=4, K=4)", ["0.0", "0.0003", "1.0"]),
}
LABELS = {"temporal_pooling": "temporal average pooling", "sta_no_reg": "STA without Reg (λ=0)",
          "sta": "STA (max + avg fusion, λ=3e-4)", "sta_max_only": "STA, max-importance fusion only",
          "sta_avg_only": "STA, weighted-sum fusion only"}


def read_sweep(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def run_seconds(uri: str, run_ids: list[str]) -> list[float]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    out = []
    for rid in run_ids:
        info = client.get_run(rid).info
        if info.end_time and info.start_time:
            out.append((info.end_time - info.start_time) / 1000)
    return out


def stats(values: list[float]) -> dict:
    return {"n": len(values), "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values)}


def group(rows: list[dict], column: str, order: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for key in order + sorted({r[column] for r in rows} - set(order)):
        sel = [r for r in rows if r[column] == key and r["status"] == "finished" and r["mAP"]]
        if sel:
            out[key] = {"mAP": stats([100 * float(r["mAP"]) for r in sel]),
                        "rank1": stats([100 * float(r["rank1"]) for r in sel]),
                        "by_seed": {r["seed"]: 100 * float(r["mAP"]) for r in sel},
                        "run_ids": [r["mlflow_run_id"] for r in sel]}
    return out


def fmt(s: dict) -> str:
    return f"{s['mean']:.1f} ± {s['std']:.1f} ({s['min']:.1f}–{s['max']:.1f})"


def paired(a: dict, b: dict) -> dict | None:
    seeds = sorted(set(a["by_seed"]) & set(b["by_seed"]))
    return stats([a["by_seed"][s] - b["by_seed"][s] for s in seeds]) if seeds else None


def _max_only_weakest(groups: dict[str, dict]) -> bool:
    g = groups.get("variants") or {}
    return "sta_max_only" in g and min(g, key=lambda k: g[k]["mAP"]["mean"]) == "sta_max_only"


def figure(groups: dict[str, dict], path: Path) -> Path:
    panels = [(name, g) for name, g in groups.items() if g]
    fig = _new_figure(4.2 * len(panels), 3.8)
    for i, (name, g) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        keys = list(g)
        means = [g[k]["mAP"]["mean"] for k in keys]
        stds = [g[k]["mAP"]["std"] for k in keys]
        ax.bar(range(len(keys)), means, yerr=stds, capsize=4, color="#4C72B0", alpha=0.8)
        for j, k in enumerate(keys):
            ax.scatter([j] * len(g[k]["by_seed"]), list(g[k]["by_seed"].values()), color="black", s=10, zorder=3)
        ax.set_xticks(range(len(keys)), [k.replace("sta_", "").replace("temporal_pooling", "TP") for k in keys],
                      rotation=30, fontsize=7)
        ax.set_title(f"{name}: {SWEEPS[name][0]}", fontsize=9)
        ax.set_ylabel("mAP (%)", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.25, top=0.9, wspace=0.35)
    return _save(fig, path, 100)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default=str(ROOT / "runs" / "ablation"))
    ap.add_argument("--out", default=str(ROOT / "docs"))
    args = ap.parse_args(argv)
    base = load_config(ROOT / "configs" / "ablation" / "base.yaml")
    from pipeline.tracking import resolve_tracking_uri

    cwd = os.getcwd()
    os.chdir(ROOT)  # the ablation config's relative tracking URI is relative to the repo
    uri = resolve_tracking_uri(base.tracking.uri)
    os.chdir(cwd)
    s = base.data.synthetic
    lines = ["# STA ablation in miniature (synthetic occluded people)", "",
             "Regenerate with `scripts/ablation.sh` (runs the sweeps of `configs/ablation/*.yaml` through "
             "`python -m pipeline.tune` in grid mode, then `python bench/ablation.py`; finished sweeps are restored, "
             "not re-run).", "",
             f"Setup (`configs/ablation/base.yaml`): synthetic set with {s.num_ids} train / {s.num_test_ids} test "
             f"identities, {s.tracklets_per_id} tracklets each, {s.min_frames}–{s.max_frames} frames, "
             f"occlusion probability {s.occlusion_prob}, {base.data.height}×{base.data.width} images; "
             f"`{base.model.trunk}` trunk, embedding {base.model.embed_dim}; P×K = {base.data.p}×{base.data.k}, "
             f"{base.data.batches_per_epoch} batches/epoch × {base.optim.epochs} epochs, Adam lr {base.optim.lr}; "
             f"{base.scaling.num_workers} DeepSpeed CPU worker per trial, 2 trials at a time on a shared 2-core machine. "
             "Same budget for every run; no early stopping. The seed sets initialisation and sampling order; the data "
             "set is fixed. Numbers are mAP / Rank-1 in %, mean ± sample std over seeds (min–max in brackets).", ""]
    groups: dict[str, dict] = {}
    for name, (column, caption, order) in SWEEPS.items():
        path = Path(args.runs) / name / "trials.csv"
        lines.append(f"## {caption}")
        lines.append("")
        if not path.exists():
            lines += [f"Not run (no `{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}`).", ""]
            continue
        rows = read_sweep(path)
        g = group(rows, column, order)
        groups[name] = g
        secs = run_seconds(uri, [rid for v in g.values() for rid in v["run_ids"]])
        lines += ["| setting | seeds | mAP | Rank-1 |", "|---|---|---|---|"]
        lines += [f"| {LABELS.get(k, f'{column} = {k}')} | {v['mAP']['n']} | {fmt(v['mAP'])} | {fmt(v['rank1'])} |"
                  for k, v in g.items()]
        bad = [r for r in rows if r["status"] != "finished"]
        lines += ["", f"{len(rows)} trials, {len(bad)} not finished; training run wall time "
                      f"{statistics.mean(secs):.0f} s on average ({min(secs):.0f}–{max(secs):.0f} s)." if secs else "", ""]
        if name == "variants" and "sta" in g and "temporal_pooling" in g:
            d = paired(g["sta"], g["temporal_pooling"])
            spread = max(g["sta"]["mAP"]["std"], g["temporal_pooling"]["mAP"]["std"])
            verdict = ("STA beats temporal average pooling" if d["mean"] > 0 else
                       "STA does not beat temporal average pooling")
            consistent = d["min"] > 0 or d["max"] < 0
            lines += [f"**{verdict}** here: mAP difference STA − pooling = {d['mean']:+.1f} points "
                      f"(paired over {d['n']} seeds: {d['min']:+.1f} to {d['max']:+.1f}; seed spread of either model "
                      f"up to {spread:.1f}). The sign is {'the same for every seed' if consistent else 'not the same for every seed'}"
                      f", so {'the gap is consistent at this budget' if consistent else 'the gap is within seed noise at this budget'}.", ""]
            for other in ("sta_no_reg", "sta_max_only", "sta_avg_only"):
                if other in g:
                    e = paired(g["sta"], g[other])
                    lines.append(f"- STA − {LABELS[other]}: {e['mean']:+.1f} mAP points "
                                 f"(per seed {e['min']:+.1f} to {e['max']:+.1f})")
            lines.append("")
    lines += ["## Reading the numbers", "",
              f"- The test set is {s.num_test_ids} identities, so one query moves Rank-1 by several points and the "
              "seed spread is of the same order as most differences: only gaps whose sign holds for every seed are "
              "worth quoting, and even those are for this toy budget, not a replication of the paper.",
              "- STA's attention has no learned parameters: a stripe's score is its share of the squared activation "
              "energy. The paper computes it on an ImageNet-pretrained ResNet-50, whose energy already concentrates "
              "on the person; here the tiny trunk starts from random weights and trains for a few hundred steps, so "
              "high energy can just as well mark an occluder's edges or texture. The max-importance branch then "
              "copies such a stripe verbatim, while the weighted sum (and plain temporal pooling) averages it away"
              + (" — consistent with the max-only variant being the weakest here." if _max_only_weakest(groups) else
                 "; the runs here do not show the max-only variant as the weakest, though.")
              + " This is a hypothesis the runs here do not test (that would take a pretrained trunk or "
              "longer training).", ""]
    if groups:
        png = figure(groups, Path(args.out) / "ablation_mAP.png")
        lines += ["## Figure", "", f"![mAP per setting, bars = mean ± std, dots = seeds]({png.name})", ""]
    text = "\n".join(lines)
    (Path(args.out) / "ablation.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
