"""One buffer per batch between the loader workers and the training process.

A batch (``Batch``, ``GsuBatch``: dataclasses of tensors, KJTs and plain values) holds ~20 tensors.
A DataLoader worker hands each tensor over separately (one shared-memory file and descriptor per
tensor), and the training thread spends ~0.45 ms per tensor taking them in (measured on the
development machine: 9.8 ms per ``GsuBatch`` against 1.2 ms for one tensor of the same bytes),
time a host-bound training step does not have. ``pack`` copies every tensor of a batch into one
byte buffer in the worker; ``Packed`` crosses the process boundary, is pinned and moved to the
device as that one buffer, and ``unpack`` rebuilds the batch there from views of it (no copies).

The rebuild runs for every batch in the data path's thread, beside the host-bound training thread,
and every PyTorch op it calls lets the GIL go, which the training thread may then wait to take back
(benchmarks/RESULTS.md rows 105-106). So ``pack`` lays the tensors of one dtype out next to each
other and computes every size in the worker, and the rebuild is one ``split_with_sizes`` per dtype
(and a ``view`` for each tensor of more than one dimension): ~15 ops for a ``GsuBatch``'s 20
tensors, instead of a view of its own for each.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

# Each dtype's tensors start at a multiple of this many bytes, so that a view of any dtype is aligned.
_ALIGN = 16

# Layout nodes (plain tuples, cheap to pickle):
#   ("tensor", dtype, index, shape)              the index-th tensor of dtype in the buffer
#   ("kjt", keys, values, lengths, weights, length_per_key)   children are layouts, weights may be
#                                                ("value", None); length_per_key a list of ints
#   ("dataclass", cls, ((field name, layout), ...))
#   ("value", obj)                               anything else, kept as is (ints, None, strings)
# A Packed's layout is (node, splits): splits is ((dtype, sizes), ...), where the buffer viewed as
# dtype splits by sizes into [the bytes before, tensor 0, tensor 1, ..., the bytes after].
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
    """Tensors met while laying a batch out, grouped by dtype in the order met."""

    def __init__(self) -> None:
        self.by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}

    def layout(self, obj: Any) -> Layout:
        if isinstance(obj, torch.Tensor):
            same = self.by_dtype.setdefault(obj.dtype, [])
            same.append(obj)
            return ("tensor", obj.dtype, len(same) - 1, tuple(obj.shape))
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


def pack(obj: Any, allocate: Callable[[int], torch.Tensor] = lambda size: torch.empty(size, dtype=torch.uint8)) -> Packed:
    """Copy every tensor of ``obj`` (CPU) into one buffer; tensors may be of any dtype and shape.

    ``allocate(size)``: a uint8 buffer of exactly ``size`` bytes to fill (default: a new one). The
    size is a multiple of 16, so that the buffer can be viewed as any dtype.
    """
    collector = _Collector()
    node = collector.layout(obj)
    starts, size = [], 0  # each dtype's first byte
    for dtype, tensors in collector.by_dtype.items():
        starts.append(_aligned(size))
        size = starts[-1] + sum(t.numel() for t in tensors) * tensors[0].element_size()
    buffer = allocate(_aligned(size))
    splits = []
    for start, (dtype, tensors) in zip(starts, collector.by_dtype.items()):
        typed = buffer.view(dtype)
        first, numels = start // tensors[0].element_size(), [t.numel() for t in tensors]
        sizes = (first, *numels, typed.numel() - first - sum(numels))
        for tensor, part in zip(tensors, typed.split_with_sizes(sizes)[1:-1]):
            part.view(tensor.shape).copy_(tensor)
        splits.append((dtype, sizes))
    return Packed(buffer, (node, tuple(splits)))


def _rebuild(layout: Layout, parts: Dict[torch.dtype, Sequence[torch.Tensor]]) -> Any:
    kind = layout[0]
    if kind == "tensor":
        _, dtype, index, shape = layout
        part = parts[dtype][index]
        return part if len(shape) == 1 else part.view(shape)
    if kind == "kjt":
        keys, length_per_key = layout[1], layout[5]
        values, lengths, weights = (_rebuild(child, parts) for child in layout[2:5])
        return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights,
                                 length_per_key=length_per_key)
    if kind == "dataclass":
        cls, fields = layout[1], layout[2]
        return cls(**{name: _rebuild(child, parts) for name, child in fields})
    return layout[1]


def unpack(packed: Packed) -> Any:
    """The batch ``pack`` was given, its tensors views of ``packed.buffer`` (on the buffer's device)."""
    node, splits = packed.layout
    return _rebuild(node, {dtype: packed.buffer.view(dtype).split_with_sizes(sizes)[1:-1] for dtype, sizes in splits})


class PackingTransform:
    """``transform`` followed by ``pack``: what a loader worker runs so that its batches cross as one buffer."""

    def __init__(self, transform: Callable[[Any], Any]) -> None:
        self.transform = transform

    def __call__(self, block: Any) -> Packed:
        return pack(self.transform(block))
