"""Prepared shards -> SampleBlocks, vectorised, spread over ranks and DataLoader workers.

Work units are the shards' chunks (aligned row groups of a shard's samples and users files, see
prepare.py). They are dealt to the ``world_size x num_workers`` consumers from metadata alone,
largest first to the least-loaded consumer, so every sample is read exactly once over all
(rank, worker) pairs and ``count_batches`` knows each rank's number of blocks without reading data.
The deal does not depend on the seed (so ``count_batches`` needs none); consumer c = rank x
num_workers + worker_id. Each consumer cuts its units' samples into blocks of ``batch_size``
(blocks span unit boundaries; only a consumer's last block may be short).

Order: deterministic for a seed. Without shuffle, units are read in shard/chunk order and samples
in prepared order. With shuffle, a consumer permutes the order of its units and, inside each unit,
the order of users (seeded by seed and the unit, so a unit reads the same whichever consumer has
it). A user's samples stay together: they share the user's lists, which a block then holds once,
and that sharing is what makes the layout cheap (DESIGN.md). Pass ``seed + epoch`` for a new order
each epoch.
"""

from __future__ import annotations

import functools
import gc
import heapq
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from muse_torchrec import features as F
from muse_torchrec.data.affinity import started_elsewhere
from muse_torchrec.data.block import SampleBlock
from muse_torchrec.data.integrity import (
    FLOAT,
    INTEGER,
    INTEGER_LIST,
    ChunkChecker,
    ColumnKind,
    PreparedDataError,
    check_columns,
    read_row_group,
)
from muse_torchrec.data.prepare import (
    FORMAT_VERSION,
    HIST_CATES,
    HIST_ITEMS,
    ITEM_SCL_ROW_FILE,
    LABEL,
    META_FILE,
    PROB,
    SCL_FILE,
    TARGET_TABLES,
    USER_INDEX,
    USER_KEY,
    USER_TABLES,
    VOCAB_DIR,
    list_parts,
    ragged_index,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """A shard's two files and the sizes of its chunks (row group g of both files = chunk g)."""

    samples_file: Path
    users_file: Path
    chunk_samples: Tuple[int, ...]
    chunk_users: Tuple[int, ...]


@dataclass(frozen=True)
class WorkUnit:
    """One chunk of one shard of a split."""

    shard: int
    chunk: int
    num_samples: int


class PreparedData:
    """A prepared dir (see prepare.py): metadata, vocabularies, SCL table and shard list."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_file = self.path / META_FILE
        if not meta_file.is_file():
            raise PreparedDataError(
                f"{self.path} is not a complete prepared dir (no {META_FILE}); run `muse-torchrec prepare`"
            )
        self.meta: dict = json.loads(meta_file.read_text())
        version = self.meta.get("format_version")
        if version != FORMAT_VERSION:
            raise PreparedDataError(
                f"{self.path} has prepared format version {version}, this code reads {FORMAT_VERSION}; "
                "prepare it again"
            )

    def vocab_size(self, table: str) -> int:
        """Rows of ``table``'s embedding, row 0 (padding / unknown) included."""
        sizes = self.meta["vocab_sizes"]
        if table not in sizes:
            raise KeyError(f"no vocabulary for table {table!r}; known: {sorted(sizes)}")
        return int(sizes[table])

    def vocab(self, table: str) -> np.ndarray:
        """[vocab_size - 1] int64 sorted raw ids; raw id ``vocab[i]`` has row i + 1."""
        self.vocab_size(table)
        return np.load(self.path / VOCAB_DIR / f"{table}.npy")

    def scl_vectors(self) -> np.ndarray:
        """Memory-mapped [S + 1, 128] int8 SCL table (row 0 zeros)."""
        return np.load(self.path / SCL_FILE, mmap_mode="r")

    def item_scl_row(self) -> np.ndarray:
        """Memory-mapped [V_item] int32: item row -> SCL row (0 = no vector)."""
        return np.load(self.path / ITEM_SCL_ROW_FILE, mmap_mode="r")

    def _split(self, split: str) -> dict:
        splits = self.meta["splits"]
        if split not in splits:
            raise KeyError(f"no split {split!r}; known: {sorted(splits)}")
        return splits[split]

    def num_samples(self, split: str) -> int:
        return int(self._split(split)["samples"])

    def has_truth(self, split: str) -> bool:
        """Whether the split's samples carry true click probabilities (synthetic data)."""
        return bool(self._split(split)["has_truth"])

    def shards(self, split: str) -> List[Shard]:
        return [
            Shard(
                samples_file=self.path / s["samples_file"],
                users_file=self.path / s["users_file"],
                chunk_samples=tuple(c[0] for c in s["chunks"]),
                chunk_users=tuple(c[1] for c in s["chunks"]),
            )
            for s in self._split(split)["shards"]
        ]

    def work_units(self, split: str) -> List[WorkUnit]:
        """Every chunk of the split, in shard/chunk order."""
        return [
            WorkUnit(shard=i, chunk=c, num_samples=n)
            for i, shard in enumerate(self.shards(split))
            for c, n in enumerate(shard.chunk_samples)
        ]


def assign_units(units: Sequence[WorkUnit], consumers: int) -> List[List[WorkUnit]]:
    """Deal units to consumers: largest first, each to the least-loaded consumer (lowest index on
    ties); each consumer's units come back in shard/chunk order."""
    loads = [(0, c) for c in range(consumers)]
    dealt: List[List[WorkUnit]] = [[] for _ in range(consumers)]
    for unit in sorted(units, key=lambda u: -u.num_samples):
        load, consumer = heapq.heappop(loads)
        dealt[consumer].append(unit)
        heapq.heappush(loads, (load + unit.num_samples, consumer))
    return [sorted(d, key=lambda u: (u.shard, u.chunk)) for d in dealt]


def _check_consumer(rank: int, world_size: int, worker_id: int, num_workers: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    if not 0 <= worker_id < num_workers:
        raise ValueError(f"worker_id {worker_id} outside 0..{num_workers - 1}")


def _rank_units(
    data: PreparedData, split: str, rank: int, world_size: int, num_workers: int
) -> List[List[WorkUnit]]:
    """The units of each of ``rank``'s ``num_workers`` consumers."""
    _check_consumer(rank, world_size, 0, num_workers)
    dealt = assign_units(data.work_units(split), world_size * num_workers)
    return dealt[rank * num_workers : (rank + 1) * num_workers]


def count_batches(
    data: PreparedData,
    split: str,
    batch_size: int,
    *,
    rank: int,
    world_size: int,
    num_workers: int = 1,
    drop_last: bool = False,
) -> int:
    """Blocks that rank ``rank`` yields (over all its workers), from metadata only.

    ``num_workers=0`` (in-process loading) counts as one worker, as ``make_loader`` does.
    """
    return sum(_worker_blocks(data, split, batch_size, rank, world_size, num_workers, drop_last))


def _worker_blocks(data: PreparedData, split: str, batch_size: int, rank: int, world_size: int,
                   num_workers: int, drop_last: bool) -> List[int]:
    """Blocks of each of ``rank``'s workers, from metadata only."""
    per_worker = [
        sum(u.num_samples for u in units)
        for units in _rank_units(data, split, rank, world_size, max(num_workers, 1))
    ]
    return [n // batch_size if drop_last else math.ceil(n / batch_size) for n in per_worker]


def worker_skips(counts: Sequence[int], skip: int) -> List[int]:
    """How many of each worker's blocks are among the first ``skip`` that a DataLoader yields.

    The DataLoader takes its workers' outputs in turn and passes over exhausted workers, so round r
    holds block r of every worker that has more than r blocks.
    """
    taken = [0] * len(counts)
    left, round_ = skip, 0
    while left > 0:
        active = [w for w, count in enumerate(counts) if count > round_][:left]
        if not active:
            break
        for w in active:
            taken[w] += 1
        left -= len(active)
        round_ += 1
    return taken


@dataclass
class _Chunk:
    """One work unit in host memory, samples in reading order, a user's samples contiguous.

    Attributes: per sample [n]: labels float32, user_key int64, sample_user int64 (chunk user),
    target table -> int64 rows, prob float32 or None; per user [U]: user_features table -> int64
    rows; hist_offsets [U + 1] int64, hist_items / hist_cates [N] int64.
    """

    labels: np.ndarray
    user_key: np.ndarray
    sample_user: np.ndarray
    target: Dict[str, np.ndarray]
    prob: Optional[np.ndarray]
    user_features: Dict[str, np.ndarray]
    hist_offsets: np.ndarray
    hist_items: np.ndarray
    hist_cates: np.ndarray

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    def reorder(self, order: np.ndarray) -> "_Chunk":
        """The chunk with its samples in ``order`` [n] (users unchanged)."""
        return _Chunk(
            labels=self.labels[order],
            user_key=self.user_key[order],
            sample_user=self.sample_user[order],
            target={k: v[order] for k, v in self.target.items()},
            prob=None if self.prob is None else self.prob[order],
            user_features=self.user_features,
            hist_offsets=self.hist_offsets,
            hist_items=self.hist_items,
            hist_cates=self.hist_cates,
        )

    def block(self, lo: int, hi: int) -> SampleBlock:
        """Samples ``lo:hi`` and their distinct users (each user's lists gathered once)."""
        su = self.sample_user[lo:hi]
        # A user's samples are contiguous, so a new user starts wherever the user index changes.
        starts_user = np.empty(su.shape[0], dtype=bool)
        starts_user[:1] = True
        np.not_equal(su[1:], su[:-1], out=starts_user[1:])
        users = su[starts_user]
        begin = self.hist_offsets[users]
        lengths = self.hist_offsets[users + 1] - begin
        index = ragged_index(begin, lengths)
        return SampleBlock(
            labels=self.labels[lo:hi],
            user_key=self.user_key[lo:hi],
            sample_user=np.cumsum(starts_user) - 1,
            target={k: v[lo:hi] for k, v in self.target.items()},
            user_features={k: v[users] for k, v in self.user_features.items()},
            hist_offsets=np.concatenate([[0], np.cumsum(lengths)]),
            hist_items=self.hist_items[index],
            hist_cates=self.hist_cates[index],
            true_prob=None if self.prob is None else self.prob[lo:hi],
        )


def _column(table: pa.Table, name: str, dtype: type) -> np.ndarray:
    return table.column(name).to_numpy().astype(dtype)


def _sample_kinds(with_prob: bool) -> Dict[str, ColumnKind]:
    kinds = {LABEL: INTEGER, USER_KEY: INTEGER, USER_INDEX: INTEGER, **{t.name: INTEGER for t in TARGET_TABLES}}
    return {**kinds, PROB: FLOAT} if with_prob else kinds


_USER_KINDS: Dict[str, ColumnKind] = {
    **{t.name: INTEGER for t in USER_TABLES}, HIST_ITEMS: INTEGER_LIST, HIST_CATES: INTEGER_LIST
}


def _read_chunk(shard: Shard, chunk: int, with_prob: bool, vocab_sizes: Mapping[str, int], max_history: int) -> _Chunk:
    """Read row group ``chunk`` of the shard's two files into numpy (prepared order), checked."""
    samples = read_row_group(shard.samples_file, chunk)
    users = read_row_group(shard.users_file, chunk)
    check_columns(shard.samples_file, samples, _sample_kinds(with_prob))
    check_columns(shard.users_file, users, _USER_KINDS)
    offsets, items = list_parts(users.column(HIST_ITEMS).combine_chunks())
    cate_offsets, cates = list_parts(users.column(HIST_CATES).combine_chunks())
    first_user = sum(shard.chunk_users[:chunk])
    user_check = ChunkChecker(shard.users_file, first_user)
    num_items, num_cates = np.diff(offsets), np.diff(cate_offsets)
    user_check.where(HIST_CATES, num_cates != num_items,
                     lambda r: f"{num_cates[r]} categories for {num_items[r]} behaviors ({HIST_ITEMS})")
    result = _Chunk(
        labels=_column(samples, LABEL, np.float32),
        user_key=_column(samples, USER_KEY, np.int64),
        sample_user=_column(samples, USER_INDEX, np.int64) - first_user,
        target={t.name: _column(samples, t.name, np.int64) for t in TARGET_TABLES},
        prob=_column(samples, PROB, np.float32) if with_prob else None,
        user_features={t.name: _column(users, t.name, np.int64) for t in USER_TABLES},
        hist_offsets=offsets,
        hist_items=items.astype(np.int64),
        hist_cates=cates.astype(np.int64),
    )
    _check_values(result, ChunkChecker(shard.samples_file, sum(shard.chunk_samples[:chunk])), user_check,
                  vocab_sizes, max_history)
    return result


def _check_values(chunk: _Chunk, samples: ChunkChecker, users: ChunkChecker,
                  vocab_sizes: Mapping[str, int], max_history: int) -> None:
    """Labels 0/1, probabilities in [0, 1] (NaN fails), users of the chunk in ascending order (the
    shuffle relies on it), ids inside their tables, histories at most ``max_history`` long."""
    samples.where(LABEL, (chunk.labels != 0) & (chunk.labels != 1), lambda r: f"label {chunk.labels[r]}, expected 0 or 1")
    if chunk.prob is not None:
        prob = chunk.prob
        samples.where(PROB, ~((prob >= 0) & (prob <= 1)), lambda r: f"probability {prob[r]} outside [0, 1]")
    su, num_users = chunk.sample_user, chunk.hist_offsets.shape[0] - 1
    samples.where(USER_INDEX, (su < 0) | (su >= num_users),
                  lambda r: f"user {su[r] + users.first_row} is not among the {num_users} users of this row group")
    samples.where(USER_INDEX, np.concatenate([[False], su[1:] < su[:-1]]),
                  lambda r: "samples are not grouped by ascending user")
    for name, ids in chunk.target.items():
        samples.ids(name, ids, vocab_sizes[name])
    for name, ids in chunk.user_features.items():
        users.ids(name, ids, vocab_sizes[name])
    row_of = users.lists(HIST_ITEMS, chunk.hist_offsets, max_history)
    users.ids(HIST_ITEMS, chunk.hist_items, vocab_sizes[F.ITEM.name], row_of)
    users.ids(HIST_CATES, chunk.hist_cates, vocab_sizes[F.CATE.name], row_of)


def _shuffle_users(chunk: _Chunk, rng: np.random.Generator) -> _Chunk:
    """Permute the users of a chunk, each user's samples staying together and in order."""
    num_users = chunk.hist_offsets.shape[0] - 1
    # Prepared chunks list samples by ascending user, so each user's run starts at searchsorted.
    first = np.searchsorted(chunk.sample_user, np.arange(num_users + 1))
    perm = rng.permutation(num_users)
    return chunk.reorder(ragged_index(first[perm], (first[1:] - first[:-1])[perm]))


def concat_blocks(blocks: Sequence[SampleBlock]) -> SampleBlock:
    """Concatenate blocks (their users are kept apart, even when the same user appears twice)."""
    if len(blocks) == 1:
        return blocks[0]
    user_base = np.cumsum([0] + [b.num_users for b in blocks[:-1]])
    value_base = np.cumsum([0] + [b.hist_offsets[-1] for b in blocks[:-1]])
    probs = [b.true_prob for b in blocks]
    return SampleBlock(
        labels=np.concatenate([b.labels for b in blocks]),
        user_key=np.concatenate([b.user_key for b in blocks]),
        sample_user=np.concatenate([b.sample_user + base for b, base in zip(blocks, user_base)]),
        target={k: np.concatenate([b.target[k] for b in blocks]) for k in blocks[0].target},
        user_features={
            k: np.concatenate([b.user_features[k] for b in blocks]) for k in blocks[0].user_features
        },
        hist_offsets=np.concatenate(
            [[0]] + [b.hist_offsets[1:] + base for b, base in zip(blocks, value_base)]
        ),
        hist_items=np.concatenate([b.hist_items for b in blocks]),
        hist_cates=np.concatenate([b.hist_cates for b in blocks]),
        true_prob=None if probs[0] is None else np.concatenate(probs),
    )


def _rebatch(chunks: Iterable[_Chunk], batch_size: int, drop_last: bool, start: int = 0) -> Iterator[SampleBlock]:
    """Cut a stream of chunks into blocks of ``batch_size`` samples (a block may span chunks),
    beginning at sample ``start`` of the first chunk."""
    pieces: List[SampleBlock] = []
    filled = 0
    for chunk in chunks:
        pos, start = start, 0
        while pos < chunk.num_samples:
            take = min(batch_size - filled, chunk.num_samples - pos)
            pieces.append(chunk.block(pos, pos + take))
            filled += take
            pos += take
            if filled == batch_size:
                yield concat_blocks(pieces)
                pieces, filled = [], 0
    if pieces and not drop_last:
        yield concat_blocks(pieces)


def iter_blocks(
    data: PreparedData,
    split: str,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    worker_id: int = 0,
    num_workers: int = 1,
    seed: int = 0,
    shuffle: bool = False,
    drop_last: bool = False,
    skip: int = 0,
) -> Iterator[SampleBlock]:
    """Blocks of ``batch_size`` samples of consumer (rank, worker_id); see the module docstring.

    ``skip``: leave out the first ``skip`` blocks (a resumed run's position); units wholly before
    the first kept block are not read.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    _check_consumer(rank, world_size, worker_id, num_workers)
    units = _rank_units(data, split, rank, world_size, num_workers)[worker_id]
    if shuffle:
        units = [units[i] for i in np.random.default_rng([seed, rank, worker_id]).permutation(len(units))]
    # Every block but the last is full, so the first ``skip`` blocks are the first samples.
    start = skip * batch_size
    while units and start >= units[0].num_samples:
        start -= units[0].num_samples
        units = units[1:]
    shards = data.shards(split)
    with_prob = data.has_truth(split)
    vocab_sizes, max_history = data.meta["vocab_sizes"], int(data.meta["max_history"])

    def chunks() -> Iterator[_Chunk]:
        for unit in units:
            chunk = _read_chunk(shards[unit.shard], unit.chunk, with_prob, vocab_sizes, max_history)
            if shuffle:
                chunk = _shuffle_users(chunk, np.random.default_rng([seed, unit.shard, unit.chunk]))
            yield chunk

    return _rebatch(chunks(), batch_size, drop_last, start)


class BlockDataset(IterableDataset):
    """The blocks of one rank, transformed; each DataLoader worker reads its own units."""

    def __init__(
        self,
        data: PreparedData,
        split: str,
        batch_size: int,
        transform: Callable[[SampleBlock], T],
        *,
        rank: int,
        world_size: int,
        num_workers: int,
        seed: int,
        shuffle: bool,
        drop_last: bool,
        skips: Sequence[int],
    ) -> None:
        super().__init__()
        self.data = data
        self.split = split
        self.batch_size = batch_size
        self.transform = transform
        self.rank = rank
        self.world_size = world_size
        self.num_workers = max(num_workers, 1)
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        # Blocks each worker leaves out (``make_loader``'s ``skip``), one entry per worker.
        self.skips = tuple(skips)

    def __iter__(self) -> Iterator[T]:
        info = get_worker_info()
        worker_id = 0 if info is None else info.id
        blocks = iter_blocks(
            self.data,
            self.split,
            self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            worker_id=worker_id,
            num_workers=self.num_workers,
            seed=self.seed,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            skip=self.skips[worker_id],
        )
        return map(self.transform, blocks)


def _unchanged(item: T) -> T:
    # DataLoader's default conversion would turn numpy arrays in the transform's output into tensors.
    return item


def make_loader(
    data: PreparedData,
    split: str,
    batch_size: int,
    transform: Callable[[SampleBlock], T],
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    shuffle: bool = False,
    drop_last: bool = False,
    pin_memory: bool = False,
    skip: int = 0,
    worker_cpus: Optional[Sequence[int]] = None,
) -> Iterable[T]:
    """A DataLoader yielding ``transform(block)`` for rank ``rank``'s blocks.

    The transform runs in the worker processes (in-process when ``num_workers=0``, which reads the
    rank's units as one consumer, like ``count_batches(num_workers=0)``). The DataLoader takes the
    workers' outputs in turn, so the order is deterministic for a seed. ``skip``: start after the
    first ``skip`` outputs (a resumed run's position) without reading or transforming them.
    ``worker_cpus``: the CPUs the workers run on (``affinity.loader_worker_cpus``; None: any).
    """
    counts = _worker_blocks(data, split, batch_size, rank, world_size, num_workers, drop_last)
    dataset = BlockDataset(
        data,
        split,
        batch_size,
        transform,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        skips=worker_skips(counts, skip),
    )
    # Its own generator: each iterator draws a seed for its workers, which must not move the global
    # RNG (a resumed run creates its iterators at other points of the RNG stream).
    return _WorkersOffStepCore(
        dataset, batch_size=None, num_workers=num_workers, collate_fn=_unchanged, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=keep_inherited_objects if worker_cpus is None else functools.partial(
            start_worker_on, tuple(worker_cpus)),
    )


class _WorkersOffStepCore(DataLoader):
    """A DataLoader whose workers (started with each iterator) run off the training thread's step
    core (``affinity.started_elsewhere``), whatever thread iterates it."""

    def __iter__(self) -> Iterator[Any]:
        with started_elsewhere():
            return super().__iter__()


def keep_inherited_objects(worker_id: int = 0) -> None:
    """First thing in a forked worker: exempt everything inherited from the parent from garbage
    collection. The parent may hold unreachable CUDA tensors (e.g. of a finished compiled model)
    that its collector has not freed yet; freeing one in the child calls into CUDA, which a forked
    process cannot use ("CUDA error: initialization error"). It also keeps the inherited pages shared."""
    gc.freeze()


def start_worker_on(cpus: Tuple[int, ...], worker_id: int = 0) -> None:
    """``keep_inherited_objects``, then run this worker on ``cpus`` only."""
    keep_inherited_objects(worker_id)
    os.sched_setaffinity(0, cpus)
