"""Intra-op threads for CPU-bound evaluation: as many as there are CPUs free for this call.

torch's default is one thread per CPU of the machine. Its OpenMP workers wait for each other at
every parallel region, so when other processes hold the CPUs (loader processes next to a training
worker, another job on a shared node) a thread that lost its CPU stalls all the others, and a call
can run many times slower than on one thread (figures in docs/performance.md). ``choose_threads``
counts the CPUs this process may use (affinity mask, cgroup quota, ``OMP_NUM_THREADS``, which Ray
sets to a task's CPUs) minus the runnable threads of other processes at the moment of the call.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator, Optional

import torch


def usable_cpus(omp: bool = True) -> int:
    """CPUs this process may run on: the affinity mask, capped by a cgroup CPU quota and by
    ``OMP_NUM_THREADS`` when set (Ray sets it to the CPUs it gave the task).

    Args:
        omp (bool): apply the ``OMP_NUM_THREADS`` cap (False: the machine's CPUs for this process).
    """
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    cap = os.environ.get("OMP_NUM_THREADS", "") if omp else ""
    if cap.isdigit() and int(cap) > 0:
        n = min(n, int(cap))
    return max(1, n)


def _runnable_others() -> int:
    """Runnable threads on the machine now (``procs_running``), less this process's own."""
    with open("/proc/stat") as f:
        running = next(int(line.split()[1]) for line in f if line.startswith("procs_running"))
    own = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                own += f.read().rpartition(")")[2].split()[0] == "R"
        except (OSError, IndexError):
            pass
    return max(0, running - max(own, 1))


def idle_cpus(samples: int = 5, interval_s: float = 0.002) -> int:
    """Usable CPUs not taken by other processes' runnable threads (median of a few samples over
    ~10 ms), at least 1. Without ``/proc`` (not Linux): the usable CPUs."""
    n = usable_cpus()
    try:
        busy = []
        for i in range(samples):
            if i:
                time.sleep(interval_s)
            busy.append(_runnable_others())
    except (OSError, StopIteration, ValueError):
        return n
    busy.sort()
    return max(1, n - busy[len(busy) // 2])


def choose_threads(num_threads: Optional[int] = None) -> int:
    """``num_threads`` when given (> 0), else the CPUs idle right now (:func:`idle_cpus`)."""
    if num_threads is not None and num_threads > 0:
        return int(num_threads)
    return idle_cpus()


@contextlib.contextmanager
def intra_op_threads(num_threads: Optional[int] = None) -> Iterator[int]:
    """Run the block with ``choose_threads(num_threads)`` torch intra-op threads, then put the
    previous setting back. Yields the number used.

    Args:
        num_threads (int or None): threads to use; None chooses from the CPUs idle now.
    """
    n = choose_threads(num_threads)
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if n != before:
            torch.set_num_threads(before)
