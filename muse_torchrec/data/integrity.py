"""Checks that prepared data is what ``prepare.py`` wrote, before a batch is built from it.

A prepared dir can be damaged after it was written (a truncated copy, a shard from another
preparation, a hand-edited file) or be read with a config it was not prepared for. Unchecked, a row
id past a table's end fails far from its cause (or reads the wrong row), a string column is parsed
as numbers and a NaN probability poisons the metrics. Every check here is vectorised over a whole
chunk, so it costs little next to reading the chunk, and every error names the file, the column
and the row (index within that file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from muse_torchrec.data.vocab import VocabRule


class PreparedDataError(ValueError):
    """A prepared dir that is incomplete, damaged, or does not match the config reading it."""


def read_row_group(path: Path, group: int) -> pa.Table:
    """Row group ``group`` of a prepared Parquet file; unreadable files become PreparedDataError."""
    try:
        return pq.ParquetFile(path).read_row_group(group, use_threads=False)
    except (pa.ArrowException, OSError) as err:
        raise PreparedDataError(
            f"{path}: row group {group} is unreadable, the file is corrupt or truncated ({err}); prepare again"
        ) from err


def _is_int_list(dtype: pa.DataType) -> bool:
    return (pa.types.is_list(dtype) or pa.types.is_large_list(dtype)) and pa.types.is_integer(dtype.value_type)


class ColumnKind(NamedTuple):
    """What a prepared column holds: a predicate on its Arrow type, and how an error names it."""

    accepts: Callable[[pa.DataType], bool]
    expected: str


INTEGER = ColumnKind(pa.types.is_integer, "an integer type")
FLOAT = ColumnKind(pa.types.is_floating, "a floating-point type")
INTEGER_LIST = ColumnKind(_is_int_list, "a list of integers")


def check_columns(path: Path, table: pa.Table, kinds: Mapping[str, ColumnKind]) -> None:
    """Every column of ``kinds`` present in ``table`` with a matching type and no nulls."""
    for column, (accepts, expected) in kinds.items():
        if column not in table.column_names:
            raise PreparedDataError(f"{path}, column {column!r}: required column is missing; prepare again")
        array = table.column(column)
        if not accepts(array.type):
            raise PreparedDataError(f"{path}, column {column!r}: type {array.type}, expected {expected}")
        if array.null_count:
            raise PreparedDataError(f"{path}, column {column!r}: {array.null_count} null values")


def _first(mask: np.ndarray) -> Optional[int]:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


class ChunkChecker:
    """Value checks of one chunk (row group) of one prepared file.

    Args:
        path: the file, for messages.
        first_row: row of the chunk's first row within the file.
    """

    def __init__(self, path: Path, first_row: int) -> None:
        self.path = path
        self.first_row = first_row

    def _fail(self, column: str, row: int, problem: str) -> None:
        raise PreparedDataError(f"{self.path}, column {column!r}, row {self.first_row + row}: {problem}")

    def where(self, column: str, bad: np.ndarray, describe: Callable[[int], str]) -> None:
        """Fail on the first row where ``bad`` [rows] is true; ``describe(i)`` says what is wrong."""
        row = _first(bad)
        if row is not None:
            self._fail(column, row, describe(row))

    def ids(self, column: str, ids: np.ndarray, size: int, row_of: Optional[np.ndarray] = None) -> None:
        """Every id in ``0..size-1``; ``row_of`` [N] maps list elements to their rows."""
        bad = _first((ids < 0) | (ids >= size)) if ids.size else None
        if bad is not None:
            row = bad if row_of is None else int(row_of[bad])
            self._fail(column, row, f"id {ids[bad]} outside the table's rows 0..{size - 1} "
                                    "(meta.json vocab_sizes): the file does not belong to this prepared dir")

    def lists(self, column: str, offsets: np.ndarray, max_length: int) -> np.ndarray:
        """List lengths ([R + 1] offsets) at most ``max_length``; returns the element -> row map."""
        lengths = np.diff(offsets)
        self.where(column, lengths > max_length,
                   lambda r: f"list of {lengths[r]} entries, longer than max_history {max_length} (meta.json)")
        return np.repeat(np.arange(lengths.shape[0]), lengths)


def check_prepared_config(path: Path, meta: Mapping, max_history: int, vocab: str) -> None:
    """The config reads the prepared dir with the history length and vocabulary rule it was made with.

    Otherwise a changed ``data.max_history`` or ``data.vocab`` would silently train on the old
    preparation (``prepare`` only runs when the prepared dir is missing).
    """
    prepared_history = int(meta["max_history"])
    prepared_rule = str(meta["vocab"]["rule"])
    if max_history != prepared_history:
        raise PreparedDataError(
            f"data.max_history={max_history} but {path} was prepared with max_history={prepared_history}: "
            f"set data.max_history={prepared_history} or prepare again into another data.prepared_dir"
        )
    if str(VocabRule.parse(vocab)) != prepared_rule:
        raise PreparedDataError(
            f"data.vocab={vocab!r} but {path} was prepared with vocabulary rule {prepared_rule!r}: "
            f"set data.vocab={prepared_rule!r} or prepare again into another data.prepared_dir"
        )
