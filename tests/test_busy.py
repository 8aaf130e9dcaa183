"""benchmarks/busy.py: the busy processes (or threads) run during the block, on the CPUs given, and end with it."""

import multiprocessing
import os
import sys
import threading
import time

import pytest
import tiny_run
import torch

sys.path.insert(0, str(tiny_run.ROOT / "benchmarks"))
from busy import KINDS, THREAD_KINDS, busy_processes, busy_work, parse_busy  # noqa: E402


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_busy_processes_work_where_told_and_stop(kind):
    cpu = max(os.sched_getaffinity(0))
    with busy_processes(2, [cpu], kind):
        children = multiprocessing.active_children()
        assert len(children) == 2
        time.sleep(0.5)
        assert all(os.sched_getaffinity(c.pid) == {cpu} for c in children)
        assert sum(_cpu_seconds(c.pid) for c in children) > 0.1
    assert not multiprocessing.active_children()


def test_busy_entries_parse_or_say_what_they_should_be():
    assert parse_busy("8") == (8, "gather")
    assert parse_busy("4:spin") == (4, "spin")
    assert parse_busy("1:ops") == (1, "ops")
    for bad in ("x", "4:sleep", "-1", ""):
        with pytest.raises(ValueError, match="N or N:KIND"):
            parse_busy(bad)


@pytest.mark.parametrize("kind", sorted(THREAD_KINDS))
def test_busy_threads_work_in_this_process_and_stop(kind):
    if kind == "replay" and not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a GPU")
    before = threading.active_count()
    start = time.process_time()
    with busy_work(2, None, kind):
        assert threading.active_count() == before + 2 and not multiprocessing.active_children()
        time.sleep(0.5)
    assert time.process_time() - start > 0.05  # they worked, in this process
    assert threading.active_count() == before


def test_busy_threads_cannot_be_placed_on_cpus():
    with pytest.raises(ValueError, match="runs threads in this process"):
        busy_work(1, [0], "ops")
