"""The parameter-free GSU on the training device instead of in the loader workers.

The loader workers build everything but the top-K (``DeferredGsuBuilder`` -> ``GsuBatch``: the
batch, its top-K ids still placeholders, plus each user's history rows), and ``DeviceGsu`` selects
the top-K on the device where the SCL table lives, then writes the selected ids over the
placeholders of the batch's KJT (``DeviceGsu.over(loader)`` in the calling thread,
``DeviceGsu.ahead(loader)`` in a background thread: what the trainer runs with
``data.gsu_placement: device``). Only the selected and recent ids still reach the sharded item
table, and the training step receives ordinary batches. On CUDA, MUSE's selection for batches
of the training size is one CUDA graph replay (``GraphedMuseSelection``).

Why: on the host the GSU costs ~100-200 ms per 1,000-sample batch per core (it reads every
behavior's 128-d vector); on an H100 it takes ~1.3 ms (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple, Union

import numpy as np
import torch
from torchrec.streamable import Pipelineable

from muse_torchrec import features as F
from muse_torchrec.data.affinity import started_elsewhere
from muse_torchrec.data.batch import Batch, BatchBuilder, padded_block, user_histories
from muse_torchrec.data.block import SampleBlock
from muse_torchrec.data.packed import Packed
from muse_torchrec.data.routing import Routing
from muse_torchrec.data.slots import SlotRef
from muse_torchrec.model import gsu as gsu_ops
from muse_torchrec.model.cuda_graphs import CAPTURE_LOCK

DEVICE_GSU_KINDS = ("scl_cosine", "category")
# The kinds whose selection DeviceGsu replays as a CUDA graph (GraphedMuseSelection).
GRAPHED_KINDS = ("scl_cosine",)


@dataclass
class GsuBatch(Pipelineable):
    """A batch whose top-K is still to be selected.

    Attributes:
        batch: the batch, but for the top-K: item_topk / cate_topk of its ``sparse_features`` hold 0
            ids, as many as the GSU selects, and ``topk_scores`` zeros.
        hist_items, hist_cates: [U, L] int64 item/category rows of each user's history, id 0 removed,
            left-aligned (oldest first); hist_lengths: [U] int64.
        sample_user: [B] int64 user of each sample; target_items, target_cates: [B] int64.
        user_rank, max_user_samples: ``gsu.user_slots`` of ``sample_user``.
        topk_slots: [N] int64 flat positions in [B * k] of the top-K slots the GSU fills (MUSE:
            min(k, history length) per sample; SIM-hard: min(k, matching behaviors)), for ``k`` slots
            per sample, in the order of the placeholders.
        topk_values_at: where item_topk's and cate_topk's N placeholders start in
            ``batch.sparse_features.values()``.
        kind: the GSU kind the batch was built for.

    ``user_rank``, ``max_user_samples``, ``topk_slots`` and ``topk_values_at`` are host facts computed
    in the worker, so that the device GSU never reads anything back from the GPU (a read would make
    the CPU wait for the training step before it).
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
    topk_values_at: Tuple[int, int]
    k: int
    kind: str

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
    (``k``, ``kind``: the top-K size and GSU kind of the ``DeviceGsu`` that completes it)."""

    def __init__(self, scl_vectors: np.ndarray, item_scl_row: np.ndarray, recent: int = 50,
                 max_history: int = 1000, pad_to: Optional[int] = None, k: int = 50,
                 kind: str = "scl_cosine") -> None:
        if kind not in DEVICE_GSU_KINDS:
            raise ValueError(f"the device GSU runs {DEVICE_GSU_KINDS}, not {kind!r}")
        self.base = BatchBuilder(scl_vectors, item_scl_row, gsu=kind, k=k, recent=recent,
                                 max_history=max_history, pad_to=pad_to, defer_topk=True)

    def __call__(self, block: SampleBlock) -> GsuBatch:
        base = self.base
        block, weights = padded_block(block, base.pad_to)
        items, cates, lengths = user_histories(block, base.max_history)
        batch = base.assemble(block, weights, items, cates, lengths)
        sample_user, hist_lengths = _long(block.sample_user), _long(lengths)
        slots = gsu_ops.user_slots(sample_user, len(hist_lengths))
        kjt = batch.sparse_features
        starts = dict(zip(kjt.keys(), kjt.offset_per_key()))
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
            topk_slots=real_slots(kjt["item_topk"].lengths(), base.k),
            topk_values_at=(starts["item_topk"], starts["cate_topk"]),
            k=base.k,
            kind=base.gsu,
        )


def _long(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))


# A batch's MUSE selection: (scores [B, K] float, item ids [B, K], category ids [B, K]), ids 0 and
# scores 0.0 in padding slots.
Selection = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def picked_ids(topk: gsu_ops.TopK, sample_user: torch.Tensor, hist_items: torch.Tensor,
               hist_cates: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Item and category ids of the selected behaviors: ([B, K], [B, K]), 0 in padding slots."""
    return (gsu_ops.gather_selected(hist_items, sample_user, topk),
            gsu_ops.gather_selected(hist_cates, sample_user, topk))


def select_by_sample(scl: torch.Tensor, item_scl_row: torch.Tensor, hist_items: torch.Tensor,
                     hist_cates: torch.Tensor, hist_lengths: torch.Tensor, sample_user: torch.Tensor,
                     target_items: torch.Tensor, k: int) -> Selection:
    """MUSE's selection of a batch with static shapes (``gsu.muse_gsu_by_sample``) and the picked ids."""
    topk = gsu_ops.muse_gsu_by_sample(scl, item_scl_row, hist_items, hist_lengths, sample_user, target_items, k)
    return (topk.scores, *picked_ids(topk, sample_user, hist_items, hist_cates))


class GraphedMuseSelection:
    """MUSE's selection for batches of ``batch_size`` samples and ``max_history``-wide histories as one
    CUDA graph of ``select_by_sample`` compiled by torch.compile: one launch instead of dozens.

    Why: the device GSU runs on the training process's host, whose step is host-bound and shares the
    GIL with it; eager, the selection is dozens of small kernel launches a batch. The graph reads
    static buffers: a batch's U users' histories are copied into their first U rows, and rows past U
    are never read (every sample's user is < U). The scores are copied out of the graph's memory (a
    batch keeps them); the picked ids are the graph's own outputs, which the next replay overwrites:
    read them on the replay's stream before replaying again (``DeviceGsu`` copies them into the
    batch at once). Same selection, bit for bit, as ``gsu.muse_gsu`` (exact integer statistics;
    tests/test_gpu.py).

    Captured at construction (compiling takes ~10-60 s); the buffers and the graph's workspace take
    about ``workspace_bytes(batch_size, max_history)`` of device memory.
    """

    def __init__(self, scl: torch.Tensor, item_scl_row: torch.Tensor, batch_size: int, max_history: int,
                 k: int) -> None:
        device = scl.device
        self.batch_size, self.max_history = batch_size, max_history
        self.hist_items, self.hist_cates = (torch.zeros(batch_size, max_history, dtype=torch.long, device=device)
                                            for _ in range(2))
        self.hist_lengths, self.sample_user, self.target_items = (
            torch.zeros(batch_size, dtype=torch.long, device=device) for _ in range(3))
        compiled = torch.compile(select_by_sample, dynamic=False)
        args = (scl, item_scl_row, self.hist_items, self.hist_cates, self.hist_lengths, self.sample_user,
                self.target_items, k)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(2):  # compile and autotune outside the capture
                compiled(*args)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = compiled(*args)

    @staticmethod
    def workspace_bytes(batch_size: int, max_history: int) -> int:
        """Device memory of the buffers and the graph's intermediates: ~12 int64 [B, L] tensors."""
        return 12 * 8 * batch_size * max_history

    def fits(self, raw: GsuBatch) -> bool:
        return raw.sample_user.numel() == self.batch_size and raw.hist_items.shape[1] == self.max_history

    def __call__(self, raw: GsuBatch) -> Selection:
        """Replay on the current stream; ``raw`` on the graph's device, ``fits(raw)``. The ids are
        valid until the next replay (see the class docstring)."""
        users = raw.hist_items.shape[0]
        self.hist_items[:users].copy_(raw.hist_items)
        self.hist_cates[:users].copy_(raw.hist_cates)
        self.hist_lengths[:users].copy_(raw.hist_lengths)
        self.sample_user.copy_(raw.sample_user)
        self.target_items.copy_(raw.target_items)
        self.graph.replay()
        scores, items, cates = self.outputs
        return scores.clone(), items, cates


class DeviceGsu:
    """GsuBatch -> Batch on ``device``: select the top-K there and write the selected ids over the
    batch's item_topk / cate_topk placeholders (in place: a GsuBatch is made to be completed once).

    Args:
        scl_vectors: [S + 1, 128] int8 SCL table, copied to ``device`` once (4.5 GB for Taobao-MM).
        item_scl_row: [V_item] int32 item row -> SCL row, copied to ``device`` once.
        kind: "scl_cosine" (MUSE) or "category" (SIM-hard).
        graph_shape: (batch size, max history) of the batches whose MUSE selection is replayed as one
            CUDA graph (``GraphedMuseSelection``; CUDA only); other batches run it eagerly.
    """

    def __init__(self, scl_vectors: np.ndarray, item_scl_row: np.ndarray, device: torch.device,
                 k: int = 50, kind: str = "scl_cosine", graph_shape: Optional[Tuple[int, int]] = None) -> None:
        if kind not in DEVICE_GSU_KINDS:
            raise ValueError(f"the device GSU runs {DEVICE_GSU_KINDS}, not {kind!r}")
        self.scl = torch.from_numpy(np.ascontiguousarray(scl_vectors)).to(device)
        self.item_scl_row = torch.from_numpy(np.ascontiguousarray(item_scl_row)).to(device)
        self.device = device
        self.k = k
        self.kind = kind
        self.graphed: Optional[GraphedMuseSelection] = None
        if graph_shape is not None and kind in GRAPHED_KINDS and device.type == "cuda":
            self.graphed = GraphedMuseSelection(self.scl, self.item_scl_row, *graph_shape, k)

    def _vectors(self, items: torch.Tensor) -> torch.Tensor:
        return self.scl[self.item_scl_row[items].long()]

    @torch.no_grad()
    def __call__(self, raw: Union[GsuBatch, Packed, SlotRef]) -> Batch:
        """``raw``: a GsuBatch, or one packed by the loader workers (``data.packed``, ``data.slots``)."""
        raw = raw.to(self.device, non_blocking=True)
        if (raw.k, raw.kind) != (self.k, self.kind):
            raise ValueError(f"the batch was built for a {raw.kind} top-{raw.k} (DeferredGsuBuilder k, kind), "
                             f"this GSU selects a {self.kind} top-{self.k}")
        if self.kind == "scl_cosine":
            scores, items, cates = self._muse(raw)
        else:
            su = raw.sample_user
            topk = gsu_ops.category_match_topk(raw.hist_cates[su], raw.hist_lengths[su], raw.target_cates, self.k)
            items, cates = picked_ids(topk, su, raw.hist_items, raw.hist_cates)
            # The ESU's similarity is the SCL cosine of each selected behavior, whatever selected it.
            unit = gsu_ops.normalize_scl(self._vectors(items))
            real = gsu_ops.length_mask(topk.lengths, self.k)
            target = gsu_ops.normalize_scl(self._vectors(raw.target_items))
            scores = torch.einsum("bkd,bd->bk", unit, target) * real
        values, selected = raw.batch.sparse_features.values(), raw.topk_slots
        count = selected.numel()
        for start, ids in zip(raw.topk_values_at, (items, cates)):
            torch.index_select(ids.view(-1), 0, selected, out=values.narrow(0, start, count))
        return replace(raw.batch, topk_scores=scores)

    def _muse(self, raw: GsuBatch) -> Selection:
        """MUSE's selection of a batch on the device: one graph replay for batches of the captured size."""
        if self.graphed is not None and self.graphed.fits(raw):
            return self.graphed(raw)
        slots = gsu_ops.UserSlots(raw.user_rank, raw.max_user_samples)
        topk = gsu_ops.muse_gsu(self._vectors(raw.hist_items), raw.hist_lengths, self._vectors(raw.target_items),
                                raw.sample_user, self.k, slots)
        return (topk.scores, *picked_ids(topk, raw.sample_user, raw.hist_items, raw.hist_cates))

    def over(self, batches: Iterable[Union[GsuBatch, Packed, SlotRef]]) -> Iterator[Batch]:
        """Apply to every batch of a loader, in the calling thread."""
        for raw in batches:
            yield self(raw)

    def ahead(self, batches: Iterable[Union[GsuBatch, Packed, SlotRef]], depth: int = 2,
              router: Optional[Callable[..., Routing]] = None) -> "GsuAhead":
        """Apply to every batch of a loader in a background thread, ``depth`` batches ahead; with
        ``router``, then route each batch's ids in a second one (``data.routing``)."""
        return GsuAhead(self, batches, depth, router)


_END = object()


class GsuAhead:
    """``DeviceGsu`` over a loader in a background thread (on CUDA: on its own stream), ``depth``
    batches ahead of the consumer; batches come out in loader order, errors are raised in order.

    Why: the GSU's launches (a graph replay and its copies, or dozens of small kernels eagerly) are
    host time, and the training thread is host-bound. PyTorch releases the GIL while it launches an
    op, so the thread overlaps part of that time with the training step's own launches (measured
    0.98-1.11x end to end against the training thread, benchmarks/RESULTS.md rows 16, 20, 21, 25).
    On CUDA each batch carries an event recorded after its GSU, for which the consumer's stream waits;
    the thread that made the batch has already recorded its memory as used on that stream (the
    stream current where the iteration starts: use the batches there). Why there: each
    ``record_stream`` lets the GIL go, and the training thread, which would otherwise make one for
    every tensor of every batch, then waits to take it back from this thread (benchmarks/RESULTS.md
    row 106; end to end not separated from recording in the training thread, row 109).

    Each batch is drawn and made holding ``cuda_graphs.CAPTURE_LOCK``: the training thread's graph
    captures fail if this thread allocates or synchronises meanwhile.

    ``router``: each batch's ids are then routed over the ranks (``data.routing``: the exchanges and
    their read-backs off the training thread) in a second thread, on a stream of its own, while the
    first makes the next batch: a routing spends most of its time waiting, for its copies and for
    the other ranks' routers, and the two threads overlap those waits with the GSU. The router holds
    the lock only while it calls CUDA, not while it waits for the other ranks. The two threads share
    it (only captures keep them out): when each kept the other out, the proxy of 2 ranks ran 0.92x
    end to end (benchmarks/RESULTS.md row 132). Every rank's threads
    must route the same number of batches: give it exactly the batches to be trained.
    """

    def __init__(self, gsu: DeviceGsu, batches: Iterable[Union[GsuBatch, Packed, SlotRef]], depth: int = 2,
                 router: Optional[Callable[..., Routing]] = None) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.gsu, self.batches, self.depth, self.router = gsu, batches, depth, router

    def _stream(self) -> Optional[torch.cuda.Stream]:
        with CAPTURE_LOCK:
            return torch.cuda.Stream(self.gsu.device) if self.gsu.device.type == "cuda" else None

    def _made(self, source: Iterator, used_on: Optional[torch.cuda.Stream],
              stream: Optional[torch.cuda.Stream]) -> object:
        """The next batch of ``source`` with its GSU (``_END`` after the last), and its event; its
        memory recorded as used on ``used_on`` (None: not recorded here)."""
        with CAPTURE_LOCK:
            raw = next(source, _END)
            return raw if raw is _END else _recorded(self.gsu(raw), stream, used_on)

    def _routed(self, inbox: "queue.Queue", stop: threading.Event, used_on: Optional[torch.cuda.Stream],
                stream: Optional[torch.cuda.Stream]) -> object:
        """The next batch of ``inbox`` (the GSU's thread's) with its routing (``_END`` after the last),
        and its event; its memory recorded as used on ``used_on``."""
        item = _get(inbox, stop)
        if item is _END or isinstance(item, BaseException):
            return item
        batch, event = item
        with CAPTURE_LOCK:
            # The router reads the sparse features alone: only theirs is recorded as used on its
            # stream (the batch's ~30 tensors each let the GIL go: benchmarks/RESULTS.md row 106).
            _wait_for(batch.sparse_features, event, stream)
        routing = self.router(batch.sparse_features, cuda_calls=CAPTURE_LOCK)
        with CAPTURE_LOCK:
            return _recorded(replace(batch, routing=routing), stream, used_on)

    def __iter__(self) -> Iterator[Batch]:
        stop = threading.Event()
        consumer = torch.cuda.current_stream(self.gsu.device) if self.gsu.device.type == "cuda" else None
        made: queue.Queue = queue.Queue(maxsize=self.depth)
        # The last stage records each batch as used on the consumer's stream.
        stages = [("gsu-ahead", partial(self._made, iter(self.batches), consumer if self.router is None else None),
                   made)]
        out = made
        if self.router is not None:
            out = queue.Queue(maxsize=self.depth)
            stages.append(("route-ahead", partial(self._routed, made, stop, consumer), out))
        threads = [threading.Thread(target=_stage, args=(next_item, self._stream(), queue_, stop), daemon=True,
                                    name=name) for name, next_item, queue_ in stages]
        with started_elsewhere():  # off the training thread's step core (train.step_core)
            for thread in threads:
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
                    consumer.wait_event(event)
                yield batch
        finally:
            stop.set()
            for thread in threads:
                thread.join()


def _recorded(batch: Batch, stream: Optional[torch.cuda.Stream],
              used_on: Optional[torch.cuda.Stream]) -> Tuple[Batch, Optional[torch.cuda.Event]]:
    """``batch`` and, on CUDA, an event recorded on ``stream``, where its work was launched; its
    memory recorded as used on ``used_on`` (the stream that will read it), unless None."""
    if stream is None:
        return batch, None
    if used_on is not None:
        batch.record_stream(used_on)
    event = torch.cuda.Event()
    event.record(stream)
    return batch, event


def _wait_for(used: Pipelineable, event: Optional[torch.cuda.Event], stream: Optional[torch.cuda.Stream]) -> None:
    """``stream`` waits for the work that made ``used`` (``event``) and records its memory as used there."""
    if event is not None:
        stream.wait_event(event)
        used.record_stream(stream)


def _put(out: "queue.Queue", item: object, stop: threading.Event) -> bool:
    """Put ``item`` unless the consumer stopped first; whether it was put."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(inbox: "queue.Queue", stop: threading.Event) -> object:
    """The next item of ``inbox``; ``_END`` once the consumer stopped."""
    while not stop.is_set():
        try:
            return inbox.get(timeout=0.1)
        except queue.Empty:
            continue
    return _END


def _stage(next_item: Callable[[Optional[torch.cuda.Stream]], object], stream: Optional[torch.cuda.Stream],
           out: "queue.Queue", stop: threading.Event) -> None:
    """A thread's loop: ``next_item(stream)`` on ``stream`` into ``out`` until it gives ``_END``,
    raises or returns an error (handed on, raised by the consumer in order), or the consumer stops."""
    try:
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            while True:
                item = next_item(stream)
                if isinstance(item, BaseException):
                    raise item
                if item is _END:
                    break
                if not _put(out, item, stop):
                    return
    except BaseException as error:  # handed to the consumer, raised there in order
        _put(out, error, stop)
        return
    _put(out, _END, stop)
