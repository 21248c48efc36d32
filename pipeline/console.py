"""What a training run prints: one readable line per epoch from rank 0, and quiet Ray internals.

Ray Train logs every ``ray.train.report`` call of every rank as ``Reporting training result N:
TrainingReport(...)`` (~540 characters of dict); those are dropped unless ``--verbose``. The
epoch line carries what a user watches: progress, losses, LR, throughput, data wait, ETA, and
the eval metrics of epochs that evaluated.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Mapping, Optional, TextIO

# Loggers whose INFO lines are per-report dumps (Ray Train v2's worker context).
RAY_REPORT_LOGGERS = ("ray.train.v2._internal.execution.context",)  # + the module's own logger, below


class _DropReports(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Reporting training result")


def quiet_ray_reports(verbose: bool = False) -> None:
    """In a Ray Train worker: drop Ray's per-report INFO lines unless ``verbose``.

    Args:
        verbose: keep them (``pipeline.train --verbose``).
    """
    if verbose:
        return
    loggers = [logging.getLogger(name) for name in RAY_REPORT_LOGGERS]
    try:  # Ray names this logger by its file path (getLogger(__file__)): take the object itself
        from ray.train.v2._internal.execution import context

        loggers.append(context.logger)
    except (ImportError, AttributeError):
        pass
    for logger in loggers:
        if not any(isinstance(f, _DropReports) for f in logger.filters):
            logger.addFilter(_DropReports())


def _emit(line: str, stream: Optional[TextIO]) -> None:
    # Not print(): Ray Train patches builtins.print in workers to go through its logger as well as
    # stdout, which shows every line twice on the driver.
    out = stream or sys.stdout
    out.write(line + "\n")
    out.flush()


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def epoch_line(epoch: int, total: int, metrics: Mapping[str, Any], eta_s: Optional[float]) -> str:
    """``epoch 3/600  loss 1.234 (tri 0.31 ce 0.92 reg 0.01)  lr 3.0e-04  412 clips/s  data 2%  ETA 1h02m  mAP 41.2% R1 60.1%``.

    Args:
        epoch: epochs done (1-based).
        total: epochs of the run.
        metrics: the epoch's metrics (``loss_*``, ``lr``, ``clips_per_s``, ``data_wait_s``,
            ``epoch_time_s``, and ``mAP``/``rank1``/``rr_*`` when evaluated; fractions).
        eta_s: seconds left, or None when unknown.
    """
    m = metrics
    parts = [f"epoch {epoch}/{total}"]
    if "loss_total" in m:
        terms = " ".join(f"{short} {m[key]:.3g}" for short, key in
                         (("tri", "loss_triplet"), ("ce", "loss_ce"), ("reg", "loss_reg")) if key in m)
        parts.append(f"loss {m['loss_total']:.4g}" + (f" ({terms})" if terms else ""))
    if "lr" in m:
        parts.append(f"lr {m['lr']:.1e}")
    if "clips_per_s" in m:
        parts.append(f"{m['clips_per_s']:.1f} clips/s")
    if m.get("epoch_time_s"):
        parts.append(f"data wait {100 * m.get('data_wait_s', 0.0) / m['epoch_time_s']:.0f}%")
    if eta_s is not None:
        parts.append(f"ETA {_fmt_duration(eta_s)}")
    if "mAP" in m:
        ev = f"mAP {100 * m['mAP']:.1f}% R1 {100 * m.get('rank1', float('nan')):.1f}%"
        if "rr_mAP" in m:
            ev += f" (re-ranked mAP {100 * m['rr_mAP']:.1f}% R1 {100 * m.get('rr_rank1', float('nan')):.1f}%)"
        parts.append(ev)
    return "  ".join(parts)


class EpochPrinter:
    """Prints :func:`epoch_line` after each epoch, with the ETA from the epochs run in this process."""

    def __init__(self, total: int, start_epoch: int = 0, stream: Optional[TextIO] = None) -> None:
        """Args:
            total: epochs of the run.
            start_epoch: epochs already done when this process started (a resume).
            stream: where to print (default stdout, which Ray forwards to the driver).
        """
        self.total, self.start_epoch = total, start_epoch
        self.t0 = time.perf_counter()
        self.stream = stream

    def __call__(self, epoch: int, metrics: Mapping[str, Any]) -> str:
        done = epoch - self.start_epoch
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - epoch) if done > 0 else None
        line = epoch_line(epoch, self.total, metrics, eta)
        _emit(line, self.stream)
        return line


class Progress:
    """Coarse progress for long loops (evaluation extraction over MARS' 11k tracklets): one line at
    most every ``every_s`` seconds, with count, rate and ETA; nothing for loops shorter than that."""

    def __init__(self, label: str, total: Optional[int], every_s: float = 30.0,
                 stream: Optional[TextIO] = None) -> None:
        self.label, self.total, self.every_s = label, total, every_s
        self.stream = stream
        self.t0 = self.last = time.perf_counter()
        self.n = 0

    def update(self, n: int = 1) -> Optional[str]:
        """Add ``n`` done items; returns the line when one was printed."""
        self.n += n
        now = time.perf_counter()
        if now - self.last < self.every_s:
            return None
        self.last = now
        rate = self.n / max(now - self.t0, 1e-9)
        text = f"{self.label}: {self.n}" + (f"/{self.total}" if self.total else "") + f" ({rate:.1f}/s"
        if self.total and rate > 0:
            text += f", ETA {_fmt_duration((self.total - self.n) / rate)}"
        text += ")"
        _emit(text, self.stream)
        return text
