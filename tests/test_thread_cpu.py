"""benchmarks/thread_cpu.py: each thread's CPU time by name, from the scheduler's nanoseconds or,
where the kernel keeps none, the clock ticks of /proc's stat line."""

import os
import sys
import threading
import time

import pytest

import tiny_run

sys.path.insert(0, str(tiny_run.ROOT / "benchmarks"))
import thread_cpu  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")


def test_cpu_goes_to_the_thread_that_spent_it_by_its_name():
    """A thread that spins ~0.3 s of CPU and one that sleeps as long, between start and stop."""
    by_thread = thread_cpu.CpuByThread()
    go, done = threading.Event(), threading.Event()

    def spin() -> None:
        go.wait()
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass
        done.wait()

    def sleep() -> None:
        go.wait()
        done.wait()

    threads = [threading.Thread(target=spin, name="spinner"), threading.Thread(target=sleep, name="sleeper")]
    for thread in threads:
        thread.start()
    by_thread.start()
    go.set()
    time.sleep(0.5)
    seconds = by_thread.stop()
    done.set()
    for thread in threads:
        thread.join()
    assert seconds["spinner"] >= 0.25, seconds
    assert seconds["sleeper"] < 0.05, seconds
    assert "MainThread" in seconds, seconds


def test_the_stat_lines_ticks_where_the_kernel_keeps_no_nanoseconds(tmp_path, monkeypatch):
    """Thread 7 has schedstat (ns); thread 8 only stat, its name with a space and a parenthesis."""
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "schedstat").write_text("2500000000 100 3\n")
    (tmp_path / "8").mkdir()
    fields = ["S"] + ["0"] * 10 + ["150", "50"] + ["0"] * 30  # utime, stime: fields 14 and 15
    (tmp_path / "8" / "stat").write_text("8 (odd) name) " + " ".join(fields) + "\n")
    monkeypatch.setattr(thread_cpu, "_TASKS", str(tmp_path))
    monkeypatch.setattr(thread_cpu, "_TICKS_PER_S", 100)
    assert thread_cpu.snapshot() == {"7": 2.5, "8": 2.0}
