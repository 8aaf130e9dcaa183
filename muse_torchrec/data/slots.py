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

Worker side: ``SlotTransform`` (the DataLoader's transform). Training side: ``SlotReceiver`` around
the DataLoader, which keeps the slots' buffers as they first arrive, for one pass over the loader
(the DataLoader starts new workers, with new rings, for every pass).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from torchrec.streamable import Pipelineable

from muse_torchrec.data.packed import Layout, Packed, pack

# A slot grows to this many times the batch that did not fit (batch sizes vary a little: histories).
_GROWTH = 1.25


@dataclass
class SlotRef(Pipelineable):
    """A packed batch in slot ``slot`` of the worker ring ``ring``: its first ``nbytes`` bytes, ``layout``
    as in ``Packed``.

    ``flags`` ([slots] int32, shared: 1 while a slot holds a batch not yet moved) and ``buffer`` (the
    slot's uint8 buffer, shared) travel with the first batch of a slot, and again when the worker
    grew the slot; ``SlotReceiver`` fills them in for the other batches.
    """

    ring: str
    slot: int
    nbytes: int
    layout: Layout
    flags: Optional[torch.Tensor] = None
    buffer: Optional[torch.Tensor] = None

    def to(self, device: torch.device, non_blocking: bool = False) -> Any:
        """Copy the batch out of its slot, free the slot, and return the batch rebuilt on ``device``."""
        if self.buffer is None or self.flags is None:
            raise RuntimeError(f"slot {self.slot} of ring {self.ring}: no buffer; a SlotRef is moved once, "
                               "after it came through a SlotReceiver")
        data = self.buffer[:self.nbytes]
        # To a GPU the copy reads the slot before it returns (CUDA stages pageable memory itself;
        # staging it into pinned memory first cost a host allocation and ~4 ms a batch on an H100
        # host, benchmarks/RESULTS.md row 32); on the CPU the batch must not be a view of a slot
        # that the worker will reuse.
        moved = data.to(device, non_blocking=non_blocking) if device.type != "cpu" else data.clone()
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
    up to ``prefetch_factor`` (2) per worker in flight, and the consumer moves each batch as it
    takes it, so 4 leaves room.
    """

    def __init__(self, transform: Callable[[Any], Any], slots: int = 4) -> None:
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


class SlotReceiver:
    """The loader's items with every ``SlotRef`` given its slot's buffer (``to`` then works).

    Each pass keeps the buffers that arrive during it, and drops them when it ends. Requires a
    DataLoader whose workers end with each pass (``persistent_workers`` off, the default).
    """

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        buffers: Dict[Tuple[str, int], torch.Tensor] = {}
        flags: Dict[str, torch.Tensor] = {}
        for item in self.loader:
            if isinstance(item, SlotRef):
                key = (item.ring, item.slot)
                if item.buffer is not None:
                    buffers[key], flags[item.ring] = item.buffer, item.flags
                elif key not in buffers:
                    raise RuntimeError(f"slot {item.slot} of ring {item.ring} was never received: a SlotReceiver "
                                       "must see every batch of its loader's pass, from the first")
                else:
                    item.buffer, item.flags = buffers[key], flags[item.ring]
            yield item
