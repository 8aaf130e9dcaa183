"""Busy processes beside a benchmark: does sharing the host's cores slow the host-bound training step?

End to end, every op of the training thread ran 20-40 % slower than in the model step alone on an
H100 host (benchmarks/RESULTS.md row 51), with four loader workers busy beside it. Here
``bench_train.py --busy-procs`` runs the model step with processes doing a loader worker's kind of
work (gathers and copies over arrays of tens of MB, no GPU) and ``--busy-cpus`` pins them, so the
same step can be timed with and without them, on the training thread's cores or off them.

Two kinds of work tell the causes apart: ``gather`` streams through memory (shares the last-level
cache and memory bandwidth with the training thread), ``spin`` is integer arithmetic in registers
(shares only the cores, their clock and any hyper-thread siblings the host hides from a VM). Where
``spin`` slows the step too, sharing cores is a cause, which keeping busy processes off the training
thread's cores (``--busy-cpus``) helps and leaner memory access does not.
"""

from __future__ import annotations

import multiprocessing
import os
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np


def _gather(stop: "multiprocessing.synchronize.Event") -> None:
    """Gathers and copies over 16 MB arrays until ``stop`` (a worker's kind of load)."""
    rng = np.random.default_rng(os.getpid())
    table = rng.integers(0, 1 << 30, size=1 << 21)
    index = rng.integers(0, table.size, size=1 << 20)
    out = np.empty(index.size, dtype=table.dtype)
    while not stop.is_set():
        np.take(table, index, out=out)
        table[:out.size] = out


def _spin(stop: "multiprocessing.synchronize.Event") -> None:
    """Integer arithmetic on a few locals until ``stop``: a busy core that touches no memory."""
    x = os.getpid()
    while not stop.is_set():
        for _ in range(100_000):
            x = (x * 1103515245 + 12345) & 0xFFFFFFFF


KINDS: Dict[str, Callable[["multiprocessing.synchronize.Event"], None]] = {"gather": _gather, "spin": _spin}


def parse_busy(entry: str) -> Tuple[int, str]:
    """A ``--busy-procs`` entry, ``N`` or ``N:KIND`` (KIND in KINDS, default gather) -> (N, KIND)."""
    count, _, kind = entry.partition(":")
    kind = kind or "gather"
    if not count.isdigit() or kind not in KINDS:
        raise ValueError(f"a busy entry is N or N:KIND with KIND one of {sorted(KINDS)}, not {entry!r}")
    return int(count), kind


def _work(kind: str, stop: "multiprocessing.synchronize.Event", cpus: Optional[Sequence[int]]) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    KINDS[kind](stop)


@contextmanager
def busy_processes(count: int, cpus: Optional[Sequence[int]] = None, kind: str = "gather") -> Iterator[None]:
    """``count`` busy processes of ``kind`` (forked: they never touch CUDA) for the duration of the block."""
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    workers = [context.Process(target=_work, args=(kind, stop, cpus), daemon=True) for _ in range(count)]
    for worker in workers:
        worker.start()
    try:
        yield
    finally:
        stop.set()
        for worker in workers:
            worker.join()
