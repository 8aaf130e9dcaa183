"""One buffer per batch between the loader workers and the training process.

A batch (``Batch``, ``GsuBatch``: dataclasses of tensors, KJTs and plain values) holds ~20 tensors.
A DataLoader worker hands each tensor over separately (one shared-memory file and descriptor per
tensor), and the training thread spends ~0.45 ms per tensor taking them in (measured on the
development machine: 9.8 ms per ``GsuBatch`` against 1.2 ms for one tensor of the same bytes),
time a host-bound training step does not have. ``pack`` copies every tensor of a batch into one
byte buffer in the worker; ``Packed`` crosses the process boundary, is pinned and moved to the
device as that one buffer, and ``unpack`` rebuilds the batch there from views of it (no copies):
one ``as_strided`` per tensor on a view of the buffer as the tensor's dtype, with every offset,
shape and stride computed in the worker, because the rebuild runs on the host-bound training
process for every batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, List, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

# Every tensor starts at a multiple of this many bytes, so that a view of any dtype is aligned.
_ALIGN = 16

# Layout nodes (plain tuples, cheap to pickle):
#   ("tensor", dtype, shape, stride, offset)     contiguous; offset in elements of dtype
#   ("kjt", keys, values, lengths, weights, length_per_key)   children are layouts, weights may be
#                                                ("value", None); length_per_key a list of ints
#   ("dataclass", cls, ((field name, layout), ...))
#   ("value", obj)                               anything else, kept as is (ints, None, strings)
Layout = Tuple[Any, ...]


@dataclass
class Packed(Pipelineable):
    """A batch as one contiguous uint8 buffer plus the layout to rebuild it.

    ``to(device)`` moves the buffer and returns the rebuilt batch on ``device`` (what
    TrainPipelineSparseDist and ``DeviceGsu`` expect); ``pin_memory`` pins the buffer.
    """

    buffer: torch.Tensor
    layout: Layout

    def to(self, device: torch.device, non_blocking: bool = False) -> Any:
        return unpack(Packed(self.buffer.to(device=device, non_blocking=non_blocking), self.layout))

    def record_stream(self, stream: torch.Stream) -> None:
        self.buffer.record_stream(stream)

    def pin_memory(self) -> "Packed":
        return Packed(self.buffer.pin_memory(), self.layout)


class _Collector:
    """Tensors met while laying a batch out, with their byte offsets in the buffer."""

    def __init__(self) -> None:
        self.placed: List[Tuple[torch.Tensor, int]] = []
        self.size = 0

    def layout(self, obj: Any) -> Layout:
        if isinstance(obj, torch.Tensor):
            offset = _aligned(self.size)
            self.size = offset + obj.numel() * obj.element_size()
            self.placed.append((obj, offset))
            shape = tuple(obj.shape)
            return ("tensor", obj.dtype, shape, _contiguous_strides(shape), offset // obj.element_size())
        if isinstance(obj, KeyedJaggedTensor):
            # The ids per key travel as host numbers: computed on the device, TorchRec would read them
            # back (a sync) in every input distribution.
            return ("kjt", obj.keys(), self.layout(obj.values()), self.layout(obj.lengths()),
                    self.layout(obj.weights_or_none()), obj.length_per_key())
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return ("dataclass", type(obj), tuple((f.name, self.layout(getattr(obj, f.name)))
                                                  for f in dataclasses.fields(obj)))
        return ("value", obj)


def _aligned(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


def _contiguous_strides(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def pack(obj: Any, allocate: Callable[[int], torch.Tensor] = lambda size: torch.empty(size, dtype=torch.uint8)) -> Packed:
    """Copy every tensor of ``obj`` (CPU) into one buffer; tensors may be of any dtype and shape.

    ``allocate(size)``: a uint8 buffer of exactly ``size`` bytes to fill (default: a new one). The
    size is a multiple of 16, so that the buffer can be viewed as any dtype.
    """
    collector = _Collector()
    layout = collector.layout(obj)
    buffer = allocate(_aligned(collector.size))
    for tensor, offset in collector.placed:
        nbytes = tensor.numel() * tensor.element_size()
        buffer[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
    return Packed(buffer, layout)


class _TypedViews(dict):
    """dtype -> the whole buffer viewed as that dtype, made on first use."""

    def __init__(self, buffer: torch.Tensor) -> None:
        super().__init__()
        self.buffer = buffer

    def __missing__(self, dtype: torch.dtype) -> torch.Tensor:
        typed = self[dtype] = self.buffer.view(dtype)
        return typed


def _rebuild(layout: Layout, typed: _TypedViews) -> Any:
    kind = layout[0]
    if kind == "tensor":
        _, dtype, shape, stride, offset = layout
        return typed[dtype].as_strided(shape, stride, offset)
    if kind == "kjt":
        keys, length_per_key = layout[1], layout[5]
        values, lengths, weights = (_rebuild(child, typed) for child in layout[2:5])
        return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights,
                                 length_per_key=length_per_key)
    if kind == "dataclass":
        cls, fields = layout[1], layout[2]
        return cls(**{name: _rebuild(child, typed) for name, child in fields})
    return layout[1]


def unpack(packed: Packed) -> Any:
    """The batch ``pack`` was given, its tensors views of ``packed.buffer`` (on the buffer's device)."""
    return _rebuild(packed.layout, _TypedViews(packed.buffer))


class PackingTransform:
    """``transform`` followed by ``pack``: what a loader worker runs so that its batches cross as one buffer."""

    def __init__(self, transform: Callable[[Any], Any]) -> None:
        self.transform = transform

    def __call__(self, block: Any) -> Packed:
        return pack(self.transform(block))
