"""What a background thread's host-to-device copy of a batch costs a host-bound training thread.

The training thread of a GPU run is bound by host time (kernel launches), while the data path moves
each batch (~20 MB at 1,000 samples with 1,000-long histories) to the device from another thread.
Here a foreground thread runs launch-bound "steps" (``--ops`` tiny kernels each) while a background
thread copies a ``--mb`` MB buffer to the device again and again, from:

- ``none``: no background thread (the foreground's own speed);
- ``pageable``: a shared-memory buffer (what the loader's slots were): CUDA stages the bytes through
  its own pinned buffers with the calling thread's CPU;
- ``registered``: the same kind of buffer page-locked in place (``cuda_driver.host_register``, as the
  loader's slots are for a GPU run): a DMA copy;
- ``pinned``: a buffer from PyTorch's pinned allocator.

It prints the foreground step time and the background copy rate for each. A copy that slows the
foreground by more than its share of the GIL shows the driver serialising the two threads.

    python benchmarks/bench_handover.py --mb 20 --ops 300 --steps 300
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Dict, Optional

import torch

from muse_torchrec.cuda_driver import check, host_register, host_unregister

SOURCES = ("none", "pageable", "registered", "pinned")


def host_buffer(source: str, nbytes: int) -> Optional[torch.Tensor]:
    """The background copy's source buffer of ``nbytes`` bytes for ``source`` (``SOURCES``)."""
    if source == "none":
        return None
    if source == "pinned":
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    buffer = torch.empty(nbytes, dtype=torch.uint8).share_memory_().fill_(1)
    if source == "registered":
        check(host_register(buffer.data_ptr(), nbytes, torch.device("cuda", 0)), "cuMemHostRegister")
    return buffer


def copy_loop(buffer: torch.Tensor, device: torch.device, stop: threading.Event, counts: Dict[str, float]) -> None:
    """Copy ``buffer`` to the device on a side stream until ``stop``; one copy in flight at a time."""
    target = torch.empty(buffer.numel(), dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    start = time.perf_counter()
    with torch.cuda.stream(stream):
        while not stop.is_set():
            target.copy_(buffer, non_blocking=True)
            stream.synchronize()
            counts["copies"] += 1
    counts["seconds"] = time.perf_counter() - start


def foreground(device: torch.device, ops: int, steps: int) -> float:
    """Seconds per step of ``ops`` tiny in-place kernels (a launch-bound step)."""
    x = torch.zeros(16, device=device)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        for _ in range(ops):
            x.add_(1.0)
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def measure(source: str, nbytes: int, device: torch.device, ops: int, steps: int) -> Dict[str, float]:
    buffer = host_buffer(source, nbytes)
    counts = {"copies": 0.0, "seconds": 0.0}
    stop = threading.Event()
    thread = None
    if buffer is not None:
        thread = threading.Thread(target=copy_loop, args=(buffer, device, stop, counts), daemon=True)
        thread.start()
        time.sleep(0.2)
    foreground(device, ops, steps // 10)  # warm-up
    step_s = foreground(device, ops, steps)
    stop.set()
    if thread is not None:
        thread.join()
    if source == "registered":
        host_unregister(buffer.data_ptr())
    result = {"step_ms": 1000 * step_s}
    if counts["seconds"]:
        result["copy_gb_per_s"] = counts["copies"] * nbytes / counts["seconds"] / 1e9
        result["copy_ms"] = 1000 * counts["seconds"] / max(counts["copies"], 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=20.0, help="bytes copied per batch, in MB")
    parser.add_argument("--ops", type=int, default=300, help="kernels per foreground step")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2, help="every source this many times, alternated")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_handover needs a GPU")
    device = torch.device("cuda", 0)
    nbytes = int(args.mb * 1e6)
    results = {}
    for round_ in range(args.rounds):
        for source in SOURCES:
            results[f"{source}:{round_}"] = measure(source, nbytes, device, args.ops, args.steps)
    print(f"{'run':<16} {'fg step ms':>10} {'copy ms':>8} {'copy GB/s':>9}")
    for name, r in results.items():
        print(f"{name:<16} {r['step_ms']:>10.3f} {r.get('copy_ms', float('nan')):>8.2f} "
              f"{r.get('copy_gb_per_s', float('nan')):>9.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(device), "mb": args.mb,
                                              "ops": args.ops, "results": results}, indent=2))


if __name__ == "__main__":
    main()
