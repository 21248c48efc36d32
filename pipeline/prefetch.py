"""Cross-epoch loader prefetch for the training loop.

:func:`epoch_batches` hands out each epoch's batches and starts the next epoch's loader during this
epoch's last step, so its worker start-up and first shard reads overlap the last step, evaluation and
checkpointing instead of delaying the next epoch's first step.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator, Optional

from torch.utils.data import DataLoader

log = logging.getLogger("pipeline.prefetch")


def start_batches(loader: Iterable[dict]) -> tuple[Iterator[dict], Optional[Iterator]]:
    """``iter(loader)``, returning ``(batches, started)``: ``started`` is the running DataLoader
    iterator (its worker processes forked, reading shards already) or None for other iterables.
    The stream's loaders start their DataLoader in ``iter()``; ``stop_batches`` stops it."""
    it = iter(loader)
    if isinstance(loader, DataLoader):
        return it, it
    return it, getattr(it, "dataloader_iter", None)


def stop_batches(batches: Iterator) -> None:
    """Stop a started loader's worker processes now: the stream's iterators and generators have
    ``close()``. A plain DataLoader iterator has no public stop; its workers stop when the last
    reference to it goes (``epoch_batches`` drops its references as it closes)."""
    stop = getattr(batches, "close", None)
    if stop is not None:
        stop()


def epoch_batches(make_loader: Callable[[int], Iterable[dict]], start_epoch: int, end_epoch: int, *,
                  on_start: Optional[Callable[[int, Optional[Iterator]], None]] = None
                  ) -> Iterator[tuple[int, Iterator[dict]]]:
    """``(epoch, batches)`` for ``start_epoch <= epoch < end_epoch``, ``batches`` being exactly
    those of ``make_loader(epoch)``, with each next epoch's loader started (``start_batches``)
    just before this epoch's last batch is handed out (``len(loader)``; at its end if it has no
    length). Its worker start-up and initial pool read then overlap the last step, evaluation
    and checkpointing instead of delaying the next epoch's first step. Nothing is started for
    ``end_epoch``. Close the generator (``contextlib.closing``) to stop loaders started ahead or
    in use, e.g. on an exception. ``on_start(epoch, started)`` is called for every start, with
    the running DataLoader iterator (None if the loader has none).

    A loader with ``persistent`` true (``train_loader(persistent=True)``) is made once, for
    ``start_epoch``: each later epoch is its next ``iter()``, which sets its worker processes on
    that epoch at the same point (they are forked once and stopped with its ``close()``)."""
    ahead: dict[int, tuple[Iterator, Optional[int]]] = {}
    kept: Optional[Any] = None  # the persistent loader

    def start(epoch: int) -> None:
        nonlocal kept
        loader = kept if kept is not None else make_loader(epoch)
        if getattr(loader, "persistent", False):
            kept = loader
        try:
            n = len(loader)
        except TypeError:
            n = None
        it, started = start_batches(loader)
        ahead[epoch] = (it, n)
        if on_start is not None:
            on_start(epoch, started)

    def start_ahead(epoch: int) -> None:
        if epoch < end_epoch and epoch not in ahead:
            try:
                start(epoch)
            except Exception as exc:  # e.g. a storage hiccup: the epoch's own start retries it
                log.warning("could not start epoch %d's loader ahead: %s", epoch, exc)

    def batches(epoch: int, it: Iterator, n: Optional[int]) -> Iterator[dict]:
        handed = 0
        try:
            for batch in it:
                handed += 1
                if handed == n:
                    start_ahead(epoch + 1)
                yield batch
            start_ahead(epoch + 1)  # no len(), or fewer batches than it said
        finally:
            stop_batches(it)

    current: Optional[Iterator] = None
    try:
        for epoch in range(start_epoch, end_epoch):
            if epoch not in ahead:
                start(epoch)
            current = batches(epoch, *ahead.pop(epoch))
            yield epoch, current
    finally:
        if current is not None:
            current.close()
        for it, _ in ahead.values():
            stop_batches(it)
        ahead.clear()
        if kept is not None:
            kept.close()
