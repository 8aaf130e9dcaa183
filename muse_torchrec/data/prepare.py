"""Raw Taobao-MM Parquet -> vocabularies, SCL table aligned to the item vocabulary, prepared shards.

Which ids enter the vocabularies (row = position in the sorted kept raw ids + 1; row 0 = padding and
unknown; raw id 0 always maps to row 0):

- ``item`` (target ``205`` + history ``150_2_180``), ``cate`` (``206`` of the target items +
  ``151_2_180``), ``item_city`` (``213``), ``item_province`` (``214``): ids of **both splits**. These
  are catalogue ids, not observations about users, and none of them carries a label. Keeping the test
  split's items matters for MUSE: the GSU looks up the frozen SCL vector of every behavior by item
  row and treats row 0 as padding, so an item mapped to 0 would vanish from a test user's history
  even when it has a multimodal vector. MUSE_SPEC's full vocabulary (243,363,020 ids = history ids
  united with target ids) is counted the same way. Test-only items get rows whose ID embeddings are
  never trained (they stay at their initial values). Histories are counted after truncation to
  ``max_history``, so the vocabulary holds exactly the ids the model can see. The vocabulary rule
  (``full``, ``p90``, ``min-count:N``; see ``vocab.VocabRule``) filters history ids only: every
  target id is kept. Target attributes (cate/city/province) come from ``item_features`` rows of
  the target items (first row wins if an item is listed twice).
- ``user`` (``129_1`` of the train samples) and ``profile_1..5`` (``130_1..5`` of the train user
  features): **train split only**. A test-only user's embedding would never be trained, so it maps
  to row 0, as does a profile value never seen in training.

Prepared layout (``FORMAT_VERSION``): ``meta.json`` (written last), ``vocab/<table>.npy`` (sorted
int64 raw ids), ``scl.npy`` int8 [S + 1, 128] (row 0 zeros), ``item_scl_row.npy`` int32 [V_item]
(item row -> SCL row, 0 = no vector), and per split ``<split>/shard-NNNNN.samples.parquet`` +
``<split>/shard-NNNNN.users.parquet``. A shard stores each user's lists once: the samples file has
``label`` int8, ``user_index`` int32 (row in the shard's users file), ``user_key`` int64 (raw user
id), target rows ``item``, ``cate``, ``item_city``, ``item_province`` int32 and, when the raw set has
``<split>_truth.parquet``, ``prob`` float32; the users file has ``user``, ``profile_1..5`` int32 and
``hist_items`` / ``hist_cates`` list<int32> (last ``max_history`` behaviors, oldest first).
A user's samples are contiguous and in their raw order; both files are cut into aligned row groups
("chunks": row group g of the samples file references only users in row group g of the users file),
the loader's unit of work. Parquet is written uncompressed with plain encoding: random int32 rows do
not compress, and decoding plain pages is a memcpy.

Bounded memory: users are hash-partitioned by raw user id into buckets spilled to disk (Arrow IPC),
together with their samples, and each bucket is joined on its own and becomes one shard; the item
history counts are spilled the same way (``vocab.SpilledCounter``). No stage assumes the user
features come in the samples' user order.

Peak resident memory per stage (``meta.json["stages"]``, VmHWM reset at each stage start; measured
by ``benchmarks/bench_data.py --scales 1 4 8`` on a 2-core x86 box, one process; synthetic 1x =
55 k samples, 4.1 M behaviors, 166 k items; 8x = 440 k samples, 33 M behaviors, 1.28 M items). The
figures include ~0.2-0.4 GiB of interpreter, libraries and allocator-retained pages. Taobao-MM
(full vocabulary: 99 M samples, ~8.8 B stored behaviors, 243 M items, 9 M users) is extrapolated
from the data structures each stage holds:

| stage      | 1x   | 4x   | 8x   | what grows                                                   | Taobao-MM |
|------------|------|------|------|--------------------------------------------------------------|-----------|
| validate   | 0.22 | 0.57 | 0.71 | one raw row group (schema.py)                                | ~1 GiB    |
| count      | 0.35 | 0.47 | 0.61 | train user ids + target ids (16 B each, x3 while merging),    | ~2 GiB    |
|            |      |      |      | one count bucket while reducing (~3x ``bucket_bytes``)        |           |
| vocab      | 0.31 | 0.41 | 0.22 | item vocabulary: 17 B/id measured at 50 M ids                 | ~4 GiB    |
| scl        | 0.34 | 0.44 | 0.56 | item vocab 8 B/id + its lookup index ~1 B/id +               | ~3.5 GiB  |
|            |      |      |      | ``item_scl_row`` 4 B/id (memmap) + chosen SCL rows 8 B/row    |           |
| partition  | 0.52 | 0.75 | 0.77 | the lookups above + one batch (4,096 users)                  | ~4 GiB    |
| shards     | 0.33 | 0.61 | 0.90 | the lookups above + ~3x one bucket                           | ~4 GiB    |

The shard stage is bounded by ``bucket_bytes``, not by the data: at 8x the default 256 MiB bucket
holds the whole train split (0.90 GiB peak); with ``bucket_bytes=32 MiB`` (7 shards) the same stage
peaks at 0.62 GiB. With the p90 vocabulary (35 M items) every item structure is 7x smaller and no
stage should exceed ~2 GiB. Disk: the item-count spill takes 16 B per (batch, distinct id) pair,
at most 16 B per behavior (freed after the vocab stage), and the partition spill ~8 B per behavior
of one split (freed bucket by bucket as shards are written). Time: 1.8-2.0 M behaviors/s on one
core at every synthetic scale, so about 1.3 h for Taobao-MM (lookups in the 243 M-id vocabulary
run at ~230 ns/id, see ``vocab.Lookup``).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from tqdm import tqdm

from muse_torchrec import features as F
from muse_torchrec.data import schema
from muse_torchrec.data.vocab import (
    Lookup,
    SpilledCounter,
    ValueCounter,
    VocabRule,
    count_histogram,
    hash_bucket,
    kept_ids,
    lookup,
    save_vocab,
    split_by_bucket,
)

FORMAT_VERSION = 1
SPLITS = schema.SPLITS
META_FILE = "meta.json"
VOCAB_DIR = "vocab"
SCL_FILE = "scl.npy"
ITEM_SCL_ROW_FILE = "item_scl_row.npy"

# Prepared samples file.
LABEL = "label"
USER_INDEX = "user_index"
USER_KEY = "user_key"
PROB = "prob"
TARGET_TABLES: Tuple[F.Table, ...] = (F.ITEM, F.CATE, F.CITY, F.PROVINCE)
# Prepared users file.
USER_TABLES: Tuple[F.Table, ...] = (F.USER, *F.PROFILE)
HIST_ITEMS = "hist_items"
HIST_CATES = "hist_cates"

# Item attribute tables filled from item_features: table name -> raw column.
_ATTRIBUTES: Dict[str, str] = {
    F.CATE.name: F.ITEM_CATE,
    F.CITY.name: F.ITEM_CITY,
    F.PROVINCE.name: F.ITEM_PROVINCE,
}
_ROW_LIST = pa.list_(pa.int32())
# Rows per streamed batch: user rows carry two lists of up to 1,000 ids, so fewer of them.
_USER_BATCH_ROWS = 4096
_ROW_BATCH_ROWS = 1 << 18
_SCL_BATCH_ROWS = 1 << 15
# Bytes per stored behavior (item row + category row, int32 each) and per sample, for bucket sizing.
_BEHAVIOR_BYTES = 8
_SAMPLE_BYTES = 32
_PARQUET_OPTIONS = dict(compression="none", use_dictionary=False, write_statistics=False)


def samples_schema(has_truth: bool) -> pa.Schema:
    """Columns of a prepared ``*.samples.parquet`` file."""
    fields = [
        pa.field(LABEL, pa.int8()),
        pa.field(USER_INDEX, pa.int32()),
        pa.field(USER_KEY, pa.int64()),
        *[pa.field(t.name, pa.int32()) for t in TARGET_TABLES],
    ]
    return pa.schema(fields + ([pa.field(PROB, pa.float32())] if has_truth else []))


USERS_SCHEMA = pa.schema(
    [
        *[pa.field(t.name, pa.int32()) for t in USER_TABLES],
        pa.field(HIST_ITEMS, _ROW_LIST),
        pa.field(HIST_CATES, _ROW_LIST),
    ]
)
# Spilled user rows keep the raw key for the join; the vocabulary row is looked up per shard.
_USER_SPILL_SCHEMA = pa.schema(
    [pa.field(USER_KEY, pa.int64()), *[f for f in USERS_SCHEMA if f.name != F.USER.name]]
)
# Spilled samples have no user index yet (it is assigned by the join); keyed by has_truth.
_SAMPLE_SPILL_SCHEMAS = {
    truth: samples_schema(truth).remove(samples_schema(truth).get_field_index(USER_INDEX))
    for truth in (False, True)
}


def ragged_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices of the concatenated ranges ``[starts[i], starts[i] + lengths[i])``: [sum(lengths)] int64."""
    lengths = lengths.astype(np.int64, copy=False)
    ends = np.cumsum(lengths)
    return np.repeat(starts.astype(np.int64, copy=False) - (ends - lengths), lengths) + np.arange(
        ends[-1] if ends.size else 0, dtype=np.int64
    )


def list_parts(array: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    """A list array -> (offsets [R + 1] int64 starting at 0, values [N]) as numpy (no copy of values)."""
    offsets = array.offsets.to_numpy().astype(np.int64)
    values = array.values.to_numpy()[offsets[0] : offsets[-1]]
    return offsets - offsets[0], values


def _last_n(offsets: np.ndarray, values: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """Keep the last ``n`` entries of each list: ([R + 1], [N]) -> ([R + 1], [N'])."""
    lengths = np.diff(offsets)
    if lengths.size == 0 or lengths.max() <= n:
        return offsets, values
    kept = np.minimum(lengths, n)
    new_offsets = np.concatenate([[0], np.cumsum(kept)])
    return new_offsets, values[ragged_index(offsets[1:] - kept, kept)]


def _row_list(offsets: np.ndarray, rows: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(rows, type=pa.int32()))


def _num_buckets(nbytes: int, bucket_bytes: int) -> int:
    return max(1, math.ceil(nbytes / bucket_bytes))


def _batches(
    raw_dir: Path, table: str, columns: Sequence[str], rows: int, progress: bool
) -> Iterator[pa.RecordBatch]:
    """Stream a raw table's columns with a progress bar counting rows."""
    files = schema.table_files(raw_dir, table)
    with tqdm(total=schema.num_rows(files), desc=table, unit="row", disable=not progress, leave=False) as bar:
        for batch in schema.iter_record_batches(files, list(columns), batch_rows=rows):
            yield batch
            bar.update(batch.num_rows)


def _leaf_values(raw_dir: Path, table: str, column: str) -> int:
    """Number of list elements stored for ``column`` (from Parquet metadata, nothing decoded)."""
    total = 0
    for path in schema.table_files(raw_dir, table):
        meta = pq.ParquetFile(path).metadata
        leaf = [i for i in range(meta.num_columns) if meta.schema.column(i).path.split(".")[0] == column]
        total += sum(meta.row_group(g).column(leaf[0]).num_values for g in range(meta.num_row_groups))
    return total


def _np(batch: pa.RecordBatch, column: str) -> np.ndarray:
    return batch.column(column).to_numpy()


# ---------------------------------------------------------------------------------------------
# Stage meter


def _rss(field: str) -> Optional[int]:
    """A memory figure of this process from /proc/self/status (bytes), None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS, so each stage reports its own peak.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class _StageMeter:
    """Wall time, resident memory at the start and peak resident memory of each stage."""

    def __init__(self) -> None:
        self.stages: Dict[str, Dict[str, Optional[float]]] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        _reset_peak_rss()
        start_rss = _rss("VmRSS")
        start = time.perf_counter()
        yield
        self.stages[name] = {
            "seconds": round(time.perf_counter() - start, 3),
            "start_rss_bytes": start_rss,
            "peak_rss_bytes": _rss("VmHWM"),
        }


# ---------------------------------------------------------------------------------------------
# Stage 1: count ids


@dataclass
class _Counts:
    """Distinct raw ids seen by the counting pass (all sorted int64, 0 excluded)."""

    targets: np.ndarray
    users: np.ndarray
    profiles: Dict[str, np.ndarray]
    hist_cates: np.ndarray
    history: SpilledCounter
    entries: Dict[str, int]


def _count_ids(
    raw_dir: Path, spill_dir: Path, max_history: int, bucket_bytes: int, progress: bool
) -> _Counts:
    """One streaming pass over samples and user features of both splits."""
    targets, users, cates = ValueCounter(), ValueCounter(), ValueCounter()
    profiles = {t.name: ValueCounter() for t in F.PROFILE}
    estimate = sum(_leaf_values(raw_dir, schema.user_features_table(s), F.HIST_ITEMS) for s in SPLITS)
    # Spilled pairs are (int64 id, int64 count): 16 bytes per distinct id of a batch.
    history = SpilledCounter(spill_dir, _num_buckets(16 * estimate, bucket_bytes))
    entries: Dict[str, int] = {}
    for split in SPLITS:
        for batch in _batches(
            raw_dir, schema.samples_table(split), [F.USER_ID, F.ITEM_ID], _ROW_BATCH_ROWS, progress
        ):
            targets.add(_np(batch, F.ITEM_ID))
            if split == "train":
                users.add(_np(batch, F.USER_ID))
        columns = [*F.USER_PROFILE, F.HIST_ITEMS, F.HIST_CATES]
        entries[split] = 0
        for batch in _batches(
            raw_dir, schema.user_features_table(split), columns, _USER_BATCH_ROWS, progress
        ):
            items_offsets, items = _last_n(*list_parts(batch.column(F.HIST_ITEMS)), max_history)
            history.add(items)
            cates.add(_last_n(*list_parts(batch.column(F.HIST_CATES)), max_history)[1])
            entries[split] += int(items_offsets[-1])
            if split == "train":
                for table in F.PROFILE:
                    profiles[table.name].add(_np(batch, table.raw_columns[0]))
    history.reduce()
    return _Counts(
        targets=targets.result()[0],
        users=users.result()[0],
        profiles={name: c.result()[0] for name, c in profiles.items()},
        hist_cates=cates.result()[0],
        history=history,
        entries=entries,
    )


@dataclass
class _ItemAttributes:
    """Raw attributes of the target items: ``items`` [T] sorted ids, ``values`` table -> [T] raw ids."""

    items: np.ndarray
    values: Dict[str, np.ndarray]


def _target_attributes(raw_dir: Path, targets: np.ndarray, progress: bool) -> _ItemAttributes:
    """Rows of item_features whose item is a target of some sample (memory ~ distinct targets)."""
    ids: List[np.ndarray] = []
    values: Dict[str, List[np.ndarray]] = {name: [] for name in _ATTRIBUTES}
    columns = [F.ITEM_ID, *_ATTRIBUTES.values()]
    is_target = Lookup(targets)
    for batch in _batches(raw_dir, schema.ITEM_FEATURES_TABLE, columns, _ROW_BATCH_ROWS, progress):
        items = _np(batch, F.ITEM_ID)
        keep = is_target(items) > 0
        ids.append(items[keep])
        for name, column in _ATTRIBUTES.items():
            values[name].append(_np(batch, column)[keep])
    items, first = np.unique(np.concatenate(ids + [np.zeros(0, np.int64)]), return_index=True)
    return _ItemAttributes(
        items=items,
        values={name: np.concatenate(v + [np.zeros(0, np.int64)])[first] for name, v in values.items()},
    )


# ---------------------------------------------------------------------------------------------
# Stage 2: vocabularies


def _distinct(values: np.ndarray) -> np.ndarray:
    return np.unique(values[values != 0])


def _build_vocabs(
    counts: _Counts, attrs: _ItemAttributes, rule: VocabRule
) -> Tuple[Dict[str, np.ndarray], dict]:
    """Vocabulary per table (sorted kept raw ids) and the item rule's statistics."""
    count_values, ids_per_count = count_histogram(counts.history)
    min_count = rule.threshold(count_values, ids_per_count)
    vocabs = {
        F.ITEM.name: kept_ids(counts.history, min_count, counts.targets),
        F.CATE.name: np.union1d(counts.hist_cates, _distinct(attrs.values[F.CATE.name])),
        F.USER.name: counts.users,
        **counts.profiles,
        F.CITY.name: _distinct(attrs.values[F.CITY.name]),
        F.PROVINCE.name: _distinct(attrs.values[F.PROVINCE.name]),
    }
    info = {
        "rule": str(rule),
        "item_min_count": min_count,
        "history_distinct_ids": int(ids_per_count.sum()),
        "history_ids_kept": int(ids_per_count[count_values >= min_count].sum()),
    }
    return vocabs, info


# ---------------------------------------------------------------------------------------------
# Stage 3: SCL table aligned to the item vocabulary


def _align_scl(raw_dir: Path, item_row: Lookup, out_dir: Path, progress: bool) -> dict:
    """Write ``scl.npy`` [S + 1, 128] int8 and ``item_scl_row.npy`` [V_item] int32.

    Two passes over the SCL table: the first reads only ids and assigns an SCL row to the first
    vector of each kept item (S is then known, so ``scl.npy`` can be a preallocated memmap); the
    second copies those vectors.
    """
    table = schema.SCL_TABLE
    item_scl_row = np.lib.format.open_memmap(
        out_dir / ITEM_SCL_ROW_FILE, mode="w+", dtype=np.int32, shape=(item_row.vocab.size + 1,)
    )
    chosen: List[np.ndarray] = []
    next_row, start = 1, 0
    for batch in _batches(raw_dir, table, [F.ITEM_ID], _ROW_BATCH_ROWS, progress):
        rows = item_row(_np(batch, F.ITEM_ID))
        candidates = np.flatnonzero(rows > 0)
        _, first = np.unique(rows[candidates], return_index=True)
        candidates = np.sort(candidates[first])
        new = candidates[item_scl_row[rows[candidates]] == 0]
        item_scl_row[rows[new]] = np.arange(next_row, next_row + new.size, dtype=np.int32)
        next_row += new.size
        chosen.append(start + new)
        start += batch.num_rows
    item_scl_row.flush()
    chosen_rows = np.concatenate(chosen + [np.zeros(0, np.int64)])
    scl = np.lib.format.open_memmap(out_dir / SCL_FILE, mode="w+", dtype=np.int8, shape=(next_row, F.SCL_DIM))
    scl[0] = 0
    start, written = 0, 1
    for batch in _batches(raw_dir, table, [F.SCL_VECTOR], _SCL_BATCH_ROWS, progress):
        values = list_parts(batch.column(F.SCL_VECTOR))[1]  # validated: every list has SCL_DIM values
        lo, hi = np.searchsorted(chosen_rows, [start, start + batch.num_rows])
        picked = values.reshape(-1, F.SCL_DIM)[chosen_rows[lo:hi] - start]
        scl[written : written + picked.shape[0]] = picked
        written += picked.shape[0]
        start += batch.num_rows
    scl.flush()
    return {
        "rows": int(next_row),
        "item_rows_with_vector": int(np.count_nonzero(item_scl_row[1:])),
        "item_rows_with_vector_share": float(
            np.count_nonzero(item_scl_row[1:]) / max(item_row.vocab.size, 1)
        ),
    }


# ---------------------------------------------------------------------------------------------
# Stage 4: remap and hash-partition users and samples into spilled buckets


class _ColumnCursor:
    """Reads one numeric column of a table in steps of any size.

    Aligns the truth table with the samples: both have the same rows (validated), but their
    record batches need not break at the same rows.
    """

    def __init__(self, batches: Iterator[pa.RecordBatch], column: str) -> None:
        self._batches = batches
        self._column = column
        self._buffer = np.zeros(0, dtype=np.float32)

    def take(self, n: int) -> np.ndarray:
        """The next [n] values."""
        parts = [self._buffer]
        have = self._buffer.size
        while have < n:
            parts.append(_np(next(self._batches), self._column))
            have += parts[-1].size
        joined = np.concatenate(parts)
        self._buffer = joined[n:]
        return joined[:n]


class _BucketWriters:
    """One Arrow IPC file per bucket; ``write`` scatters a batch's rows by bucket."""

    def __init__(self, directory: Path, prefix: str, num_buckets: int, arrow_schema: pa.Schema) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.paths = [directory / f"{prefix}-{b:05d}.arrow" for b in range(num_buckets)]
        self._writers = [ipc.new_file(str(p), arrow_schema) for p in self.paths]

    def write(self, batch: pa.RecordBatch, keys: np.ndarray) -> None:
        order, bounds = split_by_bucket(hash_bucket(keys, len(self._writers)), len(self._writers))
        ordered = batch.take(pa.array(order))
        for bucket, writer in enumerate(self._writers):
            if bounds[bucket + 1] > bounds[bucket]:
                writer.write_batch(ordered.slice(bounds[bucket], bounds[bucket + 1] - bounds[bucket]))

    def close(self) -> None:
        for writer in self._writers:
            writer.close()


@dataclass
class _Remap:
    """Everything needed to turn raw ids into rows."""

    # table -> raw id to row
    rows: Dict[str, Lookup]
    # table -> [T + 1] int32 rows of the target items' attributes, indexed by ``attribute_index``.
    attribute_rows: Dict[str, np.ndarray]
    # raw item id -> 1 + its position among the target items listed in item_features (0 = unlisted)
    attribute_index: Lookup
    # [V_item] int32 item row -> SCL row
    item_scl_row: np.ndarray


def _partition_users(
    raw_dir: Path, split: str, remap: _Remap, writers: _BucketWriters, max_history: int, progress: bool
) -> dict:
    """Remap each user's profile and truncated lists and spill the rows by user bucket."""
    stats = {"users": 0, "interactions": 0, "interactions_in_vocab": 0, "interactions_with_scl": 0}
    columns = [F.USER_ID, *F.USER_PROFILE, F.HIST_ITEMS, F.HIST_CATES]
    for batch in _batches(raw_dir, schema.user_features_table(split), columns, _USER_BATCH_ROWS, progress):
        offsets, items = _last_n(*list_parts(batch.column(F.HIST_ITEMS)), max_history)
        cates = _last_n(*list_parts(batch.column(F.HIST_CATES)), max_history)[1]  # validated: same lengths
        item_rows = remap.rows[F.ITEM.name](items)
        keys = _np(batch, F.USER_ID)
        arrays = [
            pa.array(keys),
            *[pa.array(remap.rows[t.name](_np(batch, t.raw_columns[0]))) for t in F.PROFILE],
            _row_list(offsets, item_rows),
            _row_list(offsets, remap.rows[F.CATE.name](cates)),
        ]
        writers.write(pa.RecordBatch.from_arrays(arrays, schema=_USER_SPILL_SCHEMA), keys)
        stats["users"] += batch.num_rows
        stats["interactions"] += int(np.count_nonzero(items))
        stats["interactions_in_vocab"] += int(np.count_nonzero(item_rows))
        stats["interactions_with_scl"] += int(np.count_nonzero(remap.item_scl_row[item_rows]))
    return stats


def _truth_cursor(raw_dir: Path, split: str, progress: bool) -> Optional[_ColumnCursor]:
    name = schema.truth_table(split)
    if not schema.table_exists(raw_dir, name):
        return None
    return _ColumnCursor(
        _batches(raw_dir, name, [schema.TRUTH_PROB], _ROW_BATCH_ROWS, progress), schema.TRUTH_PROB
    )


def _partition_samples(
    raw_dir: Path,
    split: str,
    remap: _Remap,
    writers: _BucketWriters,
    truth: Optional[_ColumnCursor],
    progress: bool,
) -> dict:
    """Remap each sample's label and target ids (joining item_features) and spill by user bucket."""
    stats = {"samples": 0, "positives": 0, "targets_with_scl": 0}
    arrow_schema = _SAMPLE_SPILL_SCHEMAS[truth is not None]
    columns = [F.LABEL, F.USER_ID, F.ITEM_ID]
    for batch in _batches(raw_dir, schema.samples_table(split), columns, _ROW_BATCH_ROWS, progress):
        label_offsets, label_values = list_parts(batch.column(F.LABEL))
        labels = label_values[label_offsets[:-1] + 1]  # one-hot [no click, click]
        keys = _np(batch, F.USER_ID)
        raw_items = _np(batch, F.ITEM_ID)
        attribute = remap.attribute_index(raw_items)  # 0 = not in item_features
        targets = {F.ITEM.name: remap.rows[F.ITEM.name](raw_items)}
        targets.update({name: rows[attribute] for name, rows in remap.attribute_rows.items()})
        arrays = [
            pa.array(labels.astype(np.int8)),
            pa.array(keys),
            *[pa.array(targets[t.name]) for t in TARGET_TABLES],
        ]
        if truth is not None:
            arrays.append(pa.array(truth.take(batch.num_rows).astype(np.float32)))
        writers.write(pa.RecordBatch.from_arrays(arrays, schema=arrow_schema), keys)
        stats["samples"] += batch.num_rows
        stats["positives"] += int(np.count_nonzero(labels))
        stats["targets_with_scl"] += int(np.count_nonzero(remap.item_scl_row[targets[F.ITEM.name]]))
    return stats


# ---------------------------------------------------------------------------------------------
# Stage 5: join each bucket into a shard


def _read_spill(path: Path) -> pa.Table:
    with ipc.open_file(str(path)) as reader:
        return reader.read_all().combine_chunks()


def _group_by_user(sample_keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Number users in order of first appearance.

    Returns (user keys [U] in appearance order, user index of each sample [B],
    sample order [B] that groups samples by user and keeps their raw order inside a user).
    """
    distinct, first, inverse = np.unique(sample_keys, return_index=True, return_inverse=True)
    appearance = np.argsort(first)
    rank = np.empty_like(appearance)
    rank[appearance] = np.arange(appearance.size)
    user_index = rank[inverse]
    return distinct[appearance], user_index, np.argsort(user_index, kind="stable")


def _chunk_bounds(samples_per_user: np.ndarray, chunk_samples: int) -> np.ndarray:
    """User boundaries [C + 1] that cut users into chunks of about ``chunk_samples`` samples."""
    cumulative = np.cumsum(samples_per_user)
    ends = (
        np.searchsorted(cumulative, np.arange(chunk_samples, cumulative[-1], chunk_samples), side="left") + 1
    )
    return np.unique(np.concatenate([[0], ends, [samples_per_user.size]]))


def _shard_users(spill: pa.Table, keys: np.ndarray, user_row: Lookup) -> pa.Table:
    """Users file rows for ``keys`` [U]: left join on the raw key (missing user -> empty lists)."""
    spill_keys, first = np.unique(spill.column(USER_KEY).to_numpy(), return_index=True)
    found = lookup(spill_keys, keys)
    # Users absent from user_features point at one appended all-zero row with empty lists.
    source = np.where(found > 0, first[np.maximum(found - 1, 0)], spill.num_rows)
    empty = pa.table(
        {f.name: pa.array([[] if pa.types.is_list(f.type) else 0], f.type) for f in _USER_SPILL_SCHEMA}
    )
    joined = pa.concat_tables([spill, empty.cast(_USER_SPILL_SCHEMA)]).take(pa.array(source))
    return pa.Table.from_arrays(
        [
            pa.array(user_row(keys)),
            *[joined.column(f.name) for f in USERS_SCHEMA if f.name != F.USER.name],
        ],
        schema=USERS_SCHEMA,
    )


def _write_chunked(path: Path, table: pa.Table, bounds: np.ndarray) -> None:
    """Write ``table`` with one row group per chunk ``[bounds[c], bounds[c + 1])``."""
    with pq.ParquetWriter(str(path), table.schema, **_PARQUET_OPTIONS) as writer:
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            writer.write_table(table.slice(lo, hi - lo), row_group_size=int(hi - lo))


def _write_shard(
    users_spill: Path,
    samples_spill: Path,
    user_row: Lookup,
    shard_dir: Path,
    name: str,
    chunk_samples: int,
) -> Optional[dict]:
    """Join one bucket into ``<name>.samples.parquet`` + ``<name>.users.parquet``; None if empty."""
    samples = _read_spill(samples_spill)
    if samples.num_rows == 0:
        return None
    keys, user_index, order = _group_by_user(samples.column(USER_KEY).to_numpy())
    samples = samples.take(pa.array(order)).add_column(
        samples_schema(False).get_field_index(USER_INDEX),
        USER_INDEX,
        pa.array(user_index[order].astype(np.int32)),
    )
    users = _shard_users(_read_spill(users_spill), keys, user_row)
    user_bounds = _chunk_bounds(np.bincount(user_index, minlength=keys.size), chunk_samples)
    sample_bounds = np.concatenate([[0], np.cumsum(np.bincount(user_index, minlength=keys.size))])[
        user_bounds
    ]
    _write_chunked(shard_dir / f"{name}.samples.parquet", samples, sample_bounds)
    _write_chunked(shard_dir / f"{name}.users.parquet", users, user_bounds)
    return {
        "samples_file": f"{shard_dir.name}/{name}.samples.parquet",
        "users_file": f"{shard_dir.name}/{name}.users.parquet",
        "num_samples": int(samples.num_rows),
        "num_users": int(keys.size),
        "chunks": [[int(s), int(u)] for s, u in zip(np.diff(sample_bounds), np.diff(user_bounds))],
    }


# ---------------------------------------------------------------------------------------------
# Orchestration


def _attribute_rows(attrs: _ItemAttributes, vocabs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """table -> [T + 1] int32 rows; index 0 (item missing from item_features) -> row 0."""
    return {
        name: np.concatenate([[0], lookup(vocabs[name], raw)]).astype(np.int32)
        for name, raw in attrs.values.items()
    }


@dataclass(frozen=True)
class _Options:
    max_history: int
    bucket_bytes: int
    chunk_samples: Optional[int]
    progress: bool

    def chunk_size(self, split_samples: int) -> int:
        """Samples per chunk: as asked, else ~1/1024 of the split within [1024, 16384], so that
        small sets still give enough units to balance ranks x workers and large ones read in
        large row groups."""
        if self.chunk_samples is not None:
            return self.chunk_samples
        return int(np.clip(math.ceil(split_samples / 1024), 1024, 16384))


def _prepare_split(
    raw_dir: Path, split: str, remap: _Remap, work: Path, entries: int, opts: _Options, meter: _StageMeter
) -> dict:
    """Partition one split into buckets (sized from its ``entries`` stored behaviors), then write
    one shard per non-empty bucket; returns the split's metadata."""
    spill = work / "_spill" / split
    num_samples = schema.num_rows(schema.table_files(raw_dir, schema.samples_table(split)))
    num_buckets = _num_buckets(_BEHAVIOR_BYTES * entries + _SAMPLE_BYTES * num_samples, opts.bucket_bytes)
    truth = _truth_cursor(raw_dir, split, opts.progress)
    with meter.stage(f"partition_{split}"):
        user_writers = _BucketWriters(spill, "users", num_buckets, _USER_SPILL_SCHEMA)
        user_stats = _partition_users(raw_dir, split, remap, user_writers, opts.max_history, opts.progress)
        user_writers.close()
        sample_writers = _BucketWriters(
            spill, "samples", num_buckets, _SAMPLE_SPILL_SCHEMAS[truth is not None]
        )
        sample_stats = _partition_samples(raw_dir, split, remap, sample_writers, truth, opts.progress)
        sample_writers.close()
    with meter.stage(f"shards_{split}"):
        shard_dir = work / split
        shard_dir.mkdir()
        shards = []
        for bucket in tqdm(
            range(num_buckets), desc=f"{split} shards", disable=not opts.progress, leave=False
        ):
            users_spill, samples_spill = user_writers.paths[bucket], sample_writers.paths[bucket]
            shard = _write_shard(
                users_spill,
                samples_spill,
                remap.rows[F.USER.name],
                shard_dir,
                f"shard-{bucket:05d}",
                opts.chunk_size(num_samples),
            )
            if shard is not None:
                shards.append(shard)
            # Free the disk as we go: the spill is as large as the shards.
            users_spill.unlink()
            samples_spill.unlink()
    return _split_meta(user_stats, sample_stats, shards, truth is not None)


def _share(part: int, whole: int) -> float:
    return float(part / whole) if whole else 0.0


def _split_meta(user_stats: dict, sample_stats: dict, shards: List[dict], has_truth: bool) -> dict:
    """Counts, coverage (shares of history interactions / target samples) and the shard list."""
    interactions = user_stats["interactions"]
    return {
        "samples": sample_stats["samples"],
        "positives": sample_stats["positives"],
        "users": sum(s["num_users"] for s in shards),
        "user_feature_rows": user_stats["users"],
        "interactions": interactions,
        "item_coverage": _share(user_stats["interactions_in_vocab"], interactions),
        "scl_coverage": {
            "targets": _share(sample_stats["targets_with_scl"], sample_stats["samples"]),
            "interactions": _share(user_stats["interactions_with_scl"], interactions),
        },
        "has_truth": has_truth,
        "shards": shards,
    }


def _prepare_into(raw_dir: Path, work: Path, rule: VocabRule, opts: _Options, meter: _StageMeter) -> dict:
    """Run every stage, writing into ``work``; returns the metadata (not yet written)."""
    counts_dir = work / "_spill" / "item_counts"
    with meter.stage("count"):
        counts = _count_ids(raw_dir, counts_dir, opts.max_history, opts.bucket_bytes, opts.progress)
        attrs = _target_attributes(raw_dir, counts.targets, opts.progress)
    with meter.stage("vocab"):
        vocabs, vocab_info = _build_vocabs(counts, attrs, rule)
        (work / VOCAB_DIR).mkdir()
        for name, ids in vocabs.items():
            save_vocab(work / VOCAB_DIR / f"{name}.npy", ids)
        shutil.rmtree(counts_dir)
    with meter.stage("scl"):
        rows = {name: Lookup(ids) for name, ids in vocabs.items()}
        scl_info = _align_scl(raw_dir, rows[F.ITEM.name], work, opts.progress)
    remap = _Remap(
        rows=rows,
        attribute_rows=_attribute_rows(attrs, vocabs),
        attribute_index=Lookup(attrs.items),
        item_scl_row=np.load(work / ITEM_SCL_ROW_FILE, mmap_mode="r"),
    )
    splits = {
        split: _prepare_split(raw_dir, split, remap, work, counts.entries[split], opts, meter)
        for split in SPLITS
    }
    return {
        "format_version": FORMAT_VERSION,
        "raw_dir": str(raw_dir.resolve()),
        "max_history": opts.max_history,
        "vocab": vocab_info,
        "vocab_sizes": {name: int(ids.size + 1) for name, ids in vocabs.items()},
        "scl": scl_info,
        "splits": splits,
        "stages": meter.stages,
    }


def _publish(work: Path, out_dir: Path) -> None:
    """Move the finished ``work`` dir to ``out_dir``, replacing an older prepared dir last."""
    old = out_dir.parent / f".{out_dir.name}.old"
    if out_dir.exists():
        out_dir.rename(old)
    work.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def prepare(
    raw_dir: str | Path,
    out_dir: str | Path,
    vocab: str = "full",
    *,
    max_history: int = F.MAX_HISTORY,
    bucket_bytes: int = 256 << 20,
    chunk_samples: Optional[int] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Prepare a raw Taobao-MM-format dir for training; returns the metadata written to meta.json.

    Args:
        raw_dir: the five raw tables (+ optional ``<split>_truth``), single files or part dirs.
        out_dir: the prepared dir; it appears only when complete (built in a sibling temp dir).
        vocab: item vocabulary rule, "full", "p90" or "min-count:N".
        max_history: keep the last ``max_history`` behaviors of each user.
        bucket_bytes: spill bucket budget; peak memory of the join is about 3x this, and each
            bucket becomes one shard.
        chunk_samples: samples per row group (the loader's unit of work), cut at user boundaries;
            None: ~1/1024 of the split, clipped to [1024, 16384].
        overwrite: replace an existing prepared dir.
        progress: show tqdm progress bars.
    """
    raw, out = Path(raw_dir), Path(out_dir)
    rule = VocabRule.parse(vocab)
    if max_history < 1 or (chunk_samples is not None and chunk_samples < 1) or bucket_bytes < 1:
        raise ValueError("max_history, chunk_samples and bucket_bytes must be positive")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    meter = _StageMeter()
    with meter.stage("validate"):
        schema.validate_raw_dir(raw, full_scan=True)
    work = out.parent / f".{out.name}.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        meta = _prepare_into(
            raw, work, rule, _Options(max_history, bucket_bytes, chunk_samples, progress), meter
        )
        shutil.rmtree(work / "_spill", ignore_errors=True)
        (work / META_FILE).write_text(json.dumps(meta, indent=1))
        _publish(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return meta
