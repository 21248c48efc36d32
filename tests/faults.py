"""Fault injection for tests, outside the production loop: a wrapper around
``pipeline.worker.train_loop_per_worker`` whose last rank dies right after a given epoch's checkpoint
report, once (not after a restore).

In-process (pytest), ``use_failing_loop(monkeypatch, epoch)`` makes ``pipeline.train.main`` build its
trainer with the wrapper. From a shell or ``ray job submit``::

    python tests/faults.py --fail-at-epoch 2 [pipeline.train arguments ...]
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable


def failing_loop(fail_at_epoch: int, delay_s: float = 5.0) -> Callable[[dict[str, Any]], None]:
    """``train_loop_per_worker`` in which the last rank exits (``os._exit(1)``) right after reporting
    ``checkpoint_epoch_<fail_at_epoch>``, unless Ray restored a checkpoint for this attempt.

    Args:
        fail_at_epoch: the epoch (1-based) whose checkpoint report is followed by the failure.
        delay_s: wait before dying, so rank 0 can send that epoch's metrics to MLflow first.
    """
    def loop(loop_config: dict[str, Any]) -> None:
        import logging

        import ray.train

        from pipeline import worker

        ctx = ray.train.get_context()
        doomed = ray.train.get_checkpoint() is None and ctx.get_world_rank() == ctx.get_world_size() - 1
        report = ray.train.report

        def report_then_die(metrics, *args, **kwargs):
            out = report(metrics, *args, **kwargs)
            if doomed and kwargs.get("checkpoint_dir_name") == f"checkpoint_epoch_{fail_at_epoch:04d}":
                logging.getLogger("tests.faults").warning(
                    "injected failure: rank %d exits after epoch %d's checkpoint", ctx.get_world_rank(), fail_at_epoch)
                time.sleep(delay_s)
                os._exit(1)
            return out

        ray.train.report = report_then_die
        try:
            worker.train_loop_per_worker(loop_config)
        finally:
            ray.train.report = report

    return loop


def nan_loss_loop(at_step: int) -> Callable[[dict[str, Any]], None]:
    """``train_loop_per_worker`` whose loss term ``ce`` turns NaN at global step ``at_step`` (after the
    real step), on every rank: what a diverging run looks like to the loop."""
    def loop(loop_config: dict[str, Any]) -> None:
        from pipeline import epoch, worker

        real = epoch.train_step

        def step(engine, batch, cfg, dtype, device):
            losses = real(engine, batch, cfg, dtype, device)
            if int(engine.global_steps) == at_step:
                losses = {**losses, "ce": losses["ce"] * float("nan")}
            return losses

        epoch.train_step = step
        try:
            worker.train_loop_per_worker(loop_config)
        finally:
            epoch.train_step = real

    return loop


def eval_failure_loop(message: str = "injected: gallery shard unreadable") -> Callable[[dict[str, Any]], None]:
    """``train_loop_per_worker`` whose every evaluation raises ``RuntimeError(message)`` on every rank."""
    def loop(loop_config: dict[str, Any]) -> None:
        from pipeline import distributed_eval, worker

        real = distributed_eval.evaluate

        def evaluate(*args, **kwargs):
            raise RuntimeError(message)

        distributed_eval.evaluate = evaluate
        try:
            worker.train_loop_per_worker(loop_config)
        finally:
            distributed_eval.evaluate = real

    return loop


def use_loop(monkeypatch, loop: Callable[[dict[str, Any]], None]) -> None:
    """Make ``pipeline.train``'s trainer run ``loop`` (pytest ``monkeypatch``)."""
    from pipeline import worker

    _by_value()
    monkeypatch.setattr(worker, "train_loop_per_worker", loop)


def _by_value() -> None:
    """Ray pickles the loop into its workers: ship this module by value (workers may not import tests/)."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def use_failing_loop(monkeypatch, fail_at_epoch: int, delay_s: float = 5.0) -> None:
    """Make ``pipeline.train``'s trainer run :func:`failing_loop` (pytest ``monkeypatch``)."""
    from pipeline import worker

    _by_value()
    monkeypatch.setattr(worker, "train_loop_per_worker", failing_loop(fail_at_epoch, delay_s))


def main(argv: list[str]) -> int:
    """``--fail-at-epoch N [--fail-delay-s S]`` then ``pipeline.train``'s own arguments."""
    from pipeline import train, worker

    epoch, delay = 0, 5.0
    rest = []
    it = iter(argv)
    for a in it:
        if a == "--fail-at-epoch":
            epoch = int(next(it))
        elif a == "--fail-delay-s":
            delay = float(next(it))
        else:
            rest.append(a)
    _by_value()
    worker.train_loop_per_worker = failing_loop(epoch, delay)
    summary = train.main(rest)
    return 1 if summary.get("error") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
