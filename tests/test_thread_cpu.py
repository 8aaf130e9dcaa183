"""benchmarks/thread_cpu.py: each thread's use of the host by name (CPU time from the scheduler's
nanoseconds or, where the kernel keeps none, the clock ticks of /proc's stat line; its sleeps,
preemptions and time ready without a core)."""

import os
import sys
import threading
import time

import pytest

import tiny_run

sys.path.insert(0, str(tiny_run.ROOT / "benchmarks"))
import thread_cpu  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")

NAPS = 50


def test_cpu_and_sleeps_go_to_the_thread_that_had_them_by_its_name():
    """A thread that spins ~0.3 s of CPU and one that takes 50 naps of 2 ms, between start and stop."""
    by_thread = thread_cpu.UseByThread()
    go, done = threading.Event(), threading.Event()

    def spin() -> None:
        go.wait()
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass
        done.wait()

    def nap() -> None:
        go.wait()
        for _ in range(NAPS):
            time.sleep(0.002)
        done.wait()

    threads = [threading.Thread(target=spin, name="spinner"), threading.Thread(target=nap, name="napper")]
    for thread in threads:
        thread.start()
    by_thread.start()
    go.set()
    time.sleep(0.5)
    uses = by_thread.stop()
    done.set()
    for thread in threads:
        thread.join()
    assert uses["spinner"].cpu >= 0.25, uses
    assert uses["napper"].cpu < 0.05, uses
    assert uses["napper"].sleeps >= NAPS, uses
    # (The spinner sleeps too, as often as the napper takes the GIL from it: no bound on its sleeps.)
    assert all(use.runnable >= 0 and use.preemptions >= 0 for use in uses.values()), uses
    assert "MainThread" in uses, uses


def _status(voluntary: int, involuntary: int) -> str:
    return f"Name:\tx\nState:\tS (sleeping)\nvoluntary_ctxt_switches:\t{voluntary}\nnonvoluntary_ctxt_switches:\t{involuntary}\n"


def test_the_stat_lines_ticks_where_the_kernel_keeps_no_nanoseconds(tmp_path, monkeypatch):
    """Thread 7 has schedstat (ns on a core, ns on the run queue); thread 8 only stat, its name with a
    space and a parenthesis."""
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "schedstat").write_text("2500000000 100000000 3\n")
    (tmp_path / "7" / "status").write_text(_status(12, 4))
    (tmp_path / "8").mkdir()
    fields = ["S"] + ["0"] * 10 + ["150", "50"] + ["0"] * 30  # utime, stime: fields 14 and 15
    (tmp_path / "8" / "stat").write_text("8 (odd) name) " + " ".join(fields) + "\n")
    (tmp_path / "8" / "status").write_text(_status(5, 0))
    monkeypatch.setattr(thread_cpu, "_TASKS", str(tmp_path))
    monkeypatch.setattr(thread_cpu, "_TICKS_PER_S", 100)
    assert thread_cpu.snapshot() == {"7": thread_cpu.ThreadUse(2.5, 0.1, 12, 4),
                                     "8": thread_cpu.ThreadUse(2.0, 0.0, 5, 0)}


def test_uses_subtract_and_add_field_by_field():
    later, earlier = thread_cpu.ThreadUse(2.0, 0.5, 10, 3), thread_cpu.ThreadUse(0.5, 0.25, 4, 1)
    assert later - earlier == thread_cpu.ThreadUse(1.5, 0.25, 6, 2)
    assert earlier + earlier == thread_cpu.ThreadUse(1.0, 0.5, 8, 2)
