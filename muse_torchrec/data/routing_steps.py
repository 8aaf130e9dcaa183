"""The router's tensor work (``data.routing.RowWiseRouter``), as functions TorchScript compiles.

Why scripted: the router runs in a thread of the training process beside the device GSU's thread and
the training step, all three bound by host time. Every PyTorch op called from Python lets the GIL
go and takes it back, so each of the router's ~45 ops a batch can wait for another thread to hand
the GIL over. A scripted function runs its ops in TorchScript's interpreter with the GIL released
throughout: a routing then takes the GIL a handful of times instead of once an op. ``scripted()``
gives them compiled (once a process), ``EAGER`` the same functions run as Python: the plain
reference the tests compare them with.

Each function's ops are those the router ran inline before; the exchanges between ranks, the
waits and the ``KeyedJaggedTensor`` stay in the router (Python objects TorchScript does not take).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable, List, Tuple

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm, which scripting resolves)
import torch

# The deduplication keys each (feature, id) as feature * 2**40 + id: ids must stay below 2**40, a
# trillion rows.
ID_BITS = 40


def distinct(values: torch.Tensor, lengths: torch.Tensor, count: int, batch: int,
             id_bits: int = ID_BITS) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A KJT's (``values`` [n], ``lengths`` [F * B], F = ``count``, B = ``batch``) distinct ids per
    feature, ascending, spread over the B bags as evenly as they go -> (values [m], lengths [F * B],
    for each of the n ids the position of its own among the m [n]): one sort of (feature, id) keys,
    ids below 2**``id_bits`` (TorchScript takes no global as a value: hence the argument); waits for
    the device (how many are distinct)."""
    device = values.device
    feature_keys = torch.arange(count, device=device).bitwise_left_shift_(id_bits)
    keys = feature_keys.repeat_interleave(batch).repeat_interleave(lengths, output_size=values.numel()).add_(values)
    unique, inverse = torch.unique(keys, return_inverse=True)
    ends = torch.searchsorted(unique, feature_keys + (1 << id_bits))  # each feature's last key + 1
    per_feature = ends.diff(prepend=ends.new_zeros(1)).unsqueeze(1)  # [F, 1]
    spread = per_feature // batch + (torch.arange(batch, device=device) < per_feature % batch)
    return unique.bitwise_and_((1 << id_bits) - 1), spread.view(-1), inverse


def to_host(tensor: torch.Tensor, pinned: bool) -> torch.Tensor:
    """``tensor`` on the host: with ``pinned``, copied into page-locked memory without waiting (the
    caller waits once for every copy)."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned)
    return host.copy_(tensor, non_blocking=pinned)


def bucketised(lengths: torch.Tensor, values: torch.Tensor, block_sizes: torch.Tensor, world_size: int,
               pinned: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A KJT's ids (``values``, ``lengths`` [F * B]) bucketised by holding rank, rank r holding rows
    [r * size, (r + 1) * size) of feature f (``block_sizes`` [F], on the ids' device and dtype) ->
    (lengths [W * F * B] and ids (holding rank, feature, sample), each local to its rank's rows,
    copied to the host (not waited for: the caller waits for the stream); for each id, its position
    among them [n])."""
    bucket_lengths, ids, _, _, restore = torch.ops.fbgemm.block_bucketize_sparse_features(
        lengths, values, bucketize_pos=False, sequence=True, block_sizes=block_sizes, my_size=world_size,
        weights=None)
    assert restore is not None  # sequence=True returns it
    return to_host(bucket_lengths, pinned), to_host(ids, pinned), restore


def lengths_to_send(bucket_lengths: torch.Tensor, world_size: int,
                    pinned: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the host's bucketised lengths [W * F * B]: (ids sent to each rank [W], what the lengths'
    exchange sends, each rank's part its largest count to any rank then its lengths [W * (1 + F * B)],
    an empty buffer of that shape for what it receives [W, 1 + F * B])."""
    per_rank = bucket_lengths.view(world_size, -1)
    sent = per_rank.sum(1)
    largest = sent.max().to(bucket_lengths.dtype).expand(world_size, 1)
    outgoing = torch.cat([largest, per_rank], 1)
    received = torch.empty(outgoing.shape, dtype=outgoing.dtype, pin_memory=pinned)
    return sent, outgoing.view(-1), received


def read_order(received: torch.Tensor, received_ids: torch.Tensor, device: torch.device,
               feature_major: torch.Tensor, world_size: int, count: int,
               batch: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a rank received (host: ``received`` [W, 1 + F * B], each rank's largest count then its
    lengths; ``received_ids`` (source rank, feature, sample)) on ``device``, read feature-major ->
    (the ids [n_read], their lengths [F * W * B], for each of them its position as received [n_read],
    for each as received its position among them [n_read]). ``feature_major`` [W * F] int32: the
    (source, feature) parts in the order read."""
    lengths = received.to(device, non_blocking=True)[:, 1:]
    ids = received_ids.to(device, non_blocking=True)
    total = ids.numel()
    positions = torch.arange(total, device=device)
    read_lengths, order, _ = torch.ops.fbgemm.permute_2D_sparse_data(
        feature_major, lengths.reshape(world_size * count, batch), positions, None, total)  # the sum: not read back
    as_received = torch.empty_like(order).scatter_(0, order, positions)
    return ids.index_select(0, order), read_lengths.view(-1), order, as_received


def padded_positions(counts: List[int], capacity: int, world_size: int, device: torch.device) -> torch.Tensor:
    """For rows that come part after part, ``counts[i]`` in part i (P parts, P a multiple of W, part
    i from or to rank i mod W), each row's place when every rank takes ``capacity`` places:
    (i mod W) * capacity + its index in its part [sum(counts)] int64 on ``device``.

    Each part's shift is a host number, and the counts and shifts reach the device in one copy
    that does not wait (a copy from a Python list would wait for the device's queue: ~1 ms a batch
    on one H100 shared by 2 ranks); three launches then place every row."""
    shifts: List[int] = []
    total = 0
    for part, part_count in enumerate(counts):
        shifts.append((part % world_size) * capacity - total)
        total += part_count
    host = torch.tensor(counts + shifts)
    if device.type == "cuda":
        host = host.pin_memory()
    on_device = host.to(device, non_blocking=True)
    part_counts, part_shifts = on_device[:len(counts)], on_device[len(counts):]
    return torch.arange(total, device=device).add_(part_shifts.repeat_interleave(part_counts, output_size=total))


def fixed_layout(received: List[int], sent: List[int], capacity: int, world_size: int, as_received: torch.Tensor,
                 restore: torch.Tensor, batch_ids: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A routing's rows' all-to-all with ``capacity`` rows from every rank to every rank (ids received
    from and sent to each rank: ``received``, ``sent`` [W]; ``as_received`` and ``restore`` as in
    ``routing.Routing``) -> ``routing.FixedExchange``'s send_slots, row_slots and order (for a batch
    of at most ``batch_ids`` ids)."""
    device, slots = as_received.device, world_size * capacity
    # The rows this rank sends (as its ids were received), then the rows coming back to it (as its
    # ids were sent): both in one pass, a dozen launches a batch fewer.
    positions = padded_positions(received + sent, capacity, world_size, device)
    sends, returns = positions[:as_received.numel()], positions[as_received.numel():]
    # Every place not written below holds W * C, past the rows on either side: a zero row, or a slot not sent.
    parts = torch.full((2 * slots + batch_ids + 2,), slots, dtype=torch.int64,
                       device=device).split([slots, slots + 1, batch_ids + 1])
    send_slots, row_slots, order = parts[0], parts[1], parts[2]
    send_slots.index_copy_(0, sends, as_received)
    row_slots.index_copy_(0, as_received, sends)
    torch.index_select(returns, 0, restore, out=order[:restore.numel()])
    return send_slots, row_slots, order


@dataclass(frozen=True)
class RoutingSteps:
    """The router's tensor work, each step one call (see the module docstring)."""

    distinct: Callable
    bucketised: Callable
    lengths_to_send: Callable
    read_order: Callable
    fixed_layout: Callable


EAGER = RoutingSteps(distinct, bucketised, lengths_to_send, read_order, fixed_layout)


def _unoptimised(function: Callable) -> Callable:
    """``function`` run by TorchScript's plain executor: its profiling executor would specialise the
    graph to each batch's sizes and fuse on the GPU, compiling again as the sizes change. The
    setting is the calling thread's own."""
    @functools.wraps(function)
    def run(*args):
        with torch.jit.optimized_execution(False):
            return function(*args)
    return run


@functools.lru_cache(maxsize=None)
def scripted() -> RoutingSteps:
    """``EAGER``'s functions compiled by TorchScript, once a process."""
    with warnings.catch_warnings():
        # torch.jit.script is deprecated in favour of torch.compile, whose generated code launches
        # its kernels from Python, holding the GIL: the point here is to let it go.
        warnings.simplefilter("ignore", DeprecationWarning)
        return RoutingSteps(*(_unoptimised(torch.jit.script(step)) for step in
                              (distinct, bucketised, lengths_to_send, read_order, fixed_layout)))
