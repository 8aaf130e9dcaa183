"""Busy processes beside a benchmark: does sharing the host's cores slow the host-bound training step?

End to end, every op of the training thread ran 20-40 % slower than in the model step alone on an
H100 host (benchmarks/RESULTS.md row 51), with four loader workers busy beside it. Here
``bench_train.py --busy-procs`` runs the model step with processes doing a loader worker's kind of
work (gathers and copies over arrays of tens of MB, no GPU) and ``--busy-cpus`` pins them, so the
same step can be timed with and without them, on the training thread's cores or off them.
"""

from __future__ import annotations

import multiprocessing
import os
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import numpy as np


def _work(stop: "multiprocessing.synchronize.Event", cpus: Optional[Sequence[int]]) -> None:
    """Gathers and copies over 16 MB arrays until ``stop`` (a worker's kind of load)."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    rng = np.random.default_rng(os.getpid())
    table = rng.integers(0, 1 << 30, size=1 << 21)
    index = rng.integers(0, table.size, size=1 << 20)
    out = np.empty(index.size, dtype=table.dtype)
    while not stop.is_set():
        np.take(table, index, out=out)
        table[:out.size] = out


@contextmanager
def busy_processes(count: int, cpus: Optional[Sequence[int]] = None) -> Iterator[None]:
    """``count`` busy processes (forked: they never touch CUDA) for the duration of the block."""
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    workers = [context.Process(target=_work, args=(stop, cpus), daemon=True) for _ in range(count)]
    for worker in workers:
        worker.start()
    try:
        yield
    finally:
        stop.set()
        for worker in workers:
            worker.join()
