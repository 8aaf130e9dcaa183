"""CPU time and scheduling of this process's threads by name, between two snapshots (Linux:
/proc/self/task).

Why: end to end, the multi-rank proxy's process spends ~4 ms of CPU a step more than one GPU's, and
not in spinning waits (benchmarks/RESULTS.md rows 138-139). The process's total cannot say which
thread: the training thread, autograd's device thread, the data path's threads (the GSU's, the
router's), or the threads of gloo, NCCL and CUDA. ``UseByThread`` takes each thread's use of the host
before and after the timed steps and names it: a Python thread by its ``threading`` name, any other
by its kernel name (PyTorch names its own, e.g. ``pt_autograd_0``).

Beside its CPU time come three figures that tell why a thread's CPU time grows (row 140: the
training thread's doubles beside the data path, on one GPU too): how often it went to sleep
(voluntary context switches: a wait for a lock another thread holds, the GIL's included, or for the
GPU under blocking sync), how often the kernel took its core away (involuntary ones), and how long
it stood ready to run without a core (the scheduler's run-queue time). More CPU with no more sleeps
and no more time without a core is slower work, not more waiting.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from typing import Dict, NamedTuple, Tuple

_TASKS = "/proc/self/task"
_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class ThreadUse(NamedTuple):
    """A thread's use of the host so far, or between two snapshots.

    Attributes:
        cpu: seconds on a core.
        runnable: seconds ready to run without a core (0 where the kernel keeps no schedstat).
        sleeps: voluntary context switches (it waited for something).
        preemptions: involuntary context switches (the kernel gave its core to another thread).
    """

    cpu: float
    runnable: float = 0.0
    sleeps: int = 0
    preemptions: int = 0

    def __sub__(self, other: "ThreadUse") -> "ThreadUse":
        return ThreadUse(*(mine - theirs for mine, theirs in zip(self, other)))

    def __add__(self, other: "ThreadUse") -> "ThreadUse":
        return ThreadUse(*(mine + theirs for mine, theirs in zip(self, other)))


_NONE = ThreadUse(0.0)


def _switches(tid: str) -> Tuple[int, int]:
    """(voluntary, involuntary) context switches of thread ``tid`` so far ((0, 0) where its status
    names none)."""
    counts = {"voluntary_ctxt_switches": 0, "nonvoluntary_ctxt_switches": 0}
    with open(f"{_TASKS}/{tid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in counts:
                counts[key] = int(value)
    return counts["voluntary_ctxt_switches"], counts["nonvoluntary_ctxt_switches"]


def _thread_use(tid: str) -> ThreadUse:
    """Thread ``tid``'s use so far: the scheduler's nanoseconds on a core and on its run queue where
    the kernel keeps them, else user + system clock ticks (10 ms steps) and no run-queue time."""
    sleeps, preemptions = _switches(tid)
    try:
        with open(f"{_TASKS}/{tid}/schedstat") as schedstat:
            on_core, runnable = (int(field) / 1e9 for field in schedstat.read().split()[:2])
    except (OSError, ValueError):
        with open(f"{_TASKS}/{tid}/stat") as stat:
            # Fields after the name (which may hold spaces, inside parentheses): utime, stime are 12 and 13.
            fields = stat.read().rsplit(")", 1)[1].split()
        on_core, runnable = (int(fields[11]) + int(fields[12])) / _TICKS_PER_S, 0.0
    return ThreadUse(on_core, runnable, sleeps, preemptions)


def snapshot() -> Dict[str, ThreadUse]:
    """The use so far of every live thread of this process, by thread id (empty where /proc is absent)."""
    if not os.path.isdir(_TASKS):
        return {}
    uses = {}
    for tid in os.listdir(_TASKS):
        try:
            uses[tid] = _thread_use(tid)
        except OSError:  # the thread ended meanwhile
            continue
    return uses


def _name(tid: str, python: Dict[str, str]) -> str:
    """Thread ``tid``'s name: its ``threading`` name (``python``: by native id) for a Python thread,
    else the kernel's ("ended" if it is gone)."""
    if tid in python:
        return python[tid]
    try:
        with open(f"{_TASKS}/{tid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return "ended"


class UseByThread:
    """The use (``ThreadUse``) the threads alive at ``stop()`` made of the host since ``start()``,
    summed by thread name (threads that ended meanwhile are not counted: their last reading is gone
    with them)."""

    def __init__(self) -> None:
        self._before: Dict[str, ThreadUse] = {}

    def start(self) -> None:
        self._before = snapshot()

    def stop(self) -> Dict[str, ThreadUse]:
        after = snapshot()
        python = {str(thread.native_id): thread.name for thread in threading.enumerate() if thread.native_id}
        uses: Dict[str, ThreadUse] = defaultdict(lambda: _NONE)
        for tid, total in after.items():
            name = _name(tid, python)
            uses[name] = uses[name] + (total - self._before.get(tid, _NONE))
        return dict(uses)
