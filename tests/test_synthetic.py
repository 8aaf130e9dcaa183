"""Synthetic Taobao-MM generator: files, determinism, realistic shapes and the planted signal."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import muse_torchrec.data.synthetic as synthetic
from muse_torchrec.config import SynthConfig
from muse_torchrec.data.schema import RAW_TABLES, TRUTH_PROB, validate_raw_dir
from muse_torchrec.data.synthetic import STATS_FILE, auc, synthesize
from muse_torchrec.features import (
    HIST_CATES,
    HIST_ITEMS,
    ITEM_CATE,
    ITEM_ID,
    LABEL,
    MAX_HISTORY,
    SCL_VECTOR,
    USER_ID,
    USER_PROFILE,
)

SMALL = SynthConfig(train_users=300, test_users=100, num_items=20_000, seed=3)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Dict[str, object]]:
    out = tmp_path_factory.mktemp("synth") / "raw"
    return out, synthesize(out, SMALL)


def read(raw: Path, name: str) -> pa.Table:
    return pq.read_table(raw / f"{name}.parquet")


def file_bytes(raw: Path) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(raw.iterdir())}


def test_files_and_validation(generated: Tuple[Path, Dict[str, object]]) -> None:
    raw, stats = generated
    expected = {f"{name}.parquet" for name in RAW_TABLES}
    expected |= {"train_truth.parquet", "test_truth.parquet", STATS_FILE}
    assert {p.name for p in raw.iterdir()} == expected
    found = validate_raw_dir(raw)
    assert set(found) == set(RAW_TABLES) | {"train_truth", "test_truth"}
    assert json.loads((raw / STATS_FILE).read_text()) == stats
    for name, schema in RAW_TABLES.items():
        assert pq.read_schema(raw / f"{name}.parquet").equals(schema), name
        metadata = pq.ParquetFile(raw / f"{name}.parquet").metadata
        assert metadata.row_group(0).column(0).compression == "SNAPPY"


def test_same_seed_is_bit_identical_and_other_seed_differs(
    generated: Tuple[Path, Dict[str, object]], tmp_path: Path
) -> None:
    raw, _ = generated
    again = synthesize(tmp_path / "again", SMALL)
    assert file_bytes(tmp_path / "again") == file_bytes(raw)
    other = synthesize(tmp_path / "other", dataclasses.replace(SMALL, seed=4))
    assert other != again
    changed = file_bytes(tmp_path / "other")
    for name in ("train_samples", "train_user_features", "scl_embedding_int8_p90"):
        assert changed[f"{name}.parquet"] != file_bytes(raw)[f"{name}.parquet"]


def test_refuses_to_overwrite_and_leaves_no_temp_dir(tmp_path: Path) -> None:
    tiny = SynthConfig(train_users=20, test_users=10, num_items=2000, num_categories=40)
    out = tmp_path / "raw"
    out.mkdir()  # an empty directory may be filled
    synthesize(out, tiny)
    before = file_bytes(out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        synthesize(out, tiny)
    assert file_bytes(out) == before
    synthesize(out, dataclasses.replace(tiny, seed=9), overwrite=True)
    assert file_bytes(out) != before
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_crash_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "_write_samples", fail)
    tiny = SynthConfig(train_users=20, test_users=10, num_items=2000, num_categories=40)
    with pytest.raises(RuntimeError, match="disk full"):
        synthesize(tmp_path / "raw", tiny)
    assert list(tmp_path.iterdir()) == []


def test_samples_shape(generated: Tuple[Path, Dict[str, object]]) -> None:
    raw, stats = generated
    for split in ("train", "test"):
        samples = read(raw, f"{split}_samples")
        users = read(raw, f"{split}_user_features")
        truth = read(raw, f"{split}_truth").column(TRUTH_PROB).to_numpy()
        user = samples.column(USER_ID).to_numpy()
        # A user's samples are contiguous, and every sample's user has a feature row.
        starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
        assert np.unique(user).size == starts.size == users.num_rows
        assert set(user) == set(users.column(USER_ID).to_numpy())
        assert 9 < samples.num_rows / users.num_rows < 13
        label = np.stack(samples.column(LABEL).to_numpy(zero_copy_only=False))[:, 1]
        assert stats["ctr"][split] == pytest.approx(label.mean())
        assert truth.dtype == np.float32 and truth.size == samples.num_rows
        assert abs(label.mean() - truth.mean()) < 0.03  # labels are Bernoulli(truth)
        assert (samples.column(ITEM_ID).to_numpy() != 0).all() and (user != 0).all()


def test_users_and_items_shape(generated: Tuple[Path, Dict[str, object]]) -> None:
    raw, _ = generated
    train, test = read(raw, "train_user_features"), read(raw, "test_user_features")
    lengths = train.column(HIST_ITEMS).combine_chunks().value_lengths().to_numpy()
    assert lengths.max() == MAX_HISTORY and (lengths == 0).any()
    assert 0.5 < (lengths == MAX_HISTORY).mean() < 0.95
    profile = np.stack([train.column(c).to_numpy() for c in USER_PROFILE], axis=1)
    assert (profile == 0).any()  # some users miss a profile field
    assert np.unique(profile[:, 1]).size <= 5  # 130_2 has 4 values, plus 0 = missing
    # Users in both splits have the same id, profile and history.
    train_rows = {u: i for i, u in enumerate(train.column(USER_ID).to_pylist())}
    test_users = test.column(USER_ID).to_pylist()
    shared = [(train_rows[u], i) for i, u in enumerate(test_users) if u in train_rows]
    assert shared
    for column in (*USER_PROFILE, HIST_ITEMS, HIST_CATES):
        assert all(train.column(column)[a] == test.column(column)[b] for a, b in shared)
    # Behavior categories are the items' categories; most targets have item features.
    items = read(raw, "item_features")
    cate_of = dict(zip(items.column(ITEM_ID).to_pylist(), items.column(ITEM_CATE).to_pylist()))
    hist_items = train.column(HIST_ITEMS).combine_chunks().flatten().to_numpy()
    hist_cates = train.column(HIST_CATES).combine_chunks().flatten().to_numpy()
    known = np.array([i in cate_of for i in hist_items])
    assert 0.9 < known.mean() < 1.0
    assert all(cate_of[i] == c for i, c in zip(hist_items[known][:5000], hist_cates[known][:5000]))
    targets = read(raw, "test_samples").column(ITEM_ID).to_pylist()
    assert 0 < np.mean([t not in cate_of for t in targets]) < 0.1
    scl = read(raw, "scl_embedding_int8_p90")
    vectors = np.stack(scl.column(SCL_VECTOR).to_numpy(zero_copy_only=False)).astype(np.float64)
    assert np.linalg.norm(vectors, axis=1).mean() == pytest.approx(122.6, abs=0.5)


def test_statistics(generated: Tuple[Path, Dict[str, object]]) -> None:
    _, stats = generated
    samples, ctr = stats["samples"], stats["ctr"]
    overall = sum(ctr[s] * samples[s] for s in samples) / sum(samples.values())
    assert 0.12 < overall < 0.155
    assert stats["users"] == {"train": 300, "test": 100}
    assert stats["history_items_rare_share"] > 0.5  # long tail: most ids seen < 17 times
    assert 0.1 < stats["users_short_history_share"] < 0.35
    assert 121.5 < stats["scl_int8_norm_mean"] < 123.5
    assert 0.01 < stats["items_without_scl_share"] < 0.06
    assert 0.07 < stats["test_users_in_train_share"] < 0.11
    assert stats["samples_top5_relevant_older_than_recent_share"] > 0.3
    assert stats["best_auc"]["train"] > 0.7 and stats["best_auc"]["test"] > 0.7


def test_planted_signal_favours_semantic_lifelong_retrieval(
    generated: Tuple[Path, Dict[str, object]]
) -> None:
    signal = generated[1]["signal_auc"]
    # Whole-history semantic relevance beats DIN's recent-50 view, SIM-hard's same-category view
    # and plain category matching.
    assert signal["semantic_full_history"] > signal["semantic_recent_50"] + 0.1
    assert signal["semantic_full_history"] > signal["semantic_same_category_recent_50"] + 0.01
    assert signal["semantic_full_history"] > signal["category_matches"] + 0.03


def test_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 200).astype(np.float64)  # many ties
    labels = rng.random(200) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auc(scores, labels) == pytest.approx(pairwise)
    assert np.isnan(auc(scores, np.zeros(200, dtype=bool)))


def test_rejects_bad_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_items"):
        synthesize(tmp_path / "raw", SynthConfig(num_items=0))
