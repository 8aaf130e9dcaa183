"""Raw Taobao-MM validation on small hand-made raw directories, each breaking one thing."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muse_torchrec.data.schema import (
    RAW_TABLES,
    _check_batch,
    SCL_TABLE,
    TRUTH_PROB,
    RawDataError,
    iter_record_batches,
    num_rows,
    table_files,
    validate_raw_dir,
)
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

ITEMS = [-7001, 7002, -7003, 7004]
CATES = [-31, 32, -31, 33]


def samples_table(labels: Optional[List[List[int]]] = None) -> pa.Table:
    labels = labels if labels is not None else [[1, 0], [0, 1], [1, 0]]
    users = [-501, -501, 502][: len(labels)]
    items = ITEMS[: len(labels)]
    return pa.table(
        {
            LABEL: pa.array(labels, pa.list_(pa.int8())),
            USER_ID: pa.array(users, pa.int64()),
            ITEM_ID: pa.array(items, pa.int64()),
        }
    )


def user_table(
    items: Optional[List[List[int]]] = None, cates: Optional[List[List[int]]] = None
) -> pa.Table:
    items = items if items is not None else [[7002, -7001], []]
    cates = cates if cates is not None else [[32, -31], []]
    columns: Dict[str, pa.Array] = {USER_ID: pa.array([-501, 502], pa.int64())}
    for k, column in enumerate(USER_PROFILE):
        columns[column] = pa.array([k + 1, 0], pa.int64())
    columns[HIST_ITEMS] = pa.array(items, pa.list_(pa.int64()))
    columns[HIST_CATES] = pa.array(cates, pa.list_(pa.int64()))
    return pa.table(columns)


def item_table() -> pa.Table:
    return pa.table(
        {
            ITEM_ID: pa.array(ITEMS, pa.int64()),
            ITEM_CATE: pa.array(CATES, pa.int64()),
            ITEM_CITY: pa.array([5, 6, 0, 5], pa.int64()),
            ITEM_PROVINCE: pa.array([8, 9, 0, 8], pa.int64()),
        }
    )


def scl_table(lengths: Optional[List[int]] = None) -> pa.Table:
    lengths = lengths if lengths is not None else [SCL_DIM] * len(ITEMS)
    vectors = [np.full(n, k + 1, dtype=np.int8).tolist() for k, n in enumerate(lengths)]
    return pa.table(
        {
            ITEM_ID: pa.array(ITEMS[: len(lengths)], pa.int64()),
            SCL_VECTOR: pa.array(vectors, pa.list_(pa.int8())),
        }
    )


def valid_tables() -> Dict[str, pa.Table]:
    return {
        "train_samples": samples_table(),
        "test_samples": samples_table([[0, 1], [1, 0]]),
        "train_user_features": user_table(),
        "test_user_features": user_table(),
        "item_features": item_table(),
        SCL_TABLE: scl_table(),
    }


def write(raw: Path, name: str, table: pa.Table, **kwargs: object) -> Path:
    path = raw / f"{name}.parquet"
    pq.write_table(table, path, **kwargs)
    return path


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """A valid tiny raw directory."""
    for name, table in valid_tables().items():
        write(tmp_path, name, table)
    return tmp_path


def test_valid_directory_passes(raw: Path) -> None:
    found = validate_raw_dir(raw)
    assert set(found) == set(RAW_TABLES)
    assert found["item_features"] == [raw / "item_features.parquet"]


def test_tables_are_the_published_ones() -> None:
    assert set(RAW_TABLES) == {
        "train_samples",
        "test_samples",
        "train_user_features",
        "test_user_features",
        "item_features",
        "scl_embedding_int8_p90",
    }
    assert RAW_TABLES["train_user_features"].names == [
        USER_ID,
        *USER_PROFILE,
        HIST_ITEMS,
        HIST_CATES,
    ]


def test_missing_table_names_expected_paths(raw: Path) -> None:
    (raw / "item_features.parquet").unlink()
    with pytest.raises(RawDataError, match="item_features") as err:
        validate_raw_dir(raw)
    assert str(raw / "item_features.parquet") in str(err.value)
    assert str(raw / "item_features") in str(err.value)


def test_missing_raw_dir(tmp_path: Path) -> None:
    with pytest.raises(RawDataError, match="does not exist"):
        validate_raw_dir(tmp_path / "nowhere")


def test_missing_column(raw: Path) -> None:
    path = write(raw, "train_samples", samples_table().drop_columns([ITEM_ID]))
    with pytest.raises(RawDataError, match="missing") as err:
        validate_raw_dir(raw, full_scan=False)
    assert err.value.path == path and err.value.column == ITEM_ID


@pytest.mark.parametrize("dtype", [pa.string(), pa.int32()])
def test_wrong_id_type(raw: Path, dtype: pa.DataType) -> None:
    table = samples_table()
    table = table.set_column(2, ITEM_ID, table.column(ITEM_ID).cast(dtype))
    path = write(raw, "test_samples", table)
    with pytest.raises(RawDataError, match=str(dtype)) as err:
        validate_raw_dir(raw, full_scan=False)
    assert err.value.path == path and err.value.column == ITEM_ID


def test_wrong_list_value_type(raw: Path) -> None:
    table = scl_table()
    table = table.set_column(1, SCL_VECTOR, table.column(SCL_VECTOR).cast(pa.list_(pa.int16())))
    write(raw, SCL_TABLE, table)
    with pytest.raises(RawDataError, match="int16") as err:
        validate_raw_dir(raw, full_scan=False)
    assert err.value.column == SCL_VECTOR


def test_large_list_accepted(raw: Path) -> None:
    table = user_table()
    for index, column in ((6, HIST_ITEMS), (7, HIST_CATES)):
        large = table.column(column).cast(pa.large_list(pa.int64()))
        table = table.set_column(index, column, large)
    write(raw, "train_user_features", table)
    validate_raw_dir(raw)


def test_scl_vector_of_wrong_length_names_file_column_row(raw: Path) -> None:
    # Row groups of 2 rows: the bad row 3 is row 1 of the second group, reported within the file.
    lengths = [SCL_DIM, SCL_DIM, SCL_DIM, SCL_DIM - 1]
    path = write(raw, SCL_TABLE, scl_table(lengths), row_group_size=2)
    with pytest.raises(RawDataError, match="length 127") as err:
        validate_raw_dir(raw)
    assert (err.value.path, err.value.column, err.value.row) == (path, SCL_VECTOR, 3)
    assert f"{path}, column '{SCL_VECTOR}', row 3" in str(err.value)


def test_full_scan_off_skips_value_checks(raw: Path) -> None:
    write(raw, SCL_TABLE, scl_table([SCL_DIM - 1] * len(ITEMS)))
    validate_raw_dir(raw, full_scan=False)
    with pytest.raises(RawDataError):
        validate_raw_dir(raw)


@pytest.mark.parametrize(
    "labels, problem",
    [
        ([[1, 0], [0, 0, 1]], "length 3"),
        ([[1, 0], [1, 1]], "not one-hot"),
        ([[1, 0], [0, 2]], "not one-hot"),
    ],
)
def test_bad_label(raw: Path, labels: List[List[int]], problem: str) -> None:
    path = write(raw, "train_samples", samples_table(labels))
    with pytest.raises(RawDataError, match=problem) as err:
        validate_raw_dir(raw)
    assert (err.value.path, err.value.column, err.value.row) == (path, LABEL, 1)


def test_history_lists_of_unequal_length_name_the_row(raw: Path) -> None:
    path = write(raw, "test_user_features", user_table(cates=[[32, -31], [32]]))
    with pytest.raises(RawDataError, match="0 behavior items but 1 categories") as err:
        validate_raw_dir(raw)
    assert (err.value.path, err.value.row) == (path, 1)


def test_null_id_is_an_error(raw: Path) -> None:
    table = item_table()
    table = table.set_column(1, ITEM_CATE, pa.array([1, None, 2, 3], pa.int64()))
    path = write(raw, "item_features", table)
    with pytest.raises(RawDataError, match="null") as err:
        validate_raw_dir(raw)
    assert (err.value.path, err.value.column, err.value.row) == (path, ITEM_CATE, 1)


def test_null_inside_history_is_an_error(raw: Path) -> None:
    write(raw, "train_user_features", user_table(items=[[1, 2], [None]], cates=[[3, 4], [5]]))
    with pytest.raises(RawDataError, match="null element") as err:
        validate_raw_dir(raw)
    assert (err.value.column, err.value.row) == (HIST_ITEMS, 1)


def test_decreasing_list_offsets_are_an_error() -> None:
    # Parquet readers never produce such arrays; build one from raw buffers, bypassing validation.
    offsets = pa.py_buffer(np.array([0, 3, 1, 4], dtype=np.int32).tobytes())
    values = pa.array(np.arange(4, dtype=np.int8))
    vectors = pa.Array.from_buffers(pa.list_(pa.int8()), 3, [None, offsets], children=[values])
    batch = pa.RecordBatch.from_arrays([vectors], names=[SCL_VECTOR])
    with pytest.raises(RawDataError, match="offsets decrease") as err:
        _check_batch(Path("x.parquet"), batch, first_row=10)
    assert (err.value.column, err.value.row) == (SCL_VECTOR, 11)


def test_random_bytes_file_is_named(raw: Path) -> None:
    path = raw / "item_features.parquet"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(RawDataError, match="not a readable Parquet file") as err:
        validate_raw_dir(raw, full_scan=False)
    assert err.value.path == path


def test_truncated_file_is_named(raw: Path) -> None:
    path = raw / "train_user_features.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RawDataError) as err:
        validate_raw_dir(raw)
    assert err.value.path == path


@pytest.mark.parametrize("folder", ["train_samples.parquet", "train_samples"])
def test_directory_of_part_files(raw: Path, folder: str) -> None:
    (raw / "train_samples.parquet").unlink()
    parts = raw / folder
    parts.mkdir()
    table = samples_table()
    pq.write_table(table.slice(0, 2), parts / "part-00000.parquet")
    pq.write_table(table.slice(2), parts / "part-00001.parquet")
    (parts / "_SUCCESS").touch()
    files = validate_raw_dir(raw)["train_samples"]
    assert files == [parts / "part-00000.parquet", parts / "part-00001.parquet"]
    assert table_files(raw, "train_samples") == files
    assert num_rows(files) == 3
    # A bad row in the second part is reported with that part's file and its row within it.
    bad = samples_table([[1, 0], [0, 1], [1, 1]]).slice(2)
    pq.write_table(bad, parts / "part-00001.parquet")
    with pytest.raises(RawDataError) as err:
        validate_raw_dir(raw)
    assert (err.value.path, err.value.row) == (parts / "part-00001.parquet", 0)


def test_empty_table_directory(raw: Path) -> None:
    (raw / "item_features.parquet").unlink()
    (raw / "item_features").mkdir()
    with pytest.raises(RawDataError, match="no \\*.parquet files"):
        validate_raw_dir(raw)


def test_truth_table_checked_when_present(raw: Path) -> None:
    write(raw, "train_truth", pa.table({TRUTH_PROB: pa.array([0.1, 0.5, 0.9], pa.float32())}))
    assert validate_raw_dir(raw)["train_truth"] == [raw / "train_truth.parquet"]
    path = write(raw, "test_truth", pa.table({TRUTH_PROB: pa.array([0.1], pa.float32())}))
    with pytest.raises(RawDataError, match="1 rows but test_samples has 2") as err:
        validate_raw_dir(raw)
    assert err.value.path == path


def test_truth_probability_out_of_range(raw: Path) -> None:
    write(raw, "train_truth", pa.table({TRUTH_PROB: pa.array([0.1, 1.5, 0.9], pa.float32())}))
    with pytest.raises(RawDataError, match="outside") as err:
        validate_raw_dir(raw)
    assert err.value.row == 1


def test_iter_record_batches_streams_all_files_in_order(raw: Path) -> None:
    first = write(raw, "a", scl_table(), row_group_size=3)
    second = write(raw, "b", scl_table([SCL_DIM]))
    batches = list(iter_record_batches([first, second], [ITEM_ID], batch_rows=2))
    assert all(b.num_rows <= 2 and b.schema.names == [ITEM_ID] for b in batches)
    ids = [i for b in batches for i in b.column(ITEM_ID).to_pylist()]
    assert ids == ITEMS + ITEMS[:1]


def test_iter_record_batches_names_a_corrupt_file(raw: Path) -> None:
    bad = raw / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(RawDataError) as err:
        list(iter_record_batches([raw / "item_features.parquet", bad], [ITEM_ID]))
    assert err.value.path == bad
