"""The parameter-free GSU on the training device instead of in the loader workers.

The loader workers build everything but the top-K (``DeferredGsuBuilder`` -> ``GsuBatch``: the
batch plus each user's history rows), and ``DeviceGsu`` selects the top-K on the device where the
SCL table lives, then completes the batch's KJT (``DeviceGsu.over(loader)``, as
``benchmarks/bench_train.py --gsu-places device`` runs it). Only the selected and recent ids still
reach the sharded item table, and TrainPipelineSparseDist receives ordinary batches. The trainer
(``muse-torchrec train``) runs the GSU in the loader workers only.

Why: on the host the GSU costs ~100-200 ms per 1,000-sample batch per core (it reads every
behavior's 128-d vector); on an H100 it takes ~1.3 ms (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass, fields, replace
from typing import Dict, Iterable, Iterator, Optional, Union

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from muse_torchrec import features as F
from muse_torchrec.data.batch import Batch, BatchBuilder, _compact, _padded_rows, pad_block
from muse_torchrec.data.block import SampleBlock
from muse_torchrec.data.packed import Packed
from muse_torchrec.model import gsu as gsu_ops

DEVICE_GSU_KINDS = ("scl_cosine", "category")


@dataclass
class GsuBatch(Pipelineable):
    """A batch whose top-K is still to be selected.

    Attributes:
        batch: everything but the top-K (its ``sequence`` KJT lacks item_topk/cate_topk).
        hist_items, hist_cates: [U, L] int64 item/category rows of each user's history, id 0 removed,
            left-aligned (oldest first); hist_lengths: [U] int64.
        sample_user: [B] int64 user of each sample; target_items, target_cates: [B] int64.
        user_rank, max_user_samples: ``gsu.user_slots`` of ``sample_user``.
        topk_slots: [N] int64 flat positions in [B * k] of the top-K slots MUSE's GSU fills
            (min(k, history length) per sample), for ``k`` slots per sample.

    The last three are host facts computed in the worker, so that the device GSU never reads
    anything back from the GPU (a read would make the CPU wait for the training step before it).
    """

    batch: Batch
    hist_items: torch.Tensor
    hist_cates: torch.Tensor
    hist_lengths: torch.Tensor
    sample_user: torch.Tensor
    target_items: torch.Tensor
    target_cates: torch.Tensor
    user_rank: torch.Tensor
    max_user_samples: int
    topk_slots: torch.Tensor
    k: int

    def _tensors(self) -> Dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def to(self, device: torch.device, non_blocking: bool = False) -> "GsuBatch":
        moved = {name: t.to(device=device, non_blocking=non_blocking) for name, t in self._tensors().items()}
        return replace(self, batch=self.batch.to(device, non_blocking), **moved)

    def record_stream(self, stream: torch.Stream) -> None:
        self.batch.record_stream(stream)
        for tensor in self._tensors().values():
            tensor.record_stream(stream)

    def pin_memory(self) -> "GsuBatch":
        return replace(self, batch=self.batch.pin_memory(), **{n: t.pin_memory() for n, t in self._tensors().items()})


def real_slots(lengths: torch.Tensor, k: int) -> torch.Tensor:
    """Flat positions in [B * k] of the first ``lengths[b]`` slots of each row: [sum(min(lengths, k))]."""
    return gsu_ops.length_mask(lengths, k).view(-1).nonzero().squeeze(1)


class DeferredGsuBuilder:
    """SampleBlock -> GsuBatch in the loader workers: the host part of ``BatchBuilder`` without the top-K
    (``k``: the top-K size of the ``DeviceGsu`` that completes it)."""

    def __init__(self, scl_vectors: np.ndarray, item_scl_row: np.ndarray, recent: int = 50,
                 max_history: int = 1000, pad_to: Optional[int] = None, k: int = 50) -> None:
        self.base = BatchBuilder(scl_vectors, item_scl_row, gsu="recent_only", recent=recent,
                                 max_history=max_history)
        self.max_history = max_history
        self.pad_to = pad_to
        self.k = k

    def __call__(self, block: SampleBlock) -> GsuBatch:
        weights = np.ones(block.batch_size, dtype=np.float32)
        if self.pad_to is not None:
            block, weights = pad_block(block, self.pad_to)
        items, valid = _padded_rows(block.hist_offsets, block.hist_items, self.max_history)
        cates, _ = _padded_rows(block.hist_offsets, block.hist_cates, self.max_history)
        lengths, (items, cates) = _compact(valid & (items != 0), items, cates)
        batch = replace(self.base(block), weights=torch.from_numpy(weights))
        sample_user, hist_lengths = _long(block.sample_user), _long(lengths)
        slots = gsu_ops.user_slots(sample_user, len(hist_lengths))
        return GsuBatch(
            batch=batch,
            hist_items=_long(items),
            hist_cates=_long(cates),
            hist_lengths=hist_lengths,
            sample_user=sample_user,
            target_items=_long(block.target[F.ITEM.name]),
            target_cates=_long(block.target[F.CATE.name]),
            user_rank=slots.rank,
            max_user_samples=slots.max_samples,
            topk_slots=real_slots(hist_lengths[sample_user], self.k),
            k=self.k,
        )


def _long(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))


class DeviceGsu:
    """GsuBatch -> Batch on ``device``: select the top-K there and add item_topk/cate_topk to the KJT.

    Args:
        scl_vectors: [S + 1, 128] int8 SCL table, copied to ``device`` once (4.5 GB for Taobao-MM).
        item_scl_row: [V_item] int32 item row -> SCL row, copied to ``device`` once.
        kind: "scl_cosine" (MUSE) or "category" (SIM-hard).
    """

    def __init__(self, scl_vectors: np.ndarray, item_scl_row: np.ndarray, device: torch.device,
                 k: int = 50, kind: str = "scl_cosine") -> None:
        if kind not in DEVICE_GSU_KINDS:
            raise ValueError(f"the device GSU runs {DEVICE_GSU_KINDS}, not {kind!r}")
        self.scl = torch.from_numpy(np.ascontiguousarray(scl_vectors)).to(device)
        self.item_scl_row = torch.from_numpy(np.ascontiguousarray(item_scl_row)).to(device)
        self.device = device
        self.k = k
        self.kind = kind

    def _vectors(self, items: torch.Tensor) -> torch.Tensor:
        return self.scl[self.item_scl_row[items].long()]

    @torch.no_grad()
    def __call__(self, raw: Union[GsuBatch, Packed]) -> Batch:
        """``raw``: a GsuBatch, or one packed by the loader workers (``data.packed``)."""
        raw = raw.to(self.device, non_blocking=True)
        if raw.k != self.k:
            raise ValueError(f"the batch was built for a top-{raw.k} (DeferredGsuBuilder k), this GSU selects {self.k}")
        su = raw.sample_user
        target_scl = self._vectors(raw.target_items)
        if self.kind == "scl_cosine":
            slots = gsu_ops.UserSlots(raw.user_rank, raw.max_user_samples)
            topk = gsu_ops.muse_gsu(self._vectors(raw.hist_items), raw.hist_lengths, target_scl, su, self.k, slots)
            scores, selected = topk.scores, raw.topk_slots
        else:
            topk = gsu_ops.category_match_topk(raw.hist_cates[su], raw.hist_lengths[su], raw.target_cates, self.k)
            # The ESU's similarity is the SCL cosine of each selected behavior, whatever selected it.
            selected_items = gsu_ops.gather_selected(raw.hist_items, su, topk)
            unit = gsu_ops.normalize_scl(self._vectors(selected_items))
            real = gsu_ops.length_mask(topk.lengths, self.k)
            scores = torch.einsum("bkd,bd->bk", unit, gsu_ops.normalize_scl(target_scl)) * real
            selected = real.view(-1).nonzero().squeeze(1)  # the lengths are known on the device only: a sync
        items = gsu_ops.gather_selected(raw.hist_items, su, topk).view(-1)[selected]
        cates = gsu_ops.gather_selected(raw.hist_cates, su, topk).view(-1)[selected]
        topk_kjt = KeyedJaggedTensor(
            keys=["item_topk", "cate_topk"],
            values=torch.cat([items, cates]),
            lengths=torch.cat([topk.lengths, topk.lengths]).int(),
        )
        sequence = KeyedJaggedTensor.concat([raw.batch.sequence, topk_kjt])
        return replace(raw.batch, sequence=sequence, topk_scores=scores.float().contiguous())

    def over(self, batches: Iterable[Union[GsuBatch, Packed]]) -> Iterator[Batch]:
        """Apply to every batch of a loader, in the calling thread."""
        for raw in batches:
            yield self(raw)

    def ahead(self, batches: Iterable[Union[GsuBatch, Packed]], depth: int = 2) -> "GsuAhead":
        """Apply to every batch of a loader in a background thread, ``depth`` batches ahead."""
        return GsuAhead(self, batches, depth)


_END = object()


class GsuAhead:
    """``DeviceGsu`` over a loader in a background thread (on CUDA: on its own stream), ``depth``
    batches ahead of the consumer; batches come out in loader order, errors are raised in order.

    Why: the GSU's ~100 small kernels are host time, and the training thread is host-bound. PyTorch
    releases the GIL while it launches an op, so the thread overlaps most of that time with the
    training step's own launches. On CUDA each batch carries an event recorded after its GSU; the
    consumer's current stream waits for it and the batch's memory is recorded as used there.
    """

    def __init__(self, gsu: DeviceGsu, batches: Iterable[Union[GsuBatch, Packed]], depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.gsu, self.batches, self.depth = gsu, batches, depth

    @staticmethod
    def _put(out: "queue.Queue", item: object, stop: threading.Event) -> bool:
        """Put ``item`` unless the consumer stopped first; whether it was put."""
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, source: Iterator, out: "queue.Queue", stop: threading.Event) -> None:
        cuda = self.gsu.device.type == "cuda"
        stream = torch.cuda.Stream(self.gsu.device) if cuda else None
        try:
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                for raw in source:
                    batch = self.gsu(raw)
                    event = None
                    if cuda:
                        event = torch.cuda.Event()
                        event.record(stream)
                    if not self._put(out, (batch, event), stop):
                        return
        except BaseException as error:  # handed to the consumer, raised there in order
            self._put(out, error, stop)
            return
        self._put(out, _END, stop)

    def __iter__(self) -> Iterator[Batch]:
        out: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(iter(self.batches), out, stop), daemon=True,
                                  name="gsu-ahead")
        thread.start()
        try:
            while True:
                item = out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, event = item
                if event is not None:
                    current = torch.cuda.current_stream(self.gsu.device)
                    current.wait_event(event)
                    batch.record_stream(current)
                yield batch
        finally:
            stop.set()
            thread.join()
