"""Batches made ready on the training device by a process of their own (``ProcessFeeder``).

Why: on one GPU the end-to-end step is the model step plus the data path's host time in the
training process (receiving each batch from the loader workers, its copy to the GPU, the device
GSU), and the data path slows the step beside it as much as feeding it does (benchmarks/RESULTS.md
rows 55-57). Here a feeder process runs that whole data path on the same GPU, packs each finished
device batch into one device buffer (``packed.pack``) and hands it over a queue: torch shares the
buffer through CUDA IPC (one handle and one event a batch; the consumer's stream waits for the
feeder's copies, and the feeder's allocator keeps the buffer until the consumer drops it). The
training process only rebuilds the batch's views (``packed.unpack``).

On the CPU the same path runs through shared memory, which is how the tests check it.
"""

from __future__ import annotations

import queue as queue_module
import traceback
from typing import Any, Callable, Iterable, Iterator, Optional, Tuple

import torch
import torch.multiprocessing as mp

from muse_torchrec.data.affinity import started_elsewhere
from muse_torchrec.data.packed import Packed, pack, unpack

# How long the consumer waits for a batch before checking that the feeder still runs, and the
# feeder for room in the queue before checking that the consumer still takes batches.
_POLL_S = 5.0
_PUT_POLL_S = 0.5


class _End:
    """Put after the last batch."""


class _Failure:
    """Put when the feeder's data path raised: its traceback, raised again in the consumer."""

    def __init__(self, text: str) -> None:
        self.text = text


def _put(out: "mp.Queue", item: Any, consumer_done: "mp.Event") -> bool:
    """Put ``item`` unless the consumer stops taking batches first; whether it was put."""
    while not consumer_done.is_set():
        try:
            out.put(item, timeout=_PUT_POLL_S)
            return True
        except queue_module.Full:
            continue
    return False


def _feed(make_batches: Callable[..., Iterable[Any]], args: Tuple[Any, ...], device: torch.device,
          out: "mp.Queue", consumer_done: "mp.Event") -> None:
    """The feeder process: every batch of ``make_batches(*args)`` packed into one buffer on ``device``."""
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        for batch in make_batches(*args):
            if not _put(out, pack(batch, lambda size: torch.empty(size, dtype=torch.uint8, device=device)),
                        consumer_done):
                break
        else:
            _put(out, _End(), consumer_done)
    except BaseException:  # noqa: BLE001 - whatever the data path raised reaches the consumer
        _put(out, _Failure(traceback.format_exc()), consumer_done)
    # Shared CUDA buffers live in this process's allocator: stay until the consumer has let go of them.
    consumer_done.wait()
    # Batches the consumer will not take stay unsent rather than hold the exit up.
    out.cancel_join_thread()


class ProcessFeeder:
    """The batches of ``make_batches(*args)``, made in a spawned process on ``device``, in order.

    Args:
        make_batches: a picklable (module-level) function returning an iterable of batches on
            ``device`` (dataclasses of tensors, KJTs and plain values: what ``packed.pack`` takes);
            it runs in the feeder process, which may start processes of its own (loader workers).
        args: its arguments (picklable).
        device: where the batches are made and handed over.
        depth: batches made ahead of the consumer.

    Iterate once; ``close`` (or the end of the iteration) stops the feeder, whose shared buffers
    every batch handed out is a view of: keep no batch past it.
    """

    def __init__(self, make_batches: Callable[..., Iterable[Any]], args: Tuple[Any, ...], device: torch.device,
                 depth: int = 4) -> None:
        context = mp.get_context("spawn")
        self.device = device
        self.queue = context.Queue(maxsize=depth)
        self.consumer_done = context.Event()
        # Not a daemon: daemonic processes may not start the loader's workers.
        self.process: Optional[mp.Process] = context.Process(
            target=_feed, args=(make_batches, args, device, self.queue, self.consumer_done), daemon=False)
        with started_elsewhere():  # off the training thread's step core (train.step_core)
            self.process.start()

    def _next(self) -> Any:
        while True:
            try:
                return self.queue.get(timeout=_POLL_S)
            except queue_module.Empty:
                if self.process is None or not self.process.is_alive():
                    code = None if self.process is None else self.process.exitcode
                    raise RuntimeError(f"the feeder process ended without finishing its batches (exit code {code})")

    def __iter__(self) -> Iterator[Any]:
        try:
            while True:
                item = self._next()
                if isinstance(item, _End):
                    return
                if isinstance(item, _Failure):
                    raise RuntimeError(f"the feeder process failed:\n{item.text}")
                assert isinstance(item, Packed)
                yield unpack(item)
        finally:
            self.close()

    def close(self) -> None:
        """Let the feeder end and wait for it; first, on a GPU, for the work queued here that may read
        its buffers (the last batch's step, when the iteration ends)."""
        if self.process is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.consumer_done.set()
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        self.process = None
