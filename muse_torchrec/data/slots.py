"""Loader workers hand batches over through rings of shared-memory slots, reused batch after batch.

``packed.PackingTransform`` gives every batch a new buffer. Each new shared-memory buffer costs the
training process a file-descriptor handshake with the worker (torch's ``resource_sharer``: a socket
connection and an HMAC challenge, answered by a thread of the busy worker) and fresh pages: ~1 ms
of the host-bound training process per batch on an H100 host (benchmarks/RESULTS.md rows 19-21;
the slots made the data path alone 1.4-2.0x faster, rows 28 and 32).
Here each worker packs its batches into the few buffers of its own ring: a buffer crosses the
process boundary once, after that only its slot number does (``SlotRef``). The consumer copies the
bytes out when it moves the batch (``SlotRef.to``) and frees the slot. A worker whose slots are all
still held hands the batch over in a buffer of its own (a ``Packed``) instead of waiting, so a slow
consumer never stalls nor deadlocks it.

For a GPU consumer the receiver page-locks each slot's buffer in place (``cuMemHostRegister``) when it
first arrives, so that moving a batch is one DMA copy, and frees the slot once that copy is done.
Why: from pageable memory CUDA copies through staging buffers with the calling thread's CPU, and
while it does, the process's other threads cannot launch kernels: on an H100 host a background
thread copying 20 MB batches slowed a launch-bound foreground loop from 2.3 to 354-404 ms a step,
page-locked 2.7-3.2 ms (``benchmarks/bench_handover.py``, benchmarks/RESULTS.md row 48). The loader's
batches are moved on a thread beside the host-bound training thread.

Worker side: ``SlotTransform`` (the DataLoader's transform). Training side: ``SlotReceiver`` around
the DataLoader, which keeps the slots' buffers as they first arrive, for one pass over the loader
(the DataLoader starts new workers, with new rings, for every pass).
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from torchrec.streamable import Pipelineable

from muse_torchrec.cuda_driver import host_register, host_unregister
from muse_torchrec.data.packed import Layout, Packed, pack

# A slot grows to this many times the batch that did not fit (batch sizes vary a little: histories).
_GROWTH = 1.25


@dataclass
class SlotRef(Pipelineable):
    """A packed batch in slot ``slot`` of the worker ring ``ring``: its first ``nbytes`` bytes, ``layout``
    as in ``Packed``.

    ``flags`` ([slots] int32, shared: 1 while a slot holds a batch not yet moved) and ``buffer`` (the
    slot's uint8 buffer, shared) travel with the first batch of a slot, and again when the worker
    grew the slot; ``SlotReceiver`` fills them in for the other batches, and ``page_locked`` when it
    page-locked the buffer.
    """

    ring: str
    slot: int
    nbytes: int
    layout: Layout
    flags: Optional[torch.Tensor] = None
    buffer: Optional[torch.Tensor] = None
    page_locked: Optional["PageLockedSlots"] = None

    def to(self, device: torch.device, non_blocking: bool = False) -> Any:
        """Copy the batch out of its slot, free the slot (a page-locked one once the copy is done), and
        return the batch rebuilt on ``device``."""
        if self.buffer is None or self.flags is None:
            raise RuntimeError(f"slot {self.slot} of ring {self.ring}: no buffer; a SlotRef is moved once, "
                               "after it came through a SlotReceiver")
        data = self.buffer[:self.nbytes]
        # On the CPU the batch must not be a view of a slot that the worker will reuse.
        moved = data.clone() if device.type == "cpu" else data.to(device, non_blocking=non_blocking)
        if self.page_locked is not None and device.type != "cpu":
            self.page_locked.free_after_copy(self.flags, self.slot)
        else:
            # A clone, or a copy from pageable memory, has read the slot when it returns.
            self.flags[self.slot] = 0
        self.buffer = None
        return Packed(moved, self.layout).to(device)

    def record_stream(self, stream: torch.Stream) -> None:
        """Nothing to record: the slot is host memory, and ``to`` returns the batch that a stream uses."""


class _Ring:
    """One worker's slots, made in the worker process on its first batch."""

    def __init__(self, slots: int) -> None:
        self.id = uuid.uuid4().hex
        self.flags = torch.zeros(slots, dtype=torch.int32).share_memory_()
        self.held = self.flags.numpy()  # the same memory, read without a tensor op
        self.buffers: List[Optional[torch.Tensor]] = [None] * slots
        self.announced = [False] * slots  # whether the consumer has the slot's current buffer
        self.next = 0

    def _free_slot(self) -> Optional[int]:
        slots = len(self.buffers)
        for i in range(slots):
            slot = (self.next + i) % slots
            if self.held[slot] == 0:
                self.next = (slot + 1) % slots
                return slot
        return None

    def _buffer(self, slot: int, size: int) -> torch.Tensor:
        buffer = self.buffers[slot]
        if buffer is None or buffer.numel() < size:
            buffer = torch.empty(int(size * _GROWTH), dtype=torch.uint8).share_memory_()
            self.buffers[slot] = buffer
            self.announced[slot] = False
        return buffer[:size]

    def put(self, batch: Any) -> Union[SlotRef, Packed]:
        """``batch`` packed into a free slot, or into a buffer of its own when every slot is held."""
        slot = self._free_slot()
        if slot is None:
            return pack(batch)
        packed = pack(batch, lambda size: self._buffer(slot, size))
        self.held[slot] = 1
        new = not self.announced[slot]
        self.announced[slot] = True
        return SlotRef(self.id, slot, packed.buffer.numel(), packed.layout,
                       flags=self.flags if new else None, buffer=self.buffers[slot] if new else None)


class SlotTransform:
    """``transform`` followed by packing into this worker's ring of ``slots`` shared buffers.

    ``slots``: batches a worker may have handed over and not yet seen moved; the DataLoader keeps
    up to ``prefetch_factor`` (2) per worker in flight, the consumer moves each batch as it takes
    it, and a page-locked slot stays held until its copy to the GPU is done, so 6 leaves room.
    """

    def __init__(self, transform: Callable[[Any], Any], slots: int = 6) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.transform = transform
        self.slots = slots
        self._ring: Optional[_Ring] = None
        self._pid: Optional[int] = None

    def __getstate__(self) -> Dict[str, Any]:
        # A ring belongs to the process that made it; a worker started by spawning makes its own.
        return {**self.__dict__, "_ring": None, "_pid": None}

    def __call__(self, block: Any) -> Union[SlotRef, Packed]:
        if self._pid != os.getpid():
            self._ring, self._pid = _Ring(self.slots), os.getpid()
        return self._ring.put(self.transform(block))


class PageLockedSlots:
    """One pass's slot buffers page-locked in place for DMA copies to ``device``, and the slots whose copy
    is still in flight: a worker may refill a slot only once the copy out of it is done.

    Used by one thread, the one that iterates the ``SlotReceiver`` and moves its batches.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.locked: List[torch.Tensor] = []
        self.copying: Deque[Tuple[torch.cuda.Event, torch.Tensor, int]] = deque()
        self.failed = False

    def lock(self, buffer: torch.Tensor) -> bool:
        """Page-lock ``buffer`` (until ``release``); False, with a warning, where CUDA refuses (and for
        the rest of the pass)."""
        if self.failed:
            return False
        result = host_register(buffer.data_ptr(), buffer.numel(), self.device)
        if result != 0:
            self.failed = True
            warnings.warn(f"page-locking a {buffer.numel()}-byte loader slot (cuMemHostRegister) failed "
                          f"(CUresult {result}): this pass copies batches from pageable memory, which stalls "
                          "the training thread's kernel launches while it copies")
            return False
        self.locked.append(buffer)
        return True

    def free_after_copy(self, flags: torch.Tensor, slot: int) -> None:
        """Free ``slot`` once the copy just issued on the current stream is done."""
        event = torch.cuda.Event()
        event.record()
        self.copying.append((event, flags, slot))

    def free_copied(self) -> None:
        """Free the slots whose copies are done (in the order they were issued)."""
        while self.copying and self.copying[0][0].query():
            _, flags, slot = self.copying.popleft()
            flags[slot] = 0

    def release(self) -> None:
        """Wait for the copies in flight, free their slots and unlock every buffer."""
        while self.copying:
            event, flags, slot = self.copying.popleft()
            event.synchronize()
            flags[slot] = 0
        for buffer in self.locked:
            host_unregister(buffer.data_ptr())
        self.locked.clear()


class SlotReceiver:
    """The loader's items with every ``SlotRef`` given its slot's buffer (``to`` then works).

    Each pass keeps the buffers that arrive during it, and drops them when it ends. Requires a
    DataLoader whose workers end with each pass (``persistent_workers`` off, the default).
    ``device``: where the batches will be moved; a CUDA device page-locks the buffers for the pass
    (``PageLockedSlots``).
    """

    def __init__(self, loader: Iterable[Any], device: Optional[torch.device] = None) -> None:
        self.loader = loader
        self.device = device

    def __iter__(self) -> Iterator[Any]:
        # (ring, slot) -> the slot's buffer, and the page lock it is under (None: pageable).
        buffers: Dict[Tuple[str, int], Tuple[torch.Tensor, Optional[PageLockedSlots]]] = {}
        flags: Dict[str, torch.Tensor] = {}
        page_locked = PageLockedSlots(self.device) if self.device is not None and self.device.type == "cuda" else None
        try:
            for item in self.loader:
                if page_locked is not None:
                    page_locked.free_copied()
                if isinstance(item, SlotRef):
                    key = (item.ring, item.slot)
                    if item.buffer is not None:
                        locked = page_locked is not None and page_locked.lock(item.buffer)
                        buffers[key] = (item.buffer, page_locked if locked else None)
                        flags[item.ring] = item.flags
                    elif key not in buffers:
                        raise RuntimeError(f"slot {item.slot} of ring {item.ring} was never received: a "
                                           "SlotReceiver must see every batch of its loader's pass, from the first")
                    else:
                        item.flags = flags[item.ring]
                    item.buffer, item.page_locked = buffers[key]
                yield item
        finally:
            if page_locked is not None:
                page_locked.release()
