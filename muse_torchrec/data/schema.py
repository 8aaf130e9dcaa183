"""Raw Taobao-MM Parquet schema (MUSE_SPEC section 3) and its validation.

A table named ``name`` lives in the raw directory as one file ``<name>.parquet`` or as a directory
``<name>.parquet/`` or ``<name>/`` of ``*.parquet`` part files (how Spark and the reference write
shards). Validation streams every file by record batch, so it never holds a whole table in memory;
every error is a :class:`RawDataError` naming the file, the column and, where it applies, the row
(index within that file).

Besides the five published tables, the synthetic generator writes one optional side table per split,
``<split>_truth``: a single ``prob: float32`` column with the true click probability of each sample,
in the same row order and with the same row count as ``<split>_samples`` (real data has none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from muse_torchrec.features import (
    HIST_CATES,
    HIST_ITEMS,
    ITEM_CATE,
    ITEM_CITY,
    ITEM_ID,
    ITEM_PROVINCE,
    LABEL,
    SCL_DIM,
    SCL_VECTOR,
    USER_ID,
    USER_PROFILE,
)

SPLITS: Tuple[str, ...] = ("train", "test")
TRUTH_PROB = "prob"

SAMPLES_SCHEMA = pa.schema(
    [(LABEL, pa.list_(pa.int8())), (USER_ID, pa.int64()), (ITEM_ID, pa.int64())]
)
USER_FEATURES_SCHEMA = pa.schema(
    [(USER_ID, pa.int64())]
    + [(column, pa.int64()) for column in USER_PROFILE]
    + [(HIST_ITEMS, pa.list_(pa.int64())), (HIST_CATES, pa.list_(pa.int64()))]
)
ITEM_FEATURES_SCHEMA = pa.schema(
    [(column, pa.int64()) for column in (ITEM_ID, ITEM_CATE, ITEM_CITY, ITEM_PROVINCE)]
)
SCL_SCHEMA = pa.schema([(ITEM_ID, pa.int64()), (SCL_VECTOR, pa.list_(pa.int8()))])
TRUTH_SCHEMA = pa.schema([(TRUTH_PROB, pa.float32())])



def samples_table(split: str) -> str:
    return f"{split}_samples"


def user_features_table(split: str) -> str:
    return f"{split}_user_features"


def truth_table(split: str) -> str:
    """Name of the optional (synthetic-only) true-probability side table of ``split``."""
    return f"{split}_truth"


ITEM_FEATURES_TABLE = "item_features"
SCL_TABLE = "scl_embedding_int8_p90"

RAW_TABLES: Dict[str, pa.Schema] = {
    **{samples_table(split): SAMPLES_SCHEMA for split in SPLITS},
    **{user_features_table(split): USER_FEATURES_SCHEMA for split in SPLITS},
    ITEM_FEATURES_TABLE: ITEM_FEATURES_SCHEMA,
    SCL_TABLE: SCL_SCHEMA,
}

# Rows per record batch when streaming; a user-feature row holds up to 2 x 1,000 int64 (16 KB).
DEFAULT_BATCH_ROWS = 8192


class RawDataError(ValueError):
    """A raw table that is missing, unreadable or malformed.

    The message reads ``<file>, column '<c>', row <r>: <problem>`` (column and row where they apply;
    the row is the index within that file).
    """

    def __init__(
        self,
        path: Path | str,
        problem: str,
        column: Optional[str] = None,
        row: Optional[int] = None,
    ) -> None:
        where = str(path)
        if column is not None:
            where += f", column {column!r}"
        if row is not None:
            where += f", row {row}"
        super().__init__(f"{where}: {problem}")
        self.path = Path(path)
        self.column = column
        self.row = row


def _table_locations(raw_dir: Path, name: str) -> Tuple[Path, Path]:
    """The two places a table may live: ``<name>.parquet`` (file or directory) and ``<name>/``."""
    return raw_dir / f"{name}.parquet", raw_dir / name


def _part_files(folder: Path) -> List[Path]:
    # Spark leaves markers such as _SUCCESS and hidden .crc files next to the parts.
    return sorted(
        p for p in folder.glob("*.parquet") if p.is_file() and not p.name.startswith((".", "_"))
    )


def table_exists(raw_dir: Path | str, name: str) -> bool:
    """Whether table ``name`` is present in ``raw_dir`` (as a file or a directory)."""
    return any(p.exists() for p in _table_locations(Path(raw_dir), name))


def table_files(raw_dir: Path | str, name: str) -> List[Path]:
    """Sorted Parquet files of table ``name``; RawDataError naming the expected paths if missing."""
    single, folder = _table_locations(Path(raw_dir), name)
    if single.is_file():
        return [single]
    for directory in (single, folder):
        if directory.is_dir():
            parts = _part_files(directory)
            if not parts:
                raise RawDataError(directory, f"table {name!r}: directory holds no *.parquet files")
            return parts
    raise RawDataError(
        single, f"table {name!r} is missing (expected {single}, {single}/ or {folder}/)"
    )


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise RawDataError(path, f"not a readable Parquet file ({err})") from err


def _iter_file(path: Path, columns: Sequence[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Record batches of one file, read row group by row group (memory bounded by one group)."""
    try:
        with _open(path) as parquet:
            yield from parquet.iter_batches(batch_size=batch_rows, columns=list(columns))
    except (pa.ArrowException, OSError) as err:
        problem = f"reading failed, the file is corrupt or truncated ({err})"
        raise RawDataError(path, problem) from err


def iter_record_batches(
    files: Sequence[Path | str], columns: Sequence[str], batch_rows: int = DEFAULT_BATCH_ROWS
) -> Iterator[pa.RecordBatch]:
    """Stream ``columns`` of a table's files in file order, as RecordBatches of <= batch_rows rows.

    Memory stays bounded by one Parquet row group; a read failure is a RawDataError naming the file.
    """
    for path in files:
        yield from _iter_file(Path(path), columns, batch_rows)


def num_rows(files: Sequence[Path | str]) -> int:
    """Total row count of a table's files, from the Parquet footers (reads no data)."""
    total = 0
    for path in files:
        with _open(Path(path)) as parquet:
            total += parquet.metadata.num_rows
    return total


def _is_list(dtype: pa.DataType) -> bool:
    return pa.types.is_list(dtype) or pa.types.is_large_list(dtype)


def _type_matches(actual: pa.DataType, expected: pa.DataType) -> bool:
    # list and large_list hold the same values; the element field name (item/element) is free.
    if _is_list(expected):
        return _is_list(actual) and actual.value_type == expected.value_type
    return actual == expected


def _check_schema(path: Path, actual: pa.Schema, expected: pa.Schema) -> None:
    for field in expected:
        index = actual.get_field_index(field.name)
        if index < 0:
            raise RawDataError(path, "required column is missing", column=field.name)
        found = actual.field(index).type
        if not _type_matches(found, field.type):
            raise RawDataError(path, f"type {found}, expected {field.type}", column=field.name)


# A check takes a column's array and returns (row within the batch, problem) for its first bad row.
Problem = Optional[Tuple[int, str]]


def _first(mask: np.ndarray) -> Optional[int]:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def _check_nulls(array: pa.Array) -> Problem:
    row = _first(array.is_null().to_numpy(zero_copy_only=False)) if array.null_count else None
    return None if row is None else (row, "null value")


def _list_lengths(array: pa.Array) -> np.ndarray:
    """[rows] int64 element counts of a list array (from its offsets, so slicing is respected)."""
    return np.diff(array.offsets.to_numpy().astype(np.int64))


def _check_list_structure(array: pa.Array) -> Problem:
    """Offsets monotone and no null elements inside the lists."""
    lengths = _list_lengths(array)
    row = _first(lengths < 0)
    if row is not None:
        return row, f"list offsets decrease (length {lengths[row]})"
    values = array.flatten()
    if values.null_count:
        element = _first(values.is_null().to_numpy(zero_copy_only=False))
        row = int(np.searchsorted(np.cumsum(lengths), element, side="right"))
        return row, "null element inside the list"
    return None


def _check_fixed_length(expected: int) -> Callable[[pa.Array], Problem]:
    def check(array: pa.Array) -> Problem:
        lengths = _list_lengths(array)
        row = _first(lengths != expected)
        return None if row is None else (row, f"list of length {lengths[row]}, expected {expected}")

    return check


def _check_one_hot(array: pa.Array) -> Problem:
    problem = _check_fixed_length(2)(array)
    if problem is not None:
        return problem
    pairs = array.flatten().to_numpy().reshape(-1, 2).astype(np.int64)
    row = _first(~(np.isin(pairs, (0, 1)).all(axis=1) & (pairs.sum(axis=1) == 1)))
    return None if row is None else (row, f"label {pairs[row].tolist()} is not one-hot")


def _check_probability(array: pa.Array) -> Problem:
    prob = array.to_numpy(zero_copy_only=False)
    row = _first(~((prob >= 0) & (prob <= 1)))
    return None if row is None else (row, f"probability {prob[row]} outside [0, 1]")


# Value checks beyond nulls and list structure, per column.
_VALUE_CHECKS: Dict[str, Callable[[pa.Array], Problem]] = {
    LABEL: _check_one_hot,
    SCL_VECTOR: _check_fixed_length(SCL_DIM),
    TRUTH_PROB: _check_probability,
}


def _column_problem(array: pa.Array) -> Problem:
    problem = _check_nulls(array)
    if problem is None and _is_list(array.type):
        problem = _check_list_structure(array)
    return problem


def _check_batch(path: Path, batch: pa.RecordBatch, first_row: int) -> None:
    """Raise on the first bad value of ``batch``, which starts at row ``first_row`` of ``path``."""
    for column in batch.schema.names:
        array = batch.column(column)
        problem = _column_problem(array)
        if problem is None and column in _VALUE_CHECKS:
            problem = _VALUE_CHECKS[column](array)
        if problem is not None:
            raise RawDataError(path, problem[1], column=column, row=first_row + problem[0])
    if HIST_ITEMS in batch.schema.names:
        items = _list_lengths(batch.column(HIST_ITEMS))
        cates = _list_lengths(batch.column(HIST_CATES))
        row = _first(items != cates)
        if row is not None:
            raise RawDataError(
                path,
                f"{items[row]} behavior items but {cates[row]} categories ({HIST_CATES})",
                column=HIST_ITEMS,
                row=first_row + row,
            )


def _scan_file(path: Path, schema: pa.Schema) -> None:
    first_row = 0
    for batch in _iter_file(path, schema.names, DEFAULT_BATCH_ROWS):
        _check_batch(path, batch, first_row)
        first_row += batch.num_rows


def _validate_table(raw_dir: Path, name: str, schema: pa.Schema, full_scan: bool) -> List[Path]:
    files = table_files(raw_dir, name)
    for path in files:
        with _open(path) as parquet:
            _check_schema(path, parquet.schema_arrow, schema)
        if full_scan:
            _scan_file(path, schema)
    return files


def validate_raw_dir(raw_dir: Path | str, *, full_scan: bool = True) -> Dict[str, List[Path]]:
    """Check every raw table of ``raw_dir``; return table name -> its sorted Parquet files.

    Always: every table present and readable, every required column present with its published
    type (large_list accepted for list). With ``full_scan`` also the values, streamed by record
    batch: no nulls, list offsets monotone, labels one-hot of length 2, SCL vectors of length 128,
    the two history lists of a user equally long, truth probabilities in [0, 1]. The optional truth
    tables are included in the result when present, and must have as many rows as their samples.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise RawDataError(raw_dir, "raw data directory does not exist")
    found = {
        name: _validate_table(raw_dir, name, schema, full_scan)
        for name, schema in RAW_TABLES.items()
    }
    for split in SPLITS:
        name, samples = truth_table(split), samples_table(split)
        if not table_exists(raw_dir, name):
            continue
        found[name] = _validate_table(raw_dir, name, TRUTH_SCHEMA, full_scan)
        truth_rows, sample_rows = num_rows(found[name]), num_rows(found[samples])
        if truth_rows != sample_rows:
            problem = f"{truth_rows} rows but {samples} has {sample_rows}"
            raise RawDataError(found[name][0], problem, column=TRUTH_PROB)
    return found
