"""benchmarks/busy.py: the busy processes run during the block, on the CPUs given, and end with it."""

import multiprocessing
import os
import sys
import time

import pytest
import tiny_run

sys.path.insert(0, str(tiny_run.ROOT / "benchmarks"))
from busy import KINDS, busy_processes, parse_busy  # noqa: E402


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
    for bad in ("x", "4:sleep", "-1", ""):
        with pytest.raises(ValueError, match="N or N:KIND"):
            parse_busy(bad)
