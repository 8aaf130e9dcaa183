"""A batch's device memory recorded as used on a CUDA stream, once per memory block.

``Tensor.record_stream`` marks the tensor's whole allocation as used on the stream, so that the
caching allocator does not hand it out again before the stream's work is done. A batch's tensors
mostly share allocations: a packed batch's ~20 tensors are views of one buffer (``data.packed``).
One call per allocation does what one call per tensor does, with fewer calls, and each call lets
the GIL go: the data path's thread records its batches beside the host-bound training thread, which
may then wait to take the GIL back (benchmarks/RESULTS.md rows 105-106).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def tensors_of(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor of ``obj``: a tensor, a KJT (its values, lengths, offsets and weights where it
    has them) or a dataclass of these, nested; anything else holds none."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, KeyedJaggedTensor):
        for part in (obj.values(), obj.lengths_or_none(), obj.offsets_or_none(), obj.weights_or_none()):
            if part is not None:
                yield part
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            yield from tensors_of(getattr(obj, field.name))


def record_each_block(obj: Any, stream: torch.Stream) -> None:
    """Record the memory of every tensor of ``obj`` (``tensors_of``) as used on ``stream``: one
    ``record_stream`` for each distinct storage."""
    recorded = set()
    for tensor in tensors_of(obj):
        storage = tensor.untyped_storage().data_ptr()
        if storage not in recorded:
            recorded.add(storage)
            tensor.record_stream(stream)
