"""BatchBuilder (host GSU + KJT assembly) against a brute-force per-sample reference."""

from typing import Dict, List

import numpy as np
import pytest
import torch

from muse_torchrec import features as F
from muse_torchrec.data.batch import GSU_KINDS, Batch, BatchBuilder, sequence_features
from random_data import random_block, random_scl

K, RECENT, MAX_HISTORY = 6, 5, 40


def per_sample(kjt, key: str) -> List[List[int]]:
    jt = kjt[key]
    return [v.tolist() for v in torch.split(jt.values(), jt.lengths().tolist())]


def unit(scl: np.ndarray, item_scl_row: np.ndarray, item: int) -> np.ndarray:
    v = scl[item_scl_row[item]].astype(np.float64)
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def expected(block, scl, item_scl_row, gsu: str) -> Dict[str, List]:
    """Brute force, one sample at a time, following the documented rules."""
    out: Dict[str, List] = {k: [] for k in ("item_topk", "cate_topk", "topk_scores", "item_recent", "cate_recent", "recent_scores")}
    for b in range(block.batch_size):
        u = block.sample_user[b]
        lo, hi = block.hist_offsets[u], block.hist_offsets[u + 1]
        lo = max(lo, hi - MAX_HISTORY)
        pairs = [(i, c) for i, c in zip(block.hist_items[lo:hi], block.hist_cates[lo:hi]) if i != 0]
        target = block.target["item"][b]
        t = unit(scl, item_scl_row, target)
        cos = [float(unit(scl, item_scl_row, i) @ t) for i, _ in pairs]
        recent = list(range(max(0, len(pairs) - RECENT), len(pairs)))
        out["item_recent"].append([int(pairs[p][0]) for p in recent])
        out["cate_recent"].append([int(pairs[p][1]) for p in recent])
        out["recent_scores"].append([cos[p] for p in recent])
        if gsu == "scl_cosine":
            scored = item_scl_row[target] != 0
            key = lambda p: (scored and item_scl_row[pairs[p][0]] != 0, cos[p] if scored else 0.0, p)  # noqa: E731
            chosen = sorted(range(len(pairs)), key=key, reverse=True)[:K]
        else:
            tc = block.target["cate"][b]
            chosen = [p for p in reversed(range(len(pairs))) if tc != 0 and pairs[p][1] == tc][:K]
        out["item_topk"].append([int(pairs[p][0]) for p in chosen])
        out["cate_topk"].append([int(pairs[p][1]) for p in chosen])
        out["topk_scores"].append([cos[p] for p in chosen])
    return out


def padded_rows(t: torch.Tensor, lengths: List[int]) -> List[List[float]]:
    return [t[b, :n].tolist() for b, n in enumerate(lengths)]


@pytest.mark.parametrize("gsu", ["scl_cosine", "category"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_builder_matches_brute_force(gsu, seed):
    rng = np.random.default_rng(seed)
    scl, item_scl_row = random_scl(rng)
    block = random_block(rng, num_users=12, max_len=70)
    # Duplicated items in a history give exact ties: the more recent one must win.
    block.hist_items[block.hist_offsets[3]: block.hist_offsets[4]] %= 7
    batch = BatchBuilder(scl, item_scl_row, gsu=gsu, k=K, recent=RECENT, max_history=MAX_HISTORY)(block)
    want = expected(block, scl, item_scl_row, gsu)
    assert batch.sparse_features.keys() == sequence_features(gsu) + list(F.SIDE_FEATURES)
    for key in ("item_topk", "cate_topk", "item_recent", "cate_recent"):
        assert per_sample(batch.sparse_features, key) == want[key], key
    topk_len = [len(x) for x in want["item_topk"]]
    recent_len = [len(x) for x in want["item_recent"]]
    for got, ref in zip(padded_rows(batch.topk_scores, topk_len), want["topk_scores"]):
        np.testing.assert_allclose(got, ref, atol=1e-5)
    for got, ref in zip(padded_rows(batch.recent_scores, recent_len), want["recent_scores"]):
        np.testing.assert_allclose(got, ref, atol=1e-5)
    # Padding slots hold zeros.
    for b, n in enumerate(topk_len):
        assert torch.all(batch.topk_scores[b, n:] == 0)


def test_single_id_features_drop_padding_id():
    rng = np.random.default_rng(5)
    scl, item_scl_row = random_scl(rng)
    block = random_block(rng, num_users=10, max_len=20)
    batch = BatchBuilder(scl, item_scl_row, gsu="recent_only", k=K, recent=RECENT, max_history=MAX_HISTORY)(block)
    su = block.sample_user
    for name in F.USER_FEATURES:
        assert per_sample(batch.sparse_features, name) == [[int(v)] if v else [] for v in block.user_features[name][su]]
    for name in F.TARGET_SIDE_FEATURES:
        assert per_sample(batch.sparse_features, name) == [[int(v)] if v else [] for v in block.target[name]]
    assert per_sample(batch.sparse_features, "item_target") == [[int(v)] if v else [] for v in block.target["item"]]
    assert "item_topk" not in batch.sparse_features.keys()


def test_whole_history_feature_is_the_compacted_history():
    rng = np.random.default_rng(6)
    scl, item_scl_row = random_scl(rng)
    block = random_block(rng, num_users=6, max_len=60)
    batch = BatchBuilder(scl, item_scl_row, gsu="whole_history", k=K, recent=RECENT, max_history=MAX_HISTORY)(block)
    got = per_sample(batch.sparse_features, "item_hist")
    for b, u in enumerate(block.sample_user):
        lo, hi = block.hist_offsets[u], block.hist_offsets[u + 1]
        assert got[b] == [int(i) for i in block.hist_items[max(lo, hi - MAX_HISTORY):hi] if i != 0]


def test_padding_to_batch_size_gives_weight_zero_rows():
    rng = np.random.default_rng(7)
    scl, item_scl_row = random_scl(rng)
    block = random_block(rng, num_users=4, max_len=10)
    n = block.batch_size
    batch = BatchBuilder(scl, item_scl_row, k=K, recent=RECENT, max_history=MAX_HISTORY, pad_to=n + 5)(block)
    assert batch.batch_size == n + 5
    assert batch.weights.tolist() == [1.0] * n + [0.0] * 5
    with pytest.raises(ValueError, match="larger than the batch size"):
        BatchBuilder(scl, item_scl_row, pad_to=n - 1)(block)


def test_batch_is_pipelineable():
    rng = np.random.default_rng(8)
    scl, item_scl_row = random_scl(rng)
    batch = BatchBuilder(scl, item_scl_row, k=K, recent=RECENT)(random_block(rng, 3, 10))
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    assert isinstance(moved, Batch) and torch.equal(moved.labels, batch.labels)


def test_to_returns_the_batch_itself_only_when_every_tensor_is_there():
    rng = np.random.default_rng(8)
    scl, item_scl_row = random_scl(rng)
    batch = BatchBuilder(scl, item_scl_row, k=K, recent=RECENT)(random_block(rng, 3, 10))
    assert batch.to(torch.device("cpu")) is batch
    meta = torch.device("meta")
    moved = batch.to(meta)
    assert moved.sparse_features.device() == meta
    assert all(getattr(moved, name).device == meta for name in batch.__dataclass_fields__ if name not in ("sparse_features", "routing"))
    # One field elsewhere (a batch assembled by hand) and the whole batch moves.
    mixed = Batch(**{**batch.__dict__, "labels": batch.labels.to(meta)})
    assert mixed.to(meta).weights.device == meta


def test_unknown_gsu_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown GSU kind"):
        BatchBuilder(np.zeros((1, 128), np.int8), np.zeros(1, np.int32), gsu="nope")


@pytest.mark.parametrize("gsu", GSU_KINDS)
def test_batch_keys_come_in_the_collections_feature_order(gsu):
    """The order TorchRec's input distribution expects on one rank: no per-step permute of the KJT."""
    from muse_torchrec.config import EmbeddingConfig
    from muse_torchrec.model.embeddings import build_collection

    rng = np.random.default_rng(2)
    scl, item_scl_row = random_scl(rng)
    batch = BatchBuilder(scl, item_scl_row, gsu=gsu, k=K, recent=RECENT, max_history=MAX_HISTORY)(
        random_block(rng, num_users=4, max_len=30))
    vocab = {table.name: 100 for table in F.TABLES}
    collection = build_collection(vocab, EmbeddingConfig(), sequence_features(gsu))
    collection_order = [f for table in collection.embedding_configs() for f in table.feature_names]
    assert batch.sparse_features.keys() == collection_order
    # The ids per key come with the KJT (TorchRec would otherwise compute them from the lengths).
    kjt = batch.sparse_features
    assert kjt._length_per_key == [int(n) for n in kjt.lengths().view(len(kjt.keys()), -1).sum(1)]
    with pytest.raises(KeyError):
        F.lookup_order(["item_target", "no_such_feature"])
