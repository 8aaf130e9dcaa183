"""prepare(): vocabularies, remapped rows, SCL alignment, metadata and failure behaviour,
checked against values worked out by hand from tests/rawdata.py's tiny set."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow.parquet as pq
import pytest

import rawdata
from muse_torchrec import features as F
from muse_torchrec.data import prepare as P
from muse_torchrec.data import schema
from muse_torchrec.data.vocab import Lookup, VocabRule

MAX_HISTORY = 4

# Hand-derived vocabularies of the tiny set (full rule, histories cut to the last 4 behaviors).
ITEMS = [-42, 501, 502, 503, 504, 505, 506, 507, 508, 700, 900]
EXPECTED_VOCABS = {
    "item": ITEMS,
    "cate": [-5, 61, 62, 63, 64, 65],
    "user": [-77, 1001, 1002, 1003, 1004],
    "profile_1": [11, 12],
    "profile_2": [21, 22],
    "profile_3": [31, 32, 33],
    "profile_4": [41, 42, 43],
    "profile_5": [51, 52, 53],
    "item_city": [1, 2, 3, 4],
    "item_province": [11, 12, 13, 14],
}


def _row(item: int) -> int:
    return ITEMS.index(item) + 1


# Per split: (user_key, label, (item, cate, city, province) rows) in prepared order (users by first
# appearance, samples in raw order), then per user (user, profile rows, hist item rows, hist cate rows).
EXPECTED_SAMPLES = {
    "train": [
        (1001, 1, (_row(501), 2, 1, 1)),
        (1001, 0, (_row(700), 0, 0, 0)),  # 700 is missing from item_features
        (1001, 0, (_row(503), 4, 2, 1)),
        (-77, 1, (_row(502), 3, 1, 2)),
        (1002, 0, (_row(501), 2, 1, 1)),
        (1002, 1, (_row(504), 5, 0, 0)),  # 504's city and province are raw 0
        (1003, 0, (_row(505), 5, 3, 3)),
        (1003, 0, (0, 0, 0, 0)),  # raw target 0
        (1004, 0, (_row(502), 3, 1, 2)),
    ],
    "test": [
        (2001, 1, (_row(503), 4, 2, 1)),
        (2001, 0, (_row(506), 4, 2, 2)),
        (1001, 0, (_row(900), 6, 4, 4)),
    ],
}
EXPECTED_USERS = {
    "train": {
        1001: (2, (2, 0, 2, 2, 2), [_row(502), 0, _row(-42), _row(501)], [3, 0, 1, 2]),
        -77: (1, (2, 1, 3, 3, 3), [_row(502), _row(501)], [3, 2]),
        1002: (3, (1, 2, 1, 1, 1), [], []),
        1003: (4, (1, 1, 1, 1, 1), [_row(506), _row(501), _row(507), _row(508)], [4, 2, 3, 3]),
        1004: (5, (0, 0, 0, 0, 0), [], []),  # no user_features row
    },
    "test": {
        2001: (0, (0, 1, 1, 1, 0), [_row(900), _row(501), _row(503)], [6, 2, 4]),  # unseen user/profiles -> 0
        1001: (2, (2, 2, 2, 2, 2), [_row(502), _row(503)], [3, 4]),
    },
}
# SCL rows follow the SCL file: 9999 is dropped, 503 (first vector, seed 2) -> 1, 501 -> 2, 900 -> 3,
# 506 -> 4.
EXPECTED_SCL = {503: (1, 2), 501: (2, 3), 900: (3, 4), 506: (4, 5)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    raw = rawdata.write_raw(root / "raw", rawdata.tiny_tables())
    P.prepare(raw, root / "prepared", max_history=MAX_HISTORY, progress=False)
    return root / "prepared"


def read_split(prepared: Path, split: str) -> List[dict]:
    """Every prepared sample of ``split`` joined with its user row (pure pyarrow/Python)."""
    meta = P.json.loads((prepared / P.META_FILE).read_text())
    rows = []
    for shard in meta["splits"][split]["shards"]:
        samples = pq.read_table(prepared / shard["samples_file"]).to_pylist()
        users = pq.read_table(prepared / shard["users_file"]).to_pylist()
        rows += [{**s, **{f"u_{k}": v for k, v in users[s[P.USER_INDEX]].items()}} for s in samples]
    return rows


def test_vocabularies_by_hand(tiny: Path) -> None:
    for table, ids in EXPECTED_VOCABS.items():
        saved = np.load(tiny / P.VOCAB_DIR / f"{table}.npy")
        assert saved.dtype == np.int64
        assert saved.tolist() == ids, table


def test_samples_and_users_remapped_by_hand(tiny: Path) -> None:
    for split in P.SPLITS:
        rows = read_split(tiny, split)
        got = [(r[P.USER_KEY], r[P.LABEL], tuple(r[t.name] for t in P.TARGET_TABLES)) for r in rows]
        assert got == EXPECTED_SAMPLES[split]
        users = {
            r[P.USER_KEY]: (
                r[f"u_{F.USER.name}"],
                tuple(r[f"u_{t.name}"] for t in F.PROFILE),
                r[f"u_{P.HIST_ITEMS}"],
                r[f"u_{P.HIST_CATES}"],
            )
            for r in rows
        }
        assert users == EXPECTED_USERS[split]


def test_each_user_stored_once(tiny: Path) -> None:
    for split in P.SPLITS:
        meta = P.json.loads((tiny / P.META_FILE).read_text())
        for shard in meta["splits"][split]["shards"]:
            samples = pq.read_table(tiny / shard["samples_file"])
            users = pq.read_table(tiny / shard["users_file"])
            assert users.num_rows == len(set(samples.column(P.USER_KEY).to_pylist()))
            assert samples.schema.field(P.USER_INDEX).type == "int32"


def test_scl_alignment(tiny: Path) -> None:
    scl = np.load(tiny / P.SCL_FILE, mmap_mode="r")
    item_scl_row = np.load(tiny / P.ITEM_SCL_ROW_FILE, mmap_mode="r")
    assert scl.shape == (5, F.SCL_DIM) and scl.dtype == np.int8
    assert item_scl_row.shape == (len(ITEMS) + 1,) and item_scl_row.dtype == np.int32
    assert not scl[0].any()
    for item in ITEMS:
        expected = EXPECTED_SCL.get(item)
        assert item_scl_row[_row(item)] == (0 if expected is None else expected[0]), item
        if expected is not None:
            np.testing.assert_array_equal(scl[expected[0]], rawdata.scl_vector(expected[1]))
    assert item_scl_row[0] == 0


def test_meta_counts_and_coverage(tiny: Path) -> None:
    meta = P.json.loads((tiny / P.META_FILE).read_text())
    assert meta["format_version"] == P.FORMAT_VERSION
    assert meta["max_history"] == MAX_HISTORY
    assert meta["vocab_sizes"] == {t: len(ids) + 1 for t, ids in EXPECTED_VOCABS.items()}
    assert meta["vocab"]["rule"] == "full" and meta["vocab"]["item_min_count"] == 1
    train, test = meta["splits"]["train"], meta["splits"]["test"]
    assert (train["samples"], train["positives"], train["users"], train["interactions"]) == (9, 3, 5, 9)
    assert (test["samples"], test["positives"], test["users"], test["interactions"]) == (3, 1, 2, 5)
    assert train["item_coverage"] == test["item_coverage"] == 1.0
    # Train targets with a vector: 501, 503, 501 of 9; behaviors: 506, 501 x3 of 9 (2 of them in 1003's cut).
    assert train["scl_coverage"] == {"targets": pytest.approx(3 / 9), "interactions": pytest.approx(4 / 9)}
    assert test["scl_coverage"] == {"targets": 1.0, "interactions": pytest.approx(4 / 5)}
    assert meta["scl"]["item_rows_with_vector"] == 4
    assert not train["has_truth"]
    for split in (train, test):
        assert sum(s["num_samples"] for s in split["shards"]) == split["samples"]
        assert sum(c[0] for s in split["shards"] for c in s["chunks"]) == split["samples"]
    assert set(meta["stages"]) >= {"validate", "count", "vocab", "scl", "partition_train", "shards_test"}


def test_min_count_drops_rare_history_ids_keeps_targets(tmp_path: Path) -> None:
    raw = rawdata.write_raw(tmp_path / "raw", rawdata.tiny_tables())
    meta = P.prepare(raw, tmp_path / "out", "min-count:2", max_history=MAX_HISTORY, progress=False)
    # History counts (both splits, last 4 behaviors): 501 x4, 502 x3, 503 x2, the rest once.
    kept = [501, 502, 503, 504, 505, 506, 700, 900]
    assert np.load(tmp_path / "out" / P.VOCAB_DIR / "item.npy").tolist() == kept
    users = {r[P.USER_KEY]: r[f"u_{P.HIST_ITEMS}"] for r in read_split(tmp_path / "out", "train")}
    row = {item: i + 1 for i, item in enumerate(kept)}
    assert users[1003] == [row[506], row[501], 0, 0]  # 507 and 508 seen once
    assert users[1001] == [row[502], 0, 0, row[501]]  # -42 seen once
    assert meta["splits"]["train"]["item_coverage"] == pytest.approx(6 / 9)
    assert meta["vocab"]["item_min_count"] == 2


def test_vocab_rule_threshold() -> None:
    counts, ids = np.array([1, 5, 50]), np.array([10, 4, 3])  # interactions 10, 20, 150
    assert VocabRule.parse("p90").threshold(counts, ids) == 5  # >= 50 covers 150/180, >= 5 covers 170/180
    assert VocabRule.parse("full").threshold(counts, ids) == 1
    assert VocabRule.parse("min-count:7").threshold(counts, ids) == 7
    assert str(VocabRule.parse("min-count:7")) == "min-count:7"
    for bad in ("p95", "min-count:0", "min-count:x"):
        with pytest.raises(ValueError):
            VocabRule.parse(bad)


def _history_counts(tables: rawdata.Tables, max_history: int) -> Counter:
    counts: Counter = Counter()
    for split in P.SPLITS:
        for items in tables[schema.user_features_table(split)].column(F.HIST_ITEMS).to_pylist():
            counts.update(i for i in items[-max_history:] if i != 0)
    return counts


def test_p90_rule_brute_force(tmp_path: Path) -> None:
    tables = rawdata.random_tables(seed=3)
    raw = rawdata.write_raw(tmp_path / "raw", tables)
    meta = P.prepare(raw, tmp_path / "out", "p90", max_history=10, progress=False)
    counts = _history_counts(tables, 10)
    total = sum(counts.values())
    covered = {n: sum(c for c in counts.values() if c >= n) for n in set(counts.values())}
    threshold = max(n for n, cov in covered.items() if cov >= 0.9 * total)
    assert meta["vocab"]["item_min_count"] == threshold > 1
    targets = {i for s in P.SPLITS for i in tables[schema.samples_table(s)].column(F.ITEM_ID).to_pylist()} - {
        0
    }
    expected = sorted({i for i, c in counts.items() if c >= threshold} | targets)
    assert np.load(tmp_path / "out" / P.VOCAB_DIR / "item.npy").tolist() == expected
    splits = meta["splits"]
    kept = sum(splits[s]["item_coverage"] * splits[s]["interactions"] for s in P.SPLITS)
    assert kept >= 0.9 * total


def test_histories_truncated_to_last_max_history(tmp_path: Path) -> None:
    raw = rawdata.write_raw(tmp_path / "raw", rawdata.tiny_tables())
    P.prepare(raw, tmp_path / "out", max_history=2, progress=False)
    users = {r[P.USER_KEY]: r[f"u_{P.HIST_ITEMS}"] for r in read_split(tmp_path / "out", "train")}
    item = np.load(tmp_path / "out" / P.VOCAB_DIR / "item.npy").tolist()
    assert users[1003] == [item.index(507) + 1, item.index(508) + 1]
    assert users[1001] == [item.index(-42) + 1, item.index(501) + 1]


def _shard_contents(prepared: Path) -> Dict[str, list]:
    return {split: read_split(prepared, split) for split in P.SPLITS}


def test_single_file_and_part_dir_layouts_prepare_alike(tmp_path: Path) -> None:
    tables = rawdata.random_tables(seed=1)
    outputs = []
    for parts in (1, 3):
        raw = rawdata.write_raw(tmp_path / f"raw{parts}", tables, parts=parts)
        P.prepare(
            raw, tmp_path / f"out{parts}", max_history=12, progress=False, bucket_bytes=4096, chunk_samples=16
        )
        outputs.append(tmp_path / f"out{parts}")
    assert _shard_contents(outputs[0]) == _shard_contents(outputs[1])
    for table in EXPECTED_VOCABS:
        np.testing.assert_array_equal(*[np.load(o / P.VOCAB_DIR / f"{table}.npy") for o in outputs])


def test_chunks_are_aligned_row_groups(tmp_path: Path) -> None:
    raw = rawdata.write_raw(tmp_path / "raw", rawdata.random_tables(seed=2))
    meta = P.prepare(
        raw, tmp_path / "out", max_history=12, progress=False, bucket_bytes=4096, chunk_samples=16
    )
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) > 1 and any(len(s["chunks"]) > 1 for s in shards)
    for shard in shards:
        samples = pq.ParquetFile(tmp_path / "out" / shard["samples_file"])
        users = pq.ParquetFile(tmp_path / "out" / shard["users_file"])
        first_user = 0
        for g, (n_samples, n_users) in enumerate(shard["chunks"]):
            index = samples.read_row_group(g).column(P.USER_INDEX).to_numpy()
            assert users.metadata.row_group(g).num_rows == n_users and index.size == n_samples
            # Samples reference only their chunk's users, grouped by user in ascending order.
            assert index.min() == first_user and index.max() == first_user + n_users - 1
            assert np.all(np.diff(index) >= 0)
            first_user += n_users


def test_truth_probabilities_follow_their_samples(tmp_path: Path) -> None:
    tables = rawdata.random_tables(seed=4)
    raw = rawdata.write_raw(tmp_path / "raw", tables)
    meta = P.prepare(raw, tmp_path / "out", progress=False, bucket_bytes=4096)
    assert meta["splits"]["train"]["has_truth"]
    samples = tables[schema.samples_table("train")]
    raw_rows = Counter(
        zip(
            samples.column(F.USER_ID).to_pylist(),
            tables[schema.truth_table("train")].column(schema.TRUTH_PROB).to_numpy().tolist(),
        )
    )
    got = Counter(
        (r[P.USER_KEY], float(np.float32(r[P.PROB]))) for r in read_split(tmp_path / "out", "train")
    )
    assert got == raw_rows


def test_invalid_raw_dir_fails_and_leaves_nothing(tmp_path: Path) -> None:
    tables = rawdata.tiny_tables()
    del tables[schema.ITEM_FEATURES_TABLE]
    raw = rawdata.write_raw(tmp_path / "raw", tables)
    with pytest.raises(schema.RawDataError, match=schema.ITEM_FEATURES_TABLE):
        P.prepare(raw, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_failure_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = rawdata.write_raw(tmp_path / "raw", rawdata.tiny_tables())

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(P, "_write_shard", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        P.prepare(raw, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    raw = rawdata.write_raw(tmp_path / "raw", rawdata.tiny_tables())
    out = tmp_path / "out"
    P.prepare(raw, out, max_history=MAX_HISTORY, progress=False)
    with pytest.raises(FileExistsError):
        P.prepare(raw, out, progress=False)
    meta = P.prepare(raw, out, max_history=2, overwrite=True, progress=False)
    assert P.json.loads((out / P.META_FILE).read_text())["max_history"] == meta["max_history"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]


@pytest.mark.parametrize("indexed", [False, True])
def test_lookup_matches_searchsorted(monkeypatch: pytest.MonkeyPatch, indexed: bool) -> None:
    monkeypatch.setattr(Lookup, "SMALL", 0 if indexed else 1 << 30)
    rng = np.random.default_rng(0)
    extremes = np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max, 0, -1, 1])
    vocabularies = [
        np.zeros(0, np.int64),
        np.array([5]),
        np.unique(rng.integers(-50, 50, 30)),  # dense small ids: one slice holds them all
        np.unique(rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 5000)),  # hashed ids
        np.unique(np.concatenate([np.arange(1, 3000), rng.integers(-(2**62), 2**62, 300)])),  # skewed
        np.unique(extremes[extremes != 0]),
    ]
    for vocab in vocabularies:
        queries = np.concatenate([vocab, rng.integers(-(2**62), 2**62, 500), np.arange(-60, 60), extremes])
        pos = np.searchsorted(vocab, queries)
        found = (pos < vocab.size) & (np.append(vocab, 0)[pos] == queries)
        got = Lookup(vocab)(queries)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, np.where(found, pos + 1, 0))
