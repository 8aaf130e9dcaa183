"""CPU time of this process's threads by name, between two snapshots (Linux: /proc/self/task).

Why: end to end, the multi-rank proxy's process spends ~4 ms of CPU a step more than one GPU's, and
not in spinning waits (benchmarks/RESULTS.md rows 138-139). The process's total cannot say which
thread: the training thread, autograd's device thread, the data path's threads (the GSU's, the
router's), or the threads of gloo, NCCL and CUDA. ``CpuByThread`` takes each thread's CPU time before
and after the timed steps and names it: a Python thread by its ``threading`` name, any other by its
kernel name (PyTorch names its own, e.g. ``pt_autograd_0``).
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from typing import Dict

_TASKS = "/proc/self/task"
_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _thread_seconds(tid: str) -> float:
    """CPU seconds of thread ``tid`` so far: the scheduler's nanoseconds where the kernel keeps them,
    else user + system clock ticks (10 ms steps)."""
    try:
        with open(f"{_TASKS}/{tid}/schedstat") as schedstat:
            return int(schedstat.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        with open(f"{_TASKS}/{tid}/stat") as stat:
            # Fields after the name (which may hold spaces, inside parentheses): utime, stime are 12 and 13.
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def snapshot() -> Dict[str, float]:
    """CPU seconds of every live thread of this process, by thread id (empty where /proc is absent)."""
    if not os.path.isdir(_TASKS):
        return {}
    seconds = {}
    for tid in os.listdir(_TASKS):
        try:
            seconds[tid] = _thread_seconds(tid)
        except OSError:  # the thread ended meanwhile
            continue
    return seconds


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


class CpuByThread:
    """CPU seconds the threads alive at ``stop()`` spent since ``start()``, summed by thread name
    (threads that ended meanwhile are not counted: their last reading is gone with them)."""

    def __init__(self) -> None:
        self._before: Dict[str, float] = {}

    def start(self) -> None:
        self._before = snapshot()

    def stop(self) -> Dict[str, float]:
        after = snapshot()
        python = {str(thread.native_id): thread.name for thread in threading.enumerate() if thread.native_id}
        seconds: Dict[str, float] = defaultdict(float)
        for tid, total in after.items():
            seconds[_name(tid, python)] += total - self._before.get(tid, 0.0)
        return dict(seconds)
