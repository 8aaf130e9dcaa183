"""Where a rank's profiled steps go on its GPU, read from bench_train's timelines (``--trace-dir``).

A timeline holds what torch.profiler's op tables cannot: how long the GPU idles between kernels
(its host not keeping up), and how long each collective's kernels run. A collective's kernel starts
when its rank gets there and ends once every rank has, so on several GPUs its time beyond the
transfer is that rank waiting for the others. For each trace (one rank's ``--profile-steps`` steps):
the profiled window per step, the GPU's busy time in it (the union of its kernels and copies, over
every stream), the collectives' share of that, the idle rest, the host's waits for the device
(synchronising CUDA calls), each host thread's time in ops, and the kernels by total time.

    python benchmarks/trace_summary.py --steps 20 $OUT/traces/*/*.json.gz

The profiler slows the host (about 4 ms a step on one H100, benchmarks/RESULTS.md row 104), so the
idle time is larger than in unprofiled steps; the kernels' own times are not.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

# Kernels of collectives: NCCL's (``ncclDevKernel_...``, ``ncclKernel_...``).
COLLECTIVE_PREFIX = "nccl"
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
# CUDA runtime and driver calls in which the host waits for the device.
HOST_WAITS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy",
              "cuStreamSynchronize", "cuEventSynchronize", "cuCtxSynchronize")


def load_events(path: Path) -> List[dict]:
    """The complete ("X") events of a Chrome trace (gzipped where the name ends in ".gz")."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def union_length(spans: Iterable[Tuple[float, float]]) -> float:
    """Total length covered by ``(start, end)`` spans, overlaps counted once."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def summarize(events: List[dict], steps: int, top: int = 8) -> Dict[str, object]:
    """Per-step figures (microseconds) of one rank's ``steps`` profiled steps: the window from the
    first device event's start to the last's end; the device busy (``busy``), in collectives
    (``collectives``: their kernels' union) and idle; the host's waits for the device
    (``host_waits``); each host thread's time in ops (``threads``: thread id -> the union of its
    ops' spans, busiest first); and the ``top`` kernels by total time (name, calls, microseconds a
    step)."""
    if steps < 1:
        raise ValueError(f"steps must be positive, not {steps}")
    device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES]
    if not device:
        raise ValueError("the trace has no device events: was it profiled on a GPU with CUDA activity?")
    spans = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in device]
    window = max(end for _, end in spans) - min(start for start, _ in spans)
    busy = union_length(spans)
    collectives = union_length(span for span, e in zip(spans, device)
                               if e["name"].lower().startswith(COLLECTIVE_PREFIX))
    waits = sum(float(e["dur"]) for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")
                and e["name"] in HOST_WAITS)
    ops: Dict[str, List[Tuple[float, float]]] = defaultdict(list)
    for e in events:
        if e.get("cat") == "cpu_op":
            ops[str(e.get("tid"))].append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    threads = sorted(((tid, union_length(spans) / steps) for tid, spans in ops.items()), key=lambda t: -t[1])
    kernels: Dict[str, List[float]] = defaultdict(list)
    for e in device:
        kernels[e["name"]].append(float(e["dur"]))
    ranked = sorted(kernels.items(), key=lambda item: -sum(item[1]))[:top]
    return {
        "steps": steps,
        "window_us": window / steps,
        "busy_us": busy / steps,
        "collectives_us": collectives / steps,
        "idle_us": (window - busy) / steps,
        "host_waits_us": waits / steps,
        "threads": threads,
        "top_kernels": [(name, len(durations), sum(durations) / steps) for name, durations in ranked],
    }


def report(name: str, summary: Dict[str, object]) -> str:
    """``summary`` as lines of text under ``name``."""
    lines = [f"{name}: {summary['steps']} steps, per step: window {summary['window_us']:,.0f} us, "
             f"GPU busy {summary['busy_us']:,.0f} (collectives {summary['collectives_us']:,.0f}), "
             f"idle {summary['idle_us']:,.0f}; host waits for the GPU {summary['host_waits_us']:,.0f}; "
             "host threads in ops " + ", ".join(f"{tid}: {us:,.0f}" for tid, us in summary["threads"][:4])]
    for kernel, calls, per_step in summary["top_kernels"]:
        lines.append(f"    {per_step:9,.1f} us/step  {calls:6d} calls  {kernel[:100]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("traces", nargs="+", type=Path, help="Chrome traces (.json or .json.gz)")
    parser.add_argument("--steps", type=int, required=True, help="steps each trace profiled (--profile-steps)")
    parser.add_argument("--top", type=int, default=8, help="kernels listed, by total time")
    parser.add_argument("--out", type=Path, default=None, help="also write the summaries as JSON here")
    args = parser.parse_args()
    summaries = {}
    for path in args.traces:
        summaries[str(path)] = summarize(load_events(path), args.steps, args.top)
        print(report(str(path), summaries[str(path)]))
    if args.out is not None:
        args.out.write_text(json.dumps(summaries, indent=2))


if __name__ == "__main__":
    main()
