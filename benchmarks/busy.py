"""Busy processes (or threads) beside a benchmark: what slows the host-bound training step?

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

Two more kinds run as threads inside the training process instead, for what slows the training
thread beside the data path's thread there (benchmarks/RESULTS.md rows 115-117): ``ops``, small CPU
tensor ops, each of which lets the GIL go (the thread's GIL hand-overs, no CUDA call), and
``replay``, a CUDA graph of many small kernels replayed on a stream of its own (calls into the CUDA
driver, one GIL hand-over a replay). Both work in bursts about a data path's batch long, with a
millisecond's pause between them.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from contextlib import contextmanager
from typing import Callable, ContextManager, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from muse_torchrec.model.cuda_graphs import CAPTURE_LOCK

# A thread's burst: about the ops (or CUDA calls) of the data path's thread for one batch, then a pause.
_BURST_OPS = 75
_BURST_REPLAYS = 10
_PAUSE_S = 0.001


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


def _ops(stop: threading.Event) -> None:
    """Bursts of small CPU tensor ops until ``stop``: each lets the GIL go, none calls CUDA."""
    x = torch.zeros(16)
    while not stop.is_set():
        for _ in range(_BURST_OPS):
            torch.add(x, 1, out=x)
        time.sleep(_PAUSE_S)


def _replay(stop: threading.Event) -> None:
    """Bursts of replays of a CUDA graph of 100 small kernels, on a stream of this thread's, until
    ``stop``: CUDA driver calls with one GIL hand-over a replay. Captured and replayed holding
    ``CAPTURE_LOCK``, as the data path's thread does, so that the training thread's captures succeed."""
    x = torch.zeros(1024, device="cuda")
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with CAPTURE_LOCK, torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        for _ in range(100):
            x.add_(1)
    while not stop.is_set():
        with torch.cuda.stream(stream):  # a replay launches on the current stream
            for _ in range(_BURST_REPLAYS):
                with CAPTURE_LOCK:
                    graph.replay()
        time.sleep(_PAUSE_S)


THREAD_KINDS: Dict[str, Callable[[threading.Event], None]] = {"ops": _ops, "replay": _replay}


def parse_busy(entry: str) -> Tuple[int, str]:
    """A ``--busy-procs`` entry, ``N`` or ``N:KIND`` (KIND in KINDS or THREAD_KINDS, default gather) ->
    (N, KIND)."""
    count, _, kind = entry.partition(":")
    kind = kind or "gather"
    if not count.isdigit() or kind not in {**KINDS, **THREAD_KINDS}:
        raise ValueError(f"a busy entry is N or N:KIND with KIND one of {sorted({**KINDS, **THREAD_KINDS})}, "
                         f"not {entry!r}")
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


@contextmanager
def busy_threads(count: int, kind: str) -> Iterator[None]:
    """``count`` threads of ``kind`` (THREAD_KINDS) in this process for the duration of the block."""
    stop = threading.Event()
    threads = [threading.Thread(target=THREAD_KINDS[kind], args=(stop,), daemon=True, name=f"busy-{kind}")
               for _ in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def busy_work(count: int, cpus: Optional[Sequence[int]], kind: str) -> ContextManager[None]:
    """Busy processes (KINDS, on ``cpus``) or threads (THREAD_KINDS, which ``cpus`` cannot place)."""
    if kind in THREAD_KINDS:
        if cpus:
            raise ValueError(f"--busy-cpus places busy processes; {kind!r} runs threads in this process")
        return busy_threads(count, kind)
    return busy_processes(count, cpus, kind)
