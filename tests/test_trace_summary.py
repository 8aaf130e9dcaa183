"""benchmarks/trace_summary.py: the per-step figures of a small timeline, and the union of spans
against a count of covered points."""

import gzip
import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from trace_summary import load_events, summarize, union_length  # noqa: E402


def _event(name: str, cat: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": 0, "tid": 0}


TRACE = [
    _event("aten::mm", "cpu_op", 0, 100),  # host ops are outside the device's window
    _event("aten::addmm", "cpu_op", 20, 30),  # inside the first: thread 0 in ops 0-100
    dict(_event("aten::add", "cpu_op", 90, 20), tid=7),
    _event("gemm", "kernel", 10, 10),
    _event("gemm", "kernel", 15, 10),  # overlaps the first on another stream: busy 10-25
    _event("ncclDevKernel_SendRecv", "kernel", 30, 10),
    _event("Memcpy HtoD", "gpu_memcpy", 50, 5),
    _event("cudaStreamSynchronize", "cuda_runtime", 60, 7),
    _event("cudaLaunchKernel", "cuda_runtime", 70, 2),
    {"ph": "i", "name": "marker", "ts": 5},  # not a complete event
]


def test_per_step_figures_of_a_small_timeline(tmp_path):
    path = tmp_path / "rank0.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump({"traceEvents": TRACE}, handle)
    summary = summarize(load_events(path), steps=5, top=2)
    # Window 10-55; busy: 10-25, 30-40, 50-55.
    assert summary["window_us"] == pytest.approx(45 / 5)
    assert summary["busy_us"] == pytest.approx(30 / 5)
    assert summary["collectives_us"] == pytest.approx(10 / 5)
    assert summary["idle_us"] == pytest.approx(15 / 5)
    assert summary["host_waits_us"] == pytest.approx(7 / 5)
    assert summary["threads"] == [("0", 100 / 5), ("7", 20 / 5)]
    assert summary["top_kernels"] == [("gemm", 2, 4.0), ("ncclDevKernel_SendRecv", 1, 2.0)]


def test_a_timeline_without_device_events_is_refused(tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps([_event("aten::mm", "cpu_op", 0, 100)]))
    with pytest.raises(ValueError, match="no device events"):
        summarize(load_events(path), steps=1)
    with pytest.raises(ValueError, match="positive"):
        summarize(TRACE, steps=0)


def test_union_length_counts_every_covered_point_once():
    rng = random.Random(0)
    for _ in range(50):
        spans = [(a, a + rng.randint(0, 8)) for a in (rng.randint(0, 40) for _ in range(rng.randint(0, 12)))]
        covered = {t for start, end in spans for t in range(start, end)}
        assert union_length(spans) == len(covered)
