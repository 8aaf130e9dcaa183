"""Small raw Taobao-MM sets for tests, written with pyarrow in the published schema.

``tiny_tables`` is written by hand (the expected vocabularies and rows of test_prepare.py are
derived from it on paper); ``random_tables`` draws a larger random set for brute-force comparisons.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from muse_torchrec import features as F
from muse_torchrec.data import schema
from muse_torchrec.data.prepare import ragged_index

Tables = Dict[str, pa.Table]


def samples(rows: Sequence[tuple]) -> pa.Table:
    """Rows of (user, item, click) -> a samples table (label one-hot [no click, click])."""
    users, items, clicks = zip(*rows)
    return pa.table(
        {
            F.LABEL: [[1 - c, c] for c in clicks],
            F.USER_ID: list(users),
            F.ITEM_ID: list(items),
        },
        schema=schema.SAMPLES_SCHEMA,
    )


def user_features(rows: Sequence[tuple]) -> pa.Table:
    """Rows of (user, (5 profile ids), [history items], [history categories])."""
    users, profiles, items, cates = zip(*rows)
    columns = {F.USER_ID: list(users)}
    columns.update({c: [p[i] for p in profiles] for i, c in enumerate(F.USER_PROFILE)})
    columns.update({F.HIST_ITEMS: list(items), F.HIST_CATES: list(cates)})
    return pa.table(columns, schema=schema.USER_FEATURES_SCHEMA)


def item_features(rows: Sequence[tuple]) -> pa.Table:
    """Rows of (item, category, city, province)."""
    cols = list(zip(*rows))
    names = (F.ITEM_ID, F.ITEM_CATE, F.ITEM_CITY, F.ITEM_PROVINCE)
    return pa.table({n: list(c) for n, c in zip(names, cols)}, schema=schema.ITEM_FEATURES_SCHEMA)


def scl_vector(seed: int) -> np.ndarray:
    """A distinct, recognisable [128] int8 vector per seed."""
    return ((np.arange(F.SCL_DIM) * 7 + seed * 13) % 255 - 127).astype(np.int8)


def scl(rows: Sequence[tuple]) -> pa.Table:
    """Rows of (item, vector seed)."""
    items, seeds = zip(*rows)
    return pa.table(
        {F.ITEM_ID: list(items), F.SCL_VECTOR: [scl_vector(s).tolist() for s in seeds]},
        schema=schema.SCL_SCHEMA,
    )


# Hand-made set. Items 501..508, -42 (negative id), 700 (a target missing from item_features and
# from SCL), 900 (test-only), 9999 (SCL only), 12345 (item_features only). User 1004 has samples
# but no user_features row; 2001 is test-only; 1001 is in both splits with different rows.
TINY_TRAIN_USERS = [
    (1003, (11, 21, 31, 41, 51), [504, 505, 506, 501, 507, 508], [64, 64, 63, 61, 62, 62]),
    (1001, (12, 0, 32, 42, 52), [501, 502, 0, -42, 501], [61, 62, 0, -5, 61]),
    (1002, (11, 22, 31, 41, 51), [], []),
    (-77, (12, 21, 33, 43, 53), [502, 501], [62, 61]),
]
TINY_TRAIN_SAMPLES = [
    (1001, 501, 1), (1001, 700, 0), (1001, 503, 0),
    (-77, 502, 1),
    (1002, 501, 0), (1002, 504, 1),
    (1003, 505, 0), (1003, 0, 0),
    (1004, 502, 0),
]  # fmt: skip
TINY_TEST_USERS = [
    (2001, (13, 21, 31, 41, 99), [900, 501, 503], [65, 61, 63]),
    (1001, (12, 22, 32, 42, 52), [502, 503], [62, 63]),
]
TINY_TEST_SAMPLES = [(2001, 503, 1), (2001, 506, 0), (1001, 900, 0)]
TINY_ITEMS = [
    (501, 61, 1, 11), (502, 62, 1, 12), (503, 63, 2, 11), (504, 64, 0, 0), (505, 64, 3, 13),
    (506, 63, 2, 12), (900, 65, 4, 14), (12345, 66, 5, 15),
]  # fmt: skip
# (item, vector seed): 503 appears twice (the first vector wins), 9999 is in no vocabulary.
TINY_SCL = [(9999, 1), (503, 2), (501, 3), (900, 4), (506, 5), (503, 6)]


def tiny_tables() -> Tables:
    return {
        schema.samples_table("train"): samples(TINY_TRAIN_SAMPLES),
        schema.samples_table("test"): samples(TINY_TEST_SAMPLES),
        schema.user_features_table("train"): user_features(TINY_TRAIN_USERS),
        schema.user_features_table("test"): user_features(TINY_TEST_USERS),
        schema.ITEM_FEATURES_TABLE: item_features(TINY_ITEMS),
        schema.SCL_TABLE: scl(TINY_SCL),
    }


def _list_column(lengths: np.ndarray, values: np.ndarray) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int64()))


def random_tables(
    seed: int = 0, train_users: int = 120, test_users: int = 40, num_items: int = 400, max_len: int = 30
) -> Tables:
    """A random raw set with truth tables: users with 0..max_len behaviors and 1..4 samples each,
    user_features rows shuffled, ~5 % of sample users without a user_features row, ~10 % of items
    without item_features, ~30 % without an SCL vector, raw 0 sprinkled in the histories."""
    rng = np.random.default_rng(seed)
    # Distinct signed ids (collisions among 2 x num_items draws in 2e12 are negligible), in random order.
    items = rng.permutation(np.unique(rng.integers(-(10**12), 10**12, size=2 * num_items))[:num_items])
    item_cate = rng.integers(1, 30, size=num_items)
    popularity = 1.0 / np.arange(1, num_items + 1)
    popularity /= popularity.sum()
    tables: Tables = {}
    for split, n, first_user in (
        ("train", train_users, 10**6),
        ("test", test_users, 10**6 + train_users // 2),
    ):
        users = np.arange(first_user, first_user + n)
        lengths = rng.integers(0, max_len + 1, size=n)
        picks = rng.choice(num_items, size=lengths.sum(), p=popularity)
        hist = np.where(rng.random(picks.size) < 0.05, 0, items[picks])
        cates = np.where(hist == 0, 0, item_cate[picks])
        profiles = {c: rng.integers(0, 6, size=n) for c in F.USER_PROFILE}
        ranges = np.concatenate([[0], np.cumsum(lengths)])
        keep_rows = rng.permutation(np.flatnonzero(rng.random(n) > 0.05))
        index = ragged_index(ranges[:-1][keep_rows], lengths[keep_rows])
        columns: Dict[str, pa.Array] = {F.USER_ID: pa.array(users[keep_rows])}
        columns.update({c: pa.array(v[keep_rows]) for c, v in profiles.items()})
        columns[F.HIST_ITEMS] = _list_column(lengths[keep_rows], hist[index])
        columns[F.HIST_CATES] = _list_column(lengths[keep_rows], cates[index])
        tables[schema.user_features_table(split)] = pa.table(columns, schema=schema.USER_FEATURES_SCHEMA)
        per_user = rng.integers(1, 5, size=n)
        sample_users = np.repeat(users, per_user)
        clicks = (rng.random(sample_users.size) < 0.3).astype(int)
        targets = items[rng.choice(num_items, size=sample_users.size, p=popularity)]
        tables[schema.samples_table(split)] = samples(
            list(zip(sample_users.tolist(), targets.tolist(), clicks.tolist()))
        )
        prob = rng.random(sample_users.size).astype(np.float32)
        tables[schema.truth_table(split)] = pa.table({schema.TRUTH_PROB: prob}, schema=schema.TRUTH_SCHEMA)
    listed = rng.random(num_items) > 0.1
    tables[schema.ITEM_FEATURES_TABLE] = item_features(
        list(
            zip(
                items[listed],
                item_cate[listed],
                rng.integers(0, 8, num_items)[listed],
                rng.integers(0, 4, num_items)[listed],
            )
        )
    )
    with_scl = np.flatnonzero(rng.random(num_items) > 0.3)
    tables[schema.SCL_TABLE] = scl(list(zip(items[with_scl].tolist(), with_scl.tolist())))
    return tables


def write_raw(raw_dir: Path, tables: Tables, parts: int = 1) -> Path:
    """Write ``tables`` into ``raw_dir``: ``<name>.parquet`` files (parts=1) or ``<name>/`` dirs of
    ``parts`` part files each, with small row groups so that streaming crosses group boundaries."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        if parts == 1:
            pq.write_table(table, raw_dir / f"{name}.parquet", row_group_size=3)
            continue
        (raw_dir / name).mkdir()
        bounds: List[int] = np.linspace(0, table.num_rows, parts + 1).astype(int).tolist()
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            pq.write_table(
                table.slice(lo, hi - lo), raw_dir / name / f"part-{i:05d}.parquet", row_group_size=3
            )
    return raw_dir
