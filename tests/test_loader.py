"""Loader: blocks equal a brute-force join of the raw tables; exact rank x worker coverage; order."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import numpy as np
import pytest

import rawdata
from muse_torchrec import features as F
from muse_torchrec.data import schema
from muse_torchrec.data.block import SampleBlock
from muse_torchrec.data.loader import (
    PreparedData,
    PreparedDataError,
    count_batches,
    iter_blocks,
    make_loader,
)
from muse_torchrec.data.prepare import FORMAT_VERSION, META_FILE, TARGET_TABLES, USER_TABLES, json, prepare

MAX_HISTORY = 12
Row = Tuple


@pytest.fixture(scope="module")
def raw_tables() -> rawdata.Tables:
    return rawdata.random_tables(seed=7, train_users=150, test_users=50)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, raw_tables: rawdata.Tables) -> PreparedData:
    root = tmp_path_factory.mktemp("loader")
    raw = rawdata.write_raw(root / "raw", raw_tables)
    # Tiny buckets and chunks: several shards of several chunks, so units are dealt for real.
    prepare(
        raw, root / "prepared", max_history=MAX_HISTORY, bucket_bytes=4096, chunk_samples=24, progress=False
    )
    return PreparedData(root / "prepared")


def block_rows(block: SampleBlock) -> List[Row]:
    """One comparable tuple per sample of a block (its user's lists resolved)."""
    rows = []
    for i in range(block.batch_size):
        u = block.sample_user[i]
        lo, hi = block.hist_offsets[u], block.hist_offsets[u + 1]
        rows.append(
            (
                float(block.labels[i]),
                int(block.user_key[i]),
                tuple(int(block.target[t.name][i]) for t in TARGET_TABLES),
                float(block.true_prob[i]),
                tuple(int(block.user_features[t.name][u]) for t in USER_TABLES),
                tuple(block.hist_items[lo:hi].tolist()),
                tuple(block.hist_cates[lo:hi].tolist()),
            )
        )
    return rows


def rows_of(blocks: Iterable[SampleBlock]) -> List[Row]:
    return [row for block in blocks for row in block_rows(block)]


def brute_force(tables: rawdata.Tables, data: PreparedData, split: str) -> List[Row]:
    """Each raw sample joined by hand: Python dicts for users, items and every vocabulary."""
    rows = {
        t.name: {raw: i + 1 for i, raw in enumerate(data.vocab(t.name).tolist())}
        for t in (*TARGET_TABLES, *USER_TABLES)
    }
    items: Dict[int, dict] = {}
    for item in tables[schema.ITEM_FEATURES_TABLE].to_pylist():
        items.setdefault(item[F.ITEM_ID], item)
    users = {u[F.USER_ID]: u for u in tables[schema.user_features_table(split)].to_pylist()}
    attribute = {F.CATE.name: F.ITEM_CATE, F.CITY.name: F.ITEM_CITY, F.PROVINCE.name: F.ITEM_PROVINCE}
    samples = tables[schema.samples_table(split)].to_pylist()
    probs = tables[schema.truth_table(split)].column(schema.TRUTH_PROB).to_pylist()
    expected = []
    for sample, prob in zip(samples, probs):
        item = items.get(sample[F.ITEM_ID], {})
        user = users.get(sample[F.USER_ID], {})
        target = [rows[F.ITEM.name].get(sample[F.ITEM_ID], 0)]
        target += [rows[name].get(item.get(column, 0), 0) for name, column in attribute.items()]
        user_rows = [rows[F.USER.name].get(sample[F.USER_ID], 0)]
        user_rows += [rows[t.name].get(user.get(t.raw_columns[0], 0), 0) for t in F.PROFILE]
        hist = user.get(F.HIST_ITEMS, [])[-MAX_HISTORY:]
        cates = user.get(F.HIST_CATES, [])[-MAX_HISTORY:]
        expected.append(
            (
                float(sample[F.LABEL][1]),
                sample[F.USER_ID],
                tuple(target),
                float(np.float32(prob)),
                tuple(user_rows),
                tuple(rows[F.ITEM.name].get(i, 0) for i in hist),
                tuple(rows[F.CATE.name].get(c, 0) for c in cates),
            )
        )
    return expected


@pytest.mark.parametrize("batch_size", [1, 7, 64, 10_000])
@pytest.mark.parametrize("split", ["train", "test"])
def test_blocks_equal_brute_force_join(
    data: PreparedData, raw_tables: rawdata.Tables, split: str, batch_size: int
) -> None:
    blocks = list(iter_blocks(data, split, batch_size))
    assert Counter(rows_of(blocks)) == Counter(brute_force(raw_tables, data, split))
    assert all(b.batch_size == batch_size for b in blocks[:-1]) and 0 < blocks[-1].batch_size <= batch_size
    block = blocks[0]
    assert block.labels.dtype == np.float32 and block.hist_items.dtype == np.int64
    assert block.sample_user.dtype == np.int64 and block.hist_offsets[0] == 0
    for block in blocks:
        # Each user of a block is stored once.
        first_sample = np.searchsorted(block.sample_user, np.arange(block.num_users))
        assert np.unique(block.user_key[first_sample]).size == block.num_users


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [1, 2])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_and_workers_cover_every_sample_once(
    data: PreparedData, raw_tables: rawdata.Tables, world_size: int, num_workers: int, drop_last: bool
) -> None:
    batch_size = 10
    got: List[Row] = []
    for rank in range(world_size):
        blocks = [
            b
            for w in range(num_workers)
            for b in iter_blocks(
                data,
                "train",
                batch_size,
                rank=rank,
                world_size=world_size,
                worker_id=w,
                num_workers=num_workers,
                drop_last=drop_last,
            )
        ]
        expected_count = count_batches(
            data,
            "train",
            batch_size,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            drop_last=drop_last,
        )
        assert len(blocks) == expected_count
        got += rows_of(blocks)
    expected = brute_force(raw_tables, data, "train")
    if drop_last:
        # Only each consumer's last partial block may be dropped.
        assert not Counter(got) - Counter(expected)
        assert len(expected) - len(got) < world_size * num_workers * batch_size
    else:
        assert Counter(got) == Counter(expected)


def test_deterministic_for_a_seed(data: PreparedData) -> None:
    def order(seed: int, shuffle: bool) -> List[Row]:
        return rows_of(iter_blocks(data, "train", 16, seed=seed, shuffle=shuffle, world_size=2, rank=1))

    assert order(0, False) == order(5, False)
    assert order(3, True) == order(3, True)
    assert order(3, True) != order(4, True)
    assert order(3, True) != order(3, False)
    assert Counter(order(3, True)) == Counter(order(4, True)) == Counter(order(0, False))


def test_shuffle_keeps_a_users_samples_together(data: PreparedData) -> None:
    keys = np.concatenate([b.user_key for b in iter_blocks(data, "train", 16, shuffle=True, seed=1)])
    runs = keys[np.r_[True, keys[1:] != keys[:-1]]]
    assert runs.size == np.unique(keys).size


@pytest.mark.parametrize("batch_size", [5, 16, 1000])
@pytest.mark.parametrize("num_workers", [0, 1, 3])
def test_count_batches_matches_iteration(data: PreparedData, batch_size: int, num_workers: int) -> None:
    for drop_last in (False, True):
        for rank in range(2):
            count = count_batches(
                data,
                "test",
                batch_size,
                rank=rank,
                world_size=2,
                num_workers=num_workers,
                drop_last=drop_last,
            )
            workers = max(num_workers, 1)
            blocks = sum(
                1
                for w in range(workers)
                for _ in iter_blocks(
                    data,
                    "test",
                    batch_size,
                    rank=rank,
                    world_size=2,
                    worker_id=w,
                    num_workers=workers,
                    drop_last=drop_last,
                )
            )
            assert count == blocks


def test_make_loader_with_workers_delivers_same_samples(
    data: PreparedData, raw_tables: rawdata.Tables
) -> None:
    expected = Counter(brute_force(raw_tables, data, "train"))
    in_process = list(make_loader(data, "train", 20, block_rows, num_workers=0, shuffle=True, seed=2))
    assert Counter(r for rows in in_process for r in rows) == expected
    assert len(in_process) == count_batches(data, "train", 20, rank=0, world_size=1, num_workers=0)
    two = list(make_loader(data, "train", 20, block_rows, num_workers=2, shuffle=True, seed=2))
    assert Counter(r for rows in two for r in rows) == expected
    assert len(two) == count_batches(data, "train", 20, rank=0, world_size=1, num_workers=2)
    assert two == list(make_loader(data, "train", 20, block_rows, num_workers=2, shuffle=True, seed=2))


def test_prepared_data_accessors(data: PreparedData, raw_tables: rawdata.Tables) -> None:
    assert data.vocab_size(F.ITEM.name) == data.vocab(F.ITEM.name).size + 1
    scl, item_scl_row = data.scl_vectors(), data.item_scl_row()
    assert isinstance(scl, np.memmap) and scl.dtype == np.int8 and scl.shape[1] == F.SCL_DIM
    assert isinstance(item_scl_row, np.memmap) and item_scl_row.shape == (data.vocab_size(F.ITEM.name),)
    assert item_scl_row.max() == scl.shape[0] - 1
    assert data.has_truth("train")
    assert data.num_samples("train") == sum(u.num_samples for u in data.work_units("train"))
    assert data.num_samples("train") == raw_tables[schema.samples_table("train")].num_rows
    with pytest.raises(KeyError, match="no vocabulary"):
        data.vocab_size("nope")


def test_incomplete_or_foreign_dir_is_refused(tmp_path: Path, data: PreparedData) -> None:
    with pytest.raises(PreparedDataError, match="no meta.json"):
        PreparedData(tmp_path)
    meta = dict(data.meta, format_version=FORMAT_VERSION + 1)
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(PreparedDataError, match="format version"):
        PreparedData(tmp_path)


def _frozen_objects(block: SampleBlock) -> int:
    import gc

    return gc.get_freeze_count()


def test_workers_never_collect_what_they_inherited(data: PreparedData) -> None:
    """A forked worker must not free the parent's objects: freeing an inherited CUDA tensor in a
    forked process fails ("CUDA error: initialization error"), so workers freeze what they inherit."""
    import gc

    assert gc.get_freeze_count() == 0
    frozen = list(make_loader(data, "train", 20, _frozen_objects, num_workers=2, shuffle=False, seed=0))
    assert frozen and all(count > 1000 for count in frozen)
