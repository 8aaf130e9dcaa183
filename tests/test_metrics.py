"""Metrics against brute-force references: pairwise AUC counts and per-user loops, 1 and 2 ranks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from muse_torchrec.metrics import (
    EvalAccumulator,
    EvalMetrics,
    PerBatchGAUC,
    auc,
    grouped_auc,
    log_loss,
)
from muse_torchrec.train.distributed import shutdown

Batch = Dict[str, np.ndarray]


def _pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUC by definition: the share of (positive, negative) pairs ordered right, ties 1/2."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


def _loop_gauc_sums(
    user_key: np.ndarray, labels: np.ndarray, scores: np.ndarray
) -> Tuple[float, int, int]:
    """(sum n_u AUC_u, sum n_u, users) over users with both classes, one user at a time."""
    weighted, impressions, users = 0.0, 0, 0
    for user in np.unique(user_key):
        rows = user_key == user
        user_auc = _pairwise_auc(labels[rows], scores[rows])
        if not math.isnan(user_auc):
            weighted += user_auc * rows.sum()
            impressions += int(rows.sum())
            users += 1
    return weighted, impressions, users


def _eval_data(seed: int, num_users: int = 150) -> Batch:
    """Shuffled impressions of users with 1..40 samples each, some users single-class.

    User ids are hashed-looking signed int64; scores are rounded to one decimal so ties are
    frequent both within a user and across users; true_prob is a noisy version of the logit's
    probability (for best_auc / best_gauc).
    """
    rng = np.random.default_rng(seed)
    user_ids = rng.integers(-(2**62), 2**62, size=num_users)
    sizes = rng.integers(1, 41, size=num_users)
    # A third of the users click never or always, so GAUC has users to skip.
    ctr = np.where(rng.random(num_users) < 1 / 3, rng.integers(0, 2, num_users), 0.3)
    user_key = np.repeat(user_ids, sizes)
    labels = (rng.random(len(user_key)) < np.repeat(ctr, sizes)).astype(np.float32)
    logits = np.round(labels + rng.normal(size=len(user_key)), 1).astype(np.float32)
    true_prob = np.round(rng.random(len(user_key)), 2).astype(np.float32)
    order = rng.permutation(len(user_key))
    return {
        "user_key": user_key[order],
        "labels": labels[order],
        "logits": logits[order],
        "weights": np.ones(len(user_key), np.float32),
        "true_prob": true_prob[order],
    }


def _slice(data: Batch, start: int, stop: int) -> Batch:
    return {name: column[start:stop] for name, column in data.items()}


def _with_padding(batch: Batch, num_padding: int) -> Batch:
    """The batch plus weight-0 rows whose values would change every metric if they were used."""
    first_user = batch["user_key"][:1]
    padding = {
        "user_key": np.repeat(first_user, num_padding),
        "labels": np.ones(num_padding, np.float32),
        "logits": np.full(num_padding, -50.0, np.float32),
        "weights": np.zeros(num_padding, np.float32),
        "true_prob": np.zeros(num_padding, np.float32),
    }
    return {name: np.concatenate([batch[name], padding[name]]) for name in batch}


def _accumulate(batches: List[Batch], with_true_prob: bool = True) -> EvalAccumulator:
    acc = EvalAccumulator()
    for batch in batches:
        tensors = {name: torch.from_numpy(column) for name, column in batch.items()}
        if not with_true_prob:
            del tensors["true_prob"]
        acc.update(**tensors)
    return acc


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_count(seed: int) -> None:
    data = _eval_data(seed)
    expected = _pairwise_auc(data["labels"], data["logits"])
    assert auc(data["labels"], data["logits"]) == pytest.approx(expected, abs=1e-12)
    # Torch inputs give the same number, bfloat16 logits included.
    labels, logits = torch.from_numpy(data["labels"]), torch.from_numpy(data["logits"])
    assert auc(labels, logits) == pytest.approx(expected, abs=1e-12)
    bf16 = logits.bfloat16()
    assert auc(labels, bf16) == auc(data["labels"], bf16.float().numpy())


def test_auc_hand_values_and_single_class() -> None:
    # Pairs (pos, neg): (0.5, 0.2) right, (0.5, 0.5) tie, (0.1, 0.2) wrong, (0.1, 0.5) wrong.
    assert auc([1, 0, 1, 0], [0.5, 0.2, 0.1, 0.5]) == pytest.approx(1.5 / 4)
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([], []))
    with pytest.raises(ValueError, match="NaN"):
        auc([1, 0], [0.1, math.nan])


@pytest.mark.parametrize("seed", range(5))
def test_grouped_auc_matches_per_user_loop(seed: int) -> None:
    data = _eval_data(seed)
    weighted, impressions, users = _loop_gauc_sums(data["user_key"], data["labels"], data["logits"])
    gauc, num_users, num_impressions = grouped_auc(data["user_key"], data["labels"], data["logits"])
    assert gauc == pytest.approx(weighted / impressions, abs=1e-12)
    assert (num_users, num_impressions) == (users, impressions)
    # The data must exercise skipping: some users have one class only.
    assert num_users < len(np.unique(data["user_key"]))


def test_grouped_auc_without_usable_users() -> None:
    gauc, users, impressions = grouped_auc([7, 7, 8], [1, 1, 0], [0.1, 0.2, 0.3])
    assert math.isnan(gauc) and (users, impressions) == (0, 0)


def test_padding_rows_are_ignored() -> None:
    data = _eval_data(0)
    padded = _with_padding(data, 25)
    kept = (padded["user_key"], padded["labels"], padded["logits"])
    w = padded["weights"]
    assert auc(*kept[1:], weights=w) == auc(data["labels"], data["logits"])
    assert grouped_auc(*kept, weights=w) == grouped_auc(
        data["user_key"], data["labels"], data["logits"]
    )
    assert log_loss(*kept[1:], weights=w) == log_loss(data["labels"], data["logits"])
    # The padding would matter if it were used.
    assert auc(*kept[1:]) != auc(data["labels"], data["logits"])
    # Through the accumulator: the same metrics with and without the padding rows.
    halves = [_slice(data, 0, 500), _slice(data, 500, len(data["labels"]))]
    with_padding = _accumulate([_with_padding(b, 10) for b in halves]).compute()
    assert with_padding == _accumulate(halves).compute()
    assert with_padding.num_eval_samples == len(data["labels"])


def test_weights_must_be_a_mask() -> None:
    with pytest.raises(ValueError, match="0/1"):
        auc([1, 0], [0.2, 0.1], weights=[1.0, 0.5])


def test_log_loss_matches_torch_and_is_stable() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200).astype(np.float64)
    logits = rng.normal(scale=5.0, size=200)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(logits), torch.from_numpy(labels)
    ).item()
    assert log_loss(labels, logits) == pytest.approx(expected, rel=1e-12)
    # Logits far beyond exp's range: confident right answers cost ~0, wrong ones cost |z|.
    assert log_loss([1, 0], [800.0, -800.0]) == pytest.approx(0.0, abs=1e-300)
    assert log_loss([0, 1], [800.0, -800.0]) == pytest.approx(800.0)
    assert math.isnan(log_loss([1], [0.0], weights=[0]))


def test_per_batch_gauc_hand_example() -> None:
    # User 1: batch 1 holds (click 0.9, no-click 0.1) -> AUC 1; batch 2 holds (no-click 0.8,
    # click 0.3) -> AUC 0. User 2 (batch 1 only): click 0.2 between no-clicks 0.5, 0.1 -> AUC 1/2.
    batch_1 = ([1, 1, 2, 2, 2], [1, 0, 1, 0, 0], [0.9, 0.1, 0.2, 0.5, 0.1])
    batch_2 = ([1, 1], [0, 1], [0.8, 0.3])
    per_batch = PerBatchGAUC()
    per_batch.update(*map(np.array, batch_1))
    per_batch.update(*map(np.array, batch_2))
    assert per_batch.compute() == pytest.approx((1 * 2 + 0.5 * 3 + 0 * 2) / 7)
    assert (per_batch.num_users, per_batch.num_impressions) == (3, 7)
    # Exact GAUC groups user 1 over both batches: clicks {0.9, 0.3} vs {0.1, 0.8} -> AUC 3/4.
    everything = [np.concatenate(column) for column in zip(batch_1, batch_2)]
    assert grouped_auc(*everything) == (pytest.approx((0.75 * 4 + 0.5 * 3) / 7), 2, 7)


def test_per_batch_gauc_matches_loop_over_batches() -> None:
    data = _eval_data(1)
    bounds = [0, 130, 131, 600, 1000, len(data["labels"])]
    per_batch = PerBatchGAUC()
    sums = np.zeros(3)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        batch = _slice(data, start, stop)
        per_batch.update(batch["user_key"], batch["labels"], batch["logits"], batch["weights"])
        sums += _loop_gauc_sums(batch["user_key"], batch["labels"], batch["logits"])
    assert per_batch.compute() == pytest.approx(sums[0] / sums[1], abs=1e-12)
    assert (per_batch.num_impressions, per_batch.num_users) == (sums[1], sums[2])
    # Splitting users over batches changes the number: the variants really differ.
    assert per_batch.num_users > grouped_auc(data["user_key"], data["labels"], data["logits"])[1]


def test_accumulator_single_process() -> None:
    data = _eval_data(2)
    metrics = _accumulate([_slice(data, 0, 700), _slice(data, 700, len(data["labels"]))]).compute()
    user_key, labels, logits = data["user_key"], data["labels"], data["logits"]
    gauc, users, impressions = grouped_auc(user_key, labels, logits)
    assert (metrics.auc, metrics.gauc, metrics.logloss) == (
        auc(labels, logits),
        gauc,
        log_loss(labels, logits),
    )
    assert (metrics.num_gauc_users, metrics.num_gauc_impressions) == (users, impressions)
    assert metrics.num_eval_samples == len(labels)
    assert metrics.best_auc == auc(labels, data["true_prob"])
    assert metrics.best_gauc == grouped_auc(user_key, labels, data["true_prob"])[0]
    assert _accumulate([data], with_true_prob=False).compute().best_auc is None


def test_accumulator_rejects_mixed_true_prob() -> None:
    data = _eval_data(3)
    acc = _accumulate([_slice(data, 0, 100)])
    with pytest.raises(ValueError, match="every batch or for none"):
        acc.update(data["user_key"], data["labels"], data["logits"])


def test_to_dict_is_strict_json() -> None:
    # One sample: every AUC is undefined (NaN), the log loss is not.
    metrics = _accumulate([_slice(_eval_data(0), 0, 1)]).compute()
    as_dict = metrics.to_dict()
    assert as_dict["auc"] is None and as_dict["num_eval_samples"] == 1
    round_trip = EvalMetrics(**json.loads(json.dumps(as_dict, allow_nan=False)))
    assert round_trip.logloss == metrics.logloss


def _rank_worker(
    rank: int, init_file: str, out_dir: str, scenarios: List[List[List[Batch]]]
) -> None:
    """One gloo rank: accumulates its batches of each scenario and writes its metrics as JSON."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    for index, per_rank in enumerate(scenarios):
        metrics = _accumulate(per_rank[rank]).compute()
        out_file = Path(out_dir, f"scenario{index}_rank{rank}.json")
        out_file.write_text(json.dumps(metrics.to_dict()))
    shutdown()


def test_two_gloo_ranks_match_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _eval_data(4, num_users=300)
    n = len(data["labels"])
    # Rows are shuffled, so nearly every user with several impressions is split across the ranks;
    # rank 0 holds more rows than rank 1 and both end with padding rows.
    split = (n * 3) // 5
    rank_0 = [_slice(data, 0, 400), _with_padding(_slice(data, 400, split), 7)]
    rank_1 = [_slice(data, split, split + 300), _with_padding(_slice(data, split + 300, n), 3)]
    scenarios = [[rank_0, rank_1], [rank_0 + rank_1, []]]  # the second: rank 1 has no batches

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    mp.spawn(
        _rank_worker,
        args=(str(tmp_path / "init"), str(tmp_path), scenarios),
        nprocs=2,
        join=True,
    )

    expected = _accumulate(rank_0 + rank_1).compute().to_dict()
    assert expected["num_eval_samples"] == n
    # Users really span the ranks.
    assert np.intersect1d(data["user_key"][:split], data["user_key"][split:]).size > 100
    for index in range(len(scenarios)):
        for rank in range(2):
            got = json.loads((tmp_path / f"scenario{index}_rank{rank}.json").read_text())
            # Per-batch GAUC sums are added in another order across ranks (rank totals, then the
            # sum of ranks) than in one process (batch after batch): equal up to rounding.
            assert got.pop("gauc_per_batch") == pytest.approx(
                expected["gauc_per_batch"], rel=1e-12
            )
            assert got == {k: v for k, v in expected.items() if k != "gauc_per_batch"}
