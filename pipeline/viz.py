"""Figures for runs and sweeps: CMC curves, STA attention heatmaps, training curves, sweep plots.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas and never touch pyplot, so
nothing depends on (or changes) the process-wide backend and no display is needed. Every plot
function validates its inputs (``ValueError`` on bad shapes), writes a PNG and returns its path.
Image sizes are fixed by the figure size in inches × ``dpi`` (no tight bbox), so they are predictable.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD
DPI = 100
CMC_SIZE = (6.4, 4.8)  # inches
ATTENTION_ROW_HEIGHT = 3.2  # inches per query clip
CURVE_PANEL = (4.8, 3.4)  # inches per metric group
SWEEP_HEIGHT = 4.8


def _array(x: Any, name: str) -> np.ndarray:
    """numpy view of a numpy array or (any-device) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{name}: not array-like ({exc})") from None
    return x


def _new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike, dpi: int) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    return out


# --------------------------------------------------------------------------- CMC

def plot_cmc(cmc: Any, path: str | os.PathLike, *, label: Optional[str] = None, max_rank: int = 20,
             extra: Optional[Mapping[str, Any]] = None, dpi: int = DPI) -> Path:
    """CMC curve: rank 1..max_rank on x, matching rate (%) on y, Rank-1/5/10 of ``cmc`` annotated.

    ``cmc`` holds fractions in [0, 1] indexed by rank-1 (``cmc[0]`` = Rank-1); ``extra`` adds more
    labelled curves (e.g. with re-ranking) for comparison. Size: ``CMC_SIZE`` × ``dpi``.
    """
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    curves = {label or "CMC": _check_cmc(cmc, "cmc")}
    for name, other in (extra or {}).items():
        if name in curves:
            raise ValueError(f"extra: duplicate curve label {name!r}")
        curves[name] = _check_cmc(other, f"extra[{name!r}]")
    fig = _new_figure(*CMC_SIZE)
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, values) in enumerate(curves.items()):
        n = min(max_rank, len(values))
        ranks = np.arange(1, n + 1)
        ax.plot(ranks, values[:n] * 100, marker="o" if n <= 30 else None, ms=3,
                lw=2.0 if i == 0 else 1.4, label=f"{name} (R1 {values[0] * 100:.1f}%)")
    main = next(iter(curves.values()))
    for r in (1, 5, 10):
        if r <= min(max_rank, len(main)):
            y = main[r - 1] * 100
            ax.annotate(f"R{r} {y:.1f}%", (r, y), xytext=(6, -14), textcoords="offset points", fontsize=8,
                        arrowprops={"arrowstyle": "-", "lw": 0.6})
    top = min(max_rank, max(len(v) for v in curves.values()))
    ax.set_xlim(0.5, top + 0.5)
    ax.set_xticks(sorted({1, *range(5, top + 1, 5)} & set(range(1, top + 1))))
    low = min(float(v[: min(max_rank, len(v))].min()) for v in curves.values()) * 100
    ax.set_ylim(max(0.0, math.floor(low / 10) * 10 - 5), 101)
    ax.set_xlabel("Rank")
    ax.set_ylabel("Matching rate (%)")
    ax.set_title("CMC")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path, dpi)


def _check_cmc(cmc: Any, name: str) -> np.ndarray:
    arr = _array(cmc, name).astype(np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or arr.min() < -1e-6 or arr.max() > 1 + 1e-6:
        raise ValueError(f"{name}: CMC values must be finite fractions in [0, 1]")
    if np.any(np.diff(arr) < -1e-6):
        raise ValueError(f"{name}: a CMC curve cannot decrease with rank")
    return arr


# --------------------------------------------------------------------------- attention

def denormalize(clips: Any, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """Normalised float frames ``(N, 3, H, W)`` (torch or numpy) → ``uint8 (N, H, W, 3)`` images."""
    x = _array(clips, "clips").astype(np.float32)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"clips: expected (N, 3, H, W), got shape {x.shape}")
    m = np.asarray(mean, dtype=np.float32).reshape(-1)
    s = np.asarray(std, dtype=np.float32).reshape(-1)
    if m.size != 3 or s.size != 3:
        raise ValueError("mean and std need 3 values (one per channel)")
    x = x * s[None, :, None, None] + m[None, :, None, None]
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _check_attention(frames: Any, maps: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    f = _array(frames, "frames")
    g = _array(maps, "spatial_maps").astype(np.float64)
    s = _array(scores, "scores").astype(np.float64)
    if f.ndim != 4 or f.shape[-1] != 3 or f.dtype != np.uint8:
        raise ValueError(f"frames: expected uint8 (N, H, W, 3), got {f.dtype} {f.shape}")
    n = f.shape[0]
    if n == 0:
        raise ValueError("frames: empty clip")
    if g.ndim != 3 or g.shape[0] != n:
        raise ValueError(f"spatial_maps: expected ({n}, h, w), got {g.shape}")
    if s.ndim != 2 or s.shape[0] != n or s.shape[1] < 1:
        raise ValueError(f"scores: expected ({n}, K), got {s.shape}")
    if g.shape[1] % s.shape[1]:
        raise ValueError(f"spatial_maps height {g.shape[1]} is not divisible into K={s.shape[1]} stripes")
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(s))):
        raise ValueError("spatial_maps and scores must be finite")
    return f, g, s


def _draw_attention_row(fig: Figure, frame_specs: list, score_spec, frames: np.ndarray, maps: np.ndarray,
                        scores: np.ndarray, caption: Optional[str]) -> None:
    """Frames as columns with their maps overlaid; the score matrix (stripes × frames) to the right."""
    n, height, width, _ = frames.shape
    k = scores.shape[1]
    vmax = float(maps.max()) or 1.0  # one scale for the clip so frame importance stays comparable
    for i in range(n):
        ax = fig.add_subplot(frame_specs[i])
        ax.imshow(frames[i], interpolation="nearest")
        ax.imshow(maps[i], cmap="jet", alpha=0.45, vmin=0.0, vmax=vmax, interpolation="bilinear",
                  extent=(-0.5, width - 0.5, height - 0.5, -0.5))
        for b in range(1, k):
            ax.axhline(b * height / k - 0.5, color="white", lw=1.0, ls="--")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"frame {i + 1}", fontsize=8)
        if i == 0 and caption:
            ax.set_ylabel(caption, fontsize=8)
    ax = fig.add_subplot(score_spec)
    mat = scores.T  # row k = stripe k, in the same top-to-bottom order as in the frames
    top = float(mat.max()) or 1.0
    ax.imshow(mat, cmap="viridis", vmin=0.0, vmax=top, aspect="auto")
    best = mat.argmax(axis=1)
    for r in range(k):
        for c in range(n):
            ax.text(c, r, f"{mat[r, c]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if mat[r, c] > 0.6 * top else "white",
                    fontweight="bold" if c == best[r] else "normal")
    ax.set_xticks(range(n), [str(i + 1) for i in range(n)], fontsize=7)
    ax.set_yticks(range(k), [f"stripe {r + 1}" for r in range(k)], fontsize=7)
    ax.yaxis.tick_right()  # keep the stripe labels clear of the last frame
    ax.set_xlabel("frame", fontsize=8)
    ax.set_title("scores S(n,k)", fontsize=8)


def _attention_figure(items: list[tuple[np.ndarray, np.ndarray, np.ndarray, Optional[str]]],
                      title: Optional[str]) -> Figure:
    n_max = max(f.shape[0] for f, _, _, _ in items)
    aspect = max(f.shape[2] / f.shape[1] for f, _, _, _ in items)  # W / H of the widest frames
    frame_w = ATTENTION_ROW_HEIGHT * 0.8 * aspect
    score_w = max(2.4, 0.45 * n_max + 1.2)
    fig = _new_figure(frame_w * n_max + score_w + 0.4, ATTENTION_ROW_HEIGHT * len(items) + (0.4 if title else 0))
    outer = fig.add_gridspec(len(items), 1, left=0.05, right=0.93, bottom=0.06,
                             top=1 - (0.4 / fig.get_figheight() if title else 0.02) - 0.06 / len(items),
                             hspace=0.35)
    for row, (f, g, s, caption) in enumerate(items):
        # Rows with fewer frames leave their last frame columns empty.
        ratios = [frame_w] * n_max + [score_w]
        gs_row = outer[row].subgridspec(1, n_max + 1, width_ratios=ratios, wspace=0.08)
        _draw_attention_row(fig, [gs_row[0, i] for i in range(f.shape[0])], gs_row[0, n_max], f, g, s, caption)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_attention_grid(items: Sequence[tuple[Any, Any, Any, Optional[str]]], path: str | os.PathLike, *,
                        title: Optional[str] = None, dpi: int = DPI) -> Path:
    """The paper's attention figure, one row per query clip: ``items`` = ``[(frames, maps, scores, caption), ...]``.

    ``frames`` uint8 ``(N, H, W, 3)``; ``maps`` ``(N, h, w)`` (upsampled onto the frames as a heatmap,
    stripe boundaries dashed); ``scores`` ``(N, K)`` drawn as an annotated stripes × frames matrix, the
    max-importance frame of each stripe in bold. Height ``ATTENTION_ROW_HEIGHT`` inches a row (+0.4
    with a title); width grows with the longest clip's N.
    """
    if not items:
        raise ValueError("plot_attention_grid: no clips given")
    checked = []
    for i, item in enumerate(items):
        if len(item) != 4:
            raise ValueError(f"items[{i}]: expected (frames, maps, scores, caption)")
        try:
            checked.append((*_check_attention(*item[:3]), item[3]))
        except ValueError as exc:
            raise ValueError(f"items[{i}]: {exc}") from None
    return _save(_attention_figure(checked, title), path, dpi)


# --------------------------------------------------------------------------- curves

def metric_group(name: str) -> str:
    """Panel a metric goes to: the part before the first ``/`` or ``.`` (``loss/ce`` → ``loss``)."""
    for sep in ("/", "."):
        if sep in name:
            return name.split(sep, 1)[0]
    return name


def plot_curves(history: Mapping[str, Sequence[tuple[float, float]]], path: str | os.PathLike, *,
                title: Optional[str] = None, dpi: int = DPI) -> Path:
    """Loss/metric curves, one panel per group (:func:`metric_group`), at most 3 panels a row.

    ``history`` is ``name -> [(step, value), ...]`` (a run's metric histories). Size: ``CURVE_PANEL`` per panel.
    """
    groups: dict[str, list[tuple[str, np.ndarray]]] = {}
    for name, points in history.items():
        arr = np.asarray(list(points), dtype=np.float64)
        if arr.size == 0:
            continue
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(f"history[{name!r}]: expected (step, value) pairs, got shape {arr.shape}")
        arr = arr[np.argsort(arr[:, 0], kind="stable")]
        groups.setdefault(metric_group(name), []).append((name, arr))
    if not groups:
        raise ValueError("plot_curves: history has no points")
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig = _new_figure(CURVE_PANEL[0] * cols, CURVE_PANEL[1] * rows + (0.4 if title else 0))
    for i, (group, series) in enumerate(sorted(groups.items())):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name, arr in series:
            ax.plot(arr[:, 0], arr[:, 1], marker="o" if len(arr) <= 20 else None, ms=3, lw=1.3, label=name)
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.1, top=0.88 if title else 0.92, wspace=0.3, hspace=0.5)
    return _save(fig, path, dpi)


# --------------------------------------------------------------------------- sweeps

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _sweep_axis(values: list[Any]) -> tuple[np.ndarray, list[float], list[str], bool]:
    """Values → positions in [0, 1], tick positions/labels, and whether the axis is log10 (wide positive ranges)."""
    if all(_is_number(v) for v in values):
        x = np.asarray(values, dtype=np.float64)
        lo, hi = float(x.min()), float(x.max())
        use_log = lo > 0 and hi / lo >= 100
        t = np.log10(x) if use_log else x
        tlo, thi = float(t.min()), float(t.max())
        pos = (t - tlo) / (thi - tlo) if thi > tlo else np.full_like(t, 0.5)
        if thi == tlo:
            return pos, [0.5], [f"{lo:.3g}"], False
        ticks = [0.0, 0.5, 1.0]
        labels = [f"{(10 ** (tlo + p * (thi - tlo)) if use_log else tlo + p * (thi - tlo)):.3g}" for p in ticks]
        return pos, ticks, labels, use_log
    cats = sorted({str(v) for v in values})
    slot = {c: (i / (len(cats) - 1) if len(cats) > 1 else 0.5) for i, c in enumerate(cats)}
    return np.asarray([slot[str(v)] for v in values]), list(slot.values()), cats, False


def plot_sweep(rows: Sequence[Mapping[str, Any]], params: Sequence[str], metric: str, path: str | os.PathLike,
               *, title: Optional[str] = None, dpi: int = DPI) -> Path:
    """Parallel coordinates of a hyperparameter sweep: one axis per param plus the metric.

    Each axis is normalised on its own (numbers min–max, log10 when positive and spanning ≥ 100×;
    categories evenly spaced ticks); lines are coloured by ``metric`` and the best trial is drawn
    thick. Rows missing a param or with a non-finite metric (failed trials) are left out.
    """
    if not params:
        raise ValueError("plot_sweep: need at least one param")
    if len(set(params)) != len(params) or metric in params:
        raise ValueError("plot_sweep: params must be distinct and not include the metric")
    kept = []
    for row in rows:
        if all(p in row and row[p] is not None for p in params) and _is_number(row.get(metric)) \
                and math.isfinite(float(row[metric])):
            kept.append(row)
    if not kept:
        raise ValueError(f"plot_sweep: no row has all of {list(params)} and a finite {metric!r}")
    axes = list(params) + [metric]
    positions, ticks, labels = [], [], []
    for name in axes:
        pos, tpos, tlab, is_log = _sweep_axis([r[name] for r in kept])
        positions.append(pos)
        ticks.append((tpos, tlab))
        labels.append(f"{name} (log)" if is_log else name)
    ys = np.stack(positions, axis=1)  # (trials, axes)
    values = np.asarray([float(r[metric]) for r in kept])
    norm = Normalize(vmin=values.min(), vmax=values.max() if values.max() > values.min() else values.min() + 1e-9)
    cmap = colormaps["viridis"]
    fig = _new_figure(max(6.0, 1.7 * len(axes) + 2.0), SWEEP_HEIGHT)
    ax = fig.add_subplot(1, 1, 1)
    xs = np.arange(len(axes))
    best = int(values.argmax())
    for i in np.argsort(values):  # best trials drawn last, on top
        ax.plot(xs, ys[i], color=cmap(norm(values[i])), lw=3.0 if i == best else 1.2,
                alpha=1.0 if i == best else 0.75, zorder=3 if i == best else 2)
    for j, (tpos, tlab) in enumerate(ticks):
        ax.axvline(j, color="0.3", lw=0.8, zorder=1)
        for p, lab in zip(tpos, tlab):
            ax.text(j + 0.04, p, lab, fontsize=7, va="center", ha="left",
                    bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7}, zorder=4)
    ax.set_xticks(xs, labels, fontsize=8, rotation=15)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(axes) - 0.6)
    ax.set_ylim(-0.05, 1.05)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=metric, fraction=0.04, pad=0.02)
    ax.set_title(title or f"sweep: {len(kept)} trials, best {metric} = {values[best]:.4g}", fontsize=9)
    return _save(fig, path, dpi)


# --------------------------------------------------------------------------- ranked results (visrank)

RANK_BORDER = {True: (0.13, 0.70, 0.20), False: (0.85, 0.15, 0.15)}  # green = same identity, red = wrong


def plot_ranked(rows: Sequence[tuple[Any, str, Sequence[tuple[Any, bool, str]]]], path: str | os.PathLike, *,
                title: Optional[str] = None, dpi: int = DPI) -> Path:
    """Ranked results as torchreid's ``visrank`` draws them: one row per query, the query frame, then its
    top-k gallery tracklets (a frame each) framed green (same identity) or red (wrong).

    Args:
        rows: ``(query frame (H, W, 3) uint8, query label, [(gallery frame, correct, label), ...])``.
        path: PNG to write.
        title: figure title.
        dpi: resolution.
    """
    if not rows:
        raise ValueError("rows: need at least one query")
    k = max(len(r[2]) for r in rows)
    if k == 0:
        raise ValueError("rows: every query needs at least one ranked gallery entry")
    h, w = _array(rows[0][0], "query frame").shape[:2]
    cell_w = 1.05 * max(0.6, 1.6 * w / h)
    fig = _new_figure(cell_w * (k + 1) + 0.4, 1.9 * len(rows) + (0.4 if title else 0.1))
    grid = fig.add_gridspec(len(rows), k + 1, wspace=0.08, hspace=0.35, left=0.01, right=0.99,
                            top=0.9 if title else 0.97, bottom=0.02)
    for r, (qframe, qlabel, ranked) in enumerate(rows):
        ax = fig.add_subplot(grid[r, 0])
        ax.imshow(_array(qframe, "query frame"))
        ax.set_title(qlabel, fontsize=7)
        ax.set_xticks([]), ax.set_yticks([])
        for side in ax.spines.values():
            side.set_color("black"), side.set_linewidth(2)
        for c, (frame, correct, label) in enumerate(ranked):
            ax = fig.add_subplot(grid[r, c + 1])
            ax.imshow(_array(frame, "gallery frame"))
            ax.set_title(f"{c + 1}: {label}", fontsize=6, color=RANK_BORDER[bool(correct)])
            ax.set_xticks([]), ax.set_yticks([])
            for side in ax.spines.values():
                side.set_color(RANK_BORDER[bool(correct)]), side.set_linewidth(4)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi)
