"""Each id of a batch sent to the rank that holds its row, by the data path, ahead of the training step.

With row-wise tables over W ranks, every step first sends each id to the rank holding its row and
later sends the looked-up rows back. TorchRec does the first part (its input distribution) inside
the model's forward: a bucketisation, the counts', lengths' and ids' all-to-alls, and a read-back
of the counts that holds the training thread until the GPU and the other ranks have caught up. At
1,000 samples per GPU the step is bound by host time, so that work and that wait are most of what
two GPUs add to one (benchmarks/RESULTS.md rows 70, 78).

``RowWiseRouter`` does the first part in the data path ahead of the step instead (a thread of its
own beside the device GSU's, ``device_gsu.GsuAhead``), the exchanges through the host over a gloo
group of its own (never the training's group: collectives
of one group must come in the same order on every rank, and two threads would interleave them). It
attaches a ``Routing`` to the batch: the ids this rank looks up for every rank, the orders to put
the rows back, and the counts, as host integers, that the rows' all-to-all needs, so the training
thread runs that all-to-all (``direct_lookup.RoutedLookup``) without reading anything back.

Given the most ids a sample holds, the router also lays the rows' all-to-all out in fixed shapes
(``FixedExchange``): every rank sends every rank C rows, padded with a zero row, so the training
step can replay it inside its CUDA graph (``MuseTrain``'s exchanged graphs) instead of launching it,
its gathers and their backward from the host every step. Each rank sends its largest count with
its lengths, so every rank sees every rank's and decides alike: C from the first batch
(``peer_capacity``), and whether a batch fits it; a batch that does not, on any rank, goes through
the launched all-to-all on every rank.

With ``unique_ids`` (``train.route_unique_ids``) the router sends each id once per feature: a batch
holds every user's samples together, so its top-K and recent ids repeat (on the benchmarks' batches
210 k ids, 19 k of them distinct per feature). Every id of the batch then reads its feature's one
row, and the step's gathers sum the gradients of its repeats before the rows' gradients go back;
the exchanges, the lookups and the fixed exchange's C shrink as much, and no rank receives more for
holding the most popular rows than their one copy. The deduplication (a sort of the batch's ids on
its device, and a wait for its count) costs the router's thread ~0.5 ms a batch, which on one H100
outweighed the gain end to end (benchmarks/RESULTS.md row 131): off by default.

Every rank must route the same number of batches, in the same order (the trainer routes an epoch's
training batches, whose count is equal on every rank): a rank's router waits in each exchange for
every other rank's.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from typing import ContextManager, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def in_order(features: KeyedJaggedTensor, names: Sequence[str]) -> KeyedJaggedTensor:
    """``features`` with its keys in the order ``names`` (batches are built so: then as given)."""
    keys = features.keys()
    if keys == list(names):
        return features
    if sorted(keys) != sorted(names):
        raise ValueError(f"sparse features {keys} are not the embedding collection's features {list(names)}")
    return features.permute([keys.index(name) for name in names])


# A fixed exchange holds this many times the first batch's largest count from one rank to another
# by default (``train.exchange_slack``): room for batches whose ids crowd one rank's rows more
# (popular items: on Zipf-like ids the rank holding the most popular rows receives well above its
# even share).
PEER_SLACK = 1.25

# The router's deduplication keys each (feature, id) as feature * 2**40 + id: ids must stay below
# 2**40, a trillion rows.
_ID_BITS = 40


def check_slack(slack: float) -> None:
    """ValueError unless ``slack`` leaves the first batch room: at least 1."""
    if not slack >= 1.0:
        raise ValueError(f"the fixed exchange's slack must be at least 1 (the first batch must fit), not {slack}")


def peer_capacity(largest: int, batch_ids: int, slack: float = PEER_SLACK) -> int:
    """Rows one rank sends another in a fixed exchange, from the first batch's largest count from
    one rank to another: ``slack`` times it, but no more than a whole batch of at most
    ``batch_ids`` ids (which never overflows, e.g. on one rank). ``slack``: checked by its router
    (``check_slack``)."""
    return min(batch_ids, math.ceil(slack * largest))


@dataclass
class FixedExchange:
    """A routed batch's rows' all-to-all in fixed shapes: every rank sends every rank C rows.

    Attributes:
        peer_capacity: C.
        send_slots: [W * C] int64, for each row sent (rank after rank, C each), its position among
            the rows this rank looked up (``Routing.read``'s order), padding: W * C, a zero row
            past them.
        row_slots: [W * C + 1] int64, the inverse: for each row this rank looked up, then each zero
            row past them, its place among the rows sent (W * C, a slot past them, for the zero
            rows). The exchange scatters through both (one thread an element) rather than gather
            through either (a block a row: 130 us for 210 k rows of 16 floats on an H100).
        order: [capacity + 1] int64 (``RowLayout.capacity`` of the batch's B samples), for each of
            the batch's ids (feature, sample) the position of its row among the rows received (rank
            after rank, C each), then W * C (a zero row past them) for the rest:
            ``row_layout.padded_slots``' order.
    """

    peer_capacity: int
    send_slots: torch.Tensor
    row_slots: torch.Tensor
    order: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "FixedExchange":
        return FixedExchange(self.peer_capacity, *(t.to(device, non_blocking=non_blocking) for t in self._tensors()))

    def record_stream(self, stream: torch.Stream) -> None:
        for tensor in self._tensors():
            tensor.record_stream(stream)

    def _tensors(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.send_slots, self.row_slots, self.order


@dataclass
class Routing:
    """Where a batch's ids are looked up over W ranks, and how their rows come back.

    Attributes:
        read: KJT of the ids this rank looks up (local to its rows), feature-major: per feature the
            ids of every rank's batch, source rank after source rank (stride W * B; with
            ``unique_ids`` a rank's distinct ids of a feature spread over its B bags).
        as_received: [n_read] for each row in the order the ranks sent the ids (source, feature,
            sample), its position in ``read``.
        as_read: [n_read] for each id of ``read``, its position in the order the ranks sent them
            (the inverse of ``as_received``: the rows' gradients come back through it).
        restore: [n] for each of the batch's ids (feature, sample), its position among the rows
            coming back (holding rank, feature, sample); ids sent once (``unique_ids``) share one.
        sent: ids sent to each rank [W]; received: ids received from each rank [W] (host integers).
        batch_size: B.
        fixed: the rows' all-to-all in fixed shapes, where the router lays it out and the batch fits
            on every rank; else None.
    """

    read: KeyedJaggedTensor
    as_received: torch.Tensor
    as_read: torch.Tensor
    restore: torch.Tensor
    sent: List[int]
    received: List[int]
    batch_size: int
    fixed: Optional[FixedExchange] = None

    def to(self, device: torch.device, non_blocking: bool = False) -> "Routing":
        return Routing(self.read.to(device, non_blocking=non_blocking),
                       self.as_received.to(device, non_blocking=non_blocking),
                       self.as_read.to(device, non_blocking=non_blocking),
                       self.restore.to(device, non_blocking=non_blocking), self.sent, self.received, self.batch_size,
                       None if self.fixed is None else self.fixed.to(device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        self.read.record_stream(stream)
        self.as_received.record_stream(stream)
        self.as_read.record_stream(stream)
        self.restore.record_stream(stream)
        if self.fixed is not None:
            self.fixed.record_stream(stream)

    def device(self) -> torch.device:
        return self.as_received.device


class RowWiseRouter:
    """``features -> Routing`` for row-wise tables over ``group``'s W ranks.

    Where the batch is (the GPU with the device GSU), it bucketises the ids and orders what it
    receives; only the exchanges go through the host (gloo). On the host the bucketisation alone
    took ~7 ms a batch of 1,000 samples (210 k ids, one core), longer than a training step.

    Args:
        feature_names: the features the sharded lookup reads, in its order (F of them).
        block_sizes: rows per rank of each feature's table [F]: rank r holds rows
            [r * size, (r + 1) * size) (TorchRec's row-wise blocks).
        group: a gloo group of the W ranks, used by this router alone.
        ids_per_sample: the most ids a sample holds over the features (``RowLayout.capacity(1)``):
            with it, every routing that fits also lays the rows' all-to-all out in fixed shapes
            (``Routing.fixed``), C rows per pair of ranks, C set by the first routing
            (``peer_capacity``; every rank must route the same first batch of the run).
        slack: C's room over the first batch's largest count (``peer_capacity``).
        unique_ids: send each id once per feature (ids below 2**40; the module docstring says why).
    """

    def __init__(self, feature_names: Sequence[str], block_sizes: Sequence[int], group: dist.ProcessGroup,
                 ids_per_sample: Optional[int] = None, slack: float = PEER_SLACK, unique_ids: bool = False) -> None:
        if len(feature_names) != len(block_sizes):
            raise ValueError(f"{len(feature_names)} features, {len(block_sizes)} block sizes")
        if ids_per_sample is not None and ids_per_sample < 1:
            raise ValueError(f"ids_per_sample must be positive, not {ids_per_sample}")
        check_slack(slack)
        self.world_size = dist.get_world_size(group)
        if unique_ids and max(block_sizes, default=0) * self.world_size > 1 << _ID_BITS:
            raise ValueError(f"unique_ids: the router keys ids below 2**{_ID_BITS}, not tables of "
                             f"{max(block_sizes) * self.world_size} rows")
        self.feature_names = list(feature_names)
        self.group = group
        self.ids_per_sample, self.slack, self.unique_ids = ids_per_sample, slack, unique_ids
        self.fixed_capacity: Optional[int] = None
        count, ranks = len(self.feature_names), self.world_size
        self._block_sizes = torch.tensor(block_sizes, dtype=torch.int64)
        # Received ids come (source rank, feature); the lookup reads them feature-major.
        self._feature_major = torch.tensor([r * count + f for f in range(count) for r in range(ranks)],
                                           dtype=torch.int32)

    def _exchange(self, out: torch.Tensor, tensor: torch.Tensor, received: List[int], sent: List[int]) -> None:
        """``tensor``'s parts to the ranks, theirs into ``out`` (host tensors: no CUDA call)."""
        dist.all_to_all_single(out, tensor, output_split_sizes=received, input_split_sizes=sent, group=self.group)

    def __call__(self, features: KeyedJaggedTensor,
                 cuda_calls: ContextManager = contextlib.nullcontext()) -> Routing:
        """``features``: KJT of B samples (every key the same B) on any device; the routing comes on
        that device. ``cuda_calls``: held around every part that calls CUDA (launches, allocations,
        the one wait), not around the exchanges, which wait for the other ranks: the data path's
        thread passes ``cuda_graphs.CAPTURE_LOCK``, which a graph capture holds, so that its batches
        are made meanwhile."""
        if features.variable_stride_per_key():
            raise ValueError("RowWiseRouter: features with a batch size per key are not supported")
        device, batch, ranks, count = features.values().device, features.stride(), self.world_size, len(self.feature_names)
        # The exchanges go through the host; on a GPU through page-locked memory.
        pinned = device.type == "cuda"
        with cuda_calls:
            sent_features, inverse = in_order(features, self.feature_names), None
            if self.unique_ids:
                sent_features, inverse = self._distinct(sent_features)
            bucket_lengths, ids, restore = self._bucketised(sent_features)
            if inverse is not None:
                restore = restore.index_select(0, inverse)
            received = torch.empty((ranks, 1 + count * batch), dtype=bucket_lengths.dtype, pin_memory=pinned)
        # Each rank's lengths (F * B per rank), after its largest count to any rank: every rank then
        # knows every rank's, so all decide alike whether the batch fits a fixed exchange.
        sent = bucket_lengths.view(ranks, -1).sum(1)
        largest_sent = sent.max().to(bucket_lengths.dtype).expand(ranks, 1)
        outgoing = torch.cat([largest_sent, bucket_lengths.view(ranks, -1)], 1)
        self._exchange(received.view(-1), outgoing.view(-1), [1 + count * batch] * ranks,
                       [1 + count * batch] * ranks)
        received_lengths = received[:, 1:]
        sent_list, received_list = sent.tolist(), received_lengths.sum(1).tolist()
        largest = int(received[:, 0].max())
        with cuda_calls:
            received_ids = torch.empty(sum(received_list), dtype=ids.dtype, pin_memory=pinned)
        self._exchange(received_ids, ids, received_list, sent_list)
        # The ids per key as host numbers: the lookup would otherwise read them back from the device.
        length_per_key = received_lengths.reshape(ranks, count, batch).sum((0, 2)).tolist()
        with cuda_calls:
            routing = self._read(received.to(device, non_blocking=True)[:, 1:],
                                 received_ids.to(device, non_blocking=True), length_per_key, restore, sent_list,
                                 received_list, batch)
            if self.ids_per_sample is not None:
                batch_ids = self.ids_per_sample * batch
                if self.fixed_capacity is None:
                    self.fixed_capacity = peer_capacity(largest, batch_ids, self.slack)
                if largest <= self.fixed_capacity:
                    routing.fixed = self._fixed(routing, self.fixed_capacity, batch_ids)
            # Page-locked blocks go back to their cache (which records events) here, not after.
            del bucket_lengths, ids, received, received_lengths, received_ids
        return routing

    def _distinct(self, features: KeyedJaggedTensor) -> Tuple[KeyedJaggedTensor, torch.Tensor]:
        """-> (each feature's distinct ids, ascending, in the batch's B bags (as evenly as they go:
        the kernels that bucketise, permute and look ids up run a thread or a warp a bag), for each of
        the batch's ids the position of its own among them [n]), on the batch's device: one sort of
        (feature, id) keys, and one wait, for how many are distinct."""
        values, count, batch = features.values(), len(self.feature_names), features.stride()
        device = values.device
        feature_keys = torch.arange(count, device=device).bitwise_left_shift_(_ID_BITS)
        keys = feature_keys.repeat_interleave(batch).repeat_interleave(
            features.lengths(), output_size=values.numel()).add_(values)
        distinct, inverse = torch.unique(keys, return_inverse=True)
        ends = torch.searchsorted(distinct, feature_keys + (1 << _ID_BITS))  # each feature's last key + 1
        per_feature = ends.diff(prepend=ends.new_zeros(1)).unsqueeze(1)  # [F, 1]
        lengths = per_feature // batch + (torch.arange(batch, device=device) < per_feature % batch)
        return KeyedJaggedTensor(keys=self.feature_names, values=distinct.bitwise_and_((1 << _ID_BITS) - 1),
                                 lengths=lengths.view(-1), stride=batch), inverse

    def _bucketised(self, features: KeyedJaggedTensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (lengths [W * F * B] and ids (holding rank, feature, sample), each local to its rank's
        rows, on the host (waited for); for each of the batch's ids, its position among them [n])."""
        values = features.values()
        device = values.device
        if self._block_sizes.device != device or self._block_sizes.dtype != values.dtype:
            self._block_sizes = self._block_sizes.to(device, values.dtype)  # once, not a copy a batch
            self._feature_major = self._feature_major.to(device)
        bucket_lengths, ids, _, _, restore = torch.ops.fbgemm.block_bucketize_sparse_features(
            features.lengths(), values, bucketize_pos=False, sequence=True, block_sizes=self._block_sizes,
            my_size=self.world_size, weights=None)
        pinned = device.type == "cuda"
        bucket_lengths, ids = _to_host(bucket_lengths, pinned), _to_host(ids, pinned)
        if pinned:  # one wait for both copies
            torch.cuda.current_stream(device).synchronize()
        return bucket_lengths, ids, restore

    def _read(self, received_lengths: torch.Tensor, received_ids: torch.Tensor, length_per_key: List[int],
              restore: torch.Tensor, sent: List[int], received: List[int], batch: int) -> Routing:
        """The routing from what this rank received (on the batch's device): lengths [W, F * B] and
        ids (source rank, feature, sample)."""
        ranks, count = self.world_size, len(self.feature_names)
        total = received_ids.numel()
        positions = torch.arange(total, device=received_ids.device)
        read_lengths, order, _ = torch.ops.fbgemm.permute_2D_sparse_data(
            self._feature_major, received_lengths.reshape(ranks * count, batch), positions,
            permuted_lengths_sum=total)  # known here: not read back
        read = KeyedJaggedTensor(keys=self.feature_names, values=received_ids.index_select(0, order),
                                 lengths=read_lengths.view(-1), stride=ranks * batch, length_per_key=length_per_key)
        as_received = torch.empty_like(order).scatter_(0, order, positions)
        return Routing(read, as_received, order, restore, sent, received, batch)

    def _fixed(self, routing: Routing, capacity: int, batch_ids: int) -> FixedExchange:
        """``routing``'s rows' all-to-all laid out for ``capacity`` rows from every rank to every rank,
        its order for a batch of at most ``batch_ids`` ids."""
        device, slots = routing.device(), self.world_size * capacity
        # The rows this rank sends (as its ids were received), then the rows coming back to it (as
        # its ids were sent): both in one pass, a dozen launches a batch fewer.
        sends, returns = _padded_positions(routing.received + routing.sent, capacity, self.world_size,
                                           device).split([routing.as_received.numel(), sum(routing.sent)])
        # Every place not written below holds W * C, past the rows on either side: a zero row, or a slot not sent.
        send_slots, row_slots, order = torch.full((2 * slots + batch_ids + 2,), slots, dtype=torch.int64,
                                                  device=device).split([slots, slots + 1, batch_ids + 1])
        send_slots.index_copy_(0, sends, routing.as_received)
        row_slots.index_copy_(0, routing.as_received, sends)
        torch.index_select(returns, 0, routing.restore, out=order[:routing.restore.numel()])
        return FixedExchange(capacity, send_slots, row_slots, order)


def _padded_positions(counts: List[int], capacity: int, world_size: int, device: torch.device) -> torch.Tensor:
    """For rows that come part after part, ``counts[i]`` in part i (P parts, P a multiple of W, part
    i from or to rank i mod W), each row's place when every rank takes ``capacity`` places:
    (i mod W) * capacity + its index in its part [sum(counts)] int64 on ``device``.

    Each part's shift is a host number, and the counts and shifts reach the device in one copy
    that does not wait (a copy from a Python list would wait for the device's queue: ~1 ms a batch
    on one H100 shared by 2 ranks); three launches then place every row."""
    starts = [0, *itertools.accumulate(counts)]
    shifts = [(i % world_size) * capacity - start for i, start in enumerate(starts[:-1])]
    host = torch.tensor(counts + shifts, pin_memory=device.type == "cuda")
    part_counts, part_shifts = host.to(device, non_blocking=True).split(len(counts))
    total = starts[-1]
    return torch.arange(total, device=device).add_(part_shifts.repeat_interleave(part_counts, output_size=total))


def _to_host(tensor: torch.Tensor, pinned: bool) -> torch.Tensor:
    """``tensor`` on the host: with ``pinned``, copied into page-locked memory without waiting (the
    caller waits once for every copy)."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned)
    return host.copy_(tensor, non_blocking=pinned)
