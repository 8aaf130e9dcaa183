"""GSU top-K search against plain Python / brute-force references."""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import pytest
import torch

from muse_torchrec.model.gsu import (
    TopK,
    category_match_topk,
    gather_selected,
    grouped_cosine,
    length_mask,
    muse_gsu,
    muse_gsu_by_sample,
    normalize_scl,
    scl_present,
    select_topk,
)


def brute_select(
    scores: torch.Tensor, valid: torch.Tensor, secondary: Optional[torch.Tensor], k: int
) -> TopK:
    """select_topk's documented rules, one row at a time with Python's sort."""
    rows = []
    for b in range(scores.shape[0]):
        candidates: List[Tuple[int, float, int]] = []
        for p in range(scores.shape[1]):
            if not valid[b, p]:
                continue
            has_score = secondary is None or bool(secondary[b, p])
            score = float(scores[b, p]) if has_score else 0.0
            candidates.append((int(has_score), score, p))
        # Best tier, then best score, then most recent position.
        candidates.sort(reverse=True)
        rows.append(candidates[:k])
    indices = torch.zeros(len(rows), k, dtype=torch.long)
    out_scores = torch.zeros(len(rows), k, dtype=scores.dtype)
    for b, picked in enumerate(rows):
        for j, (_, score, p) in enumerate(picked):
            indices[b, j] = p
            out_scores[b, j] = score
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    scored = torch.tensor([sum(t for t, _, _ in r) for r in rows], dtype=torch.long)
    return TopK(indices, out_scores, lengths, scored)


def assert_topk_equal(got: TopK, want: TopK) -> None:
    for name in TopK._fields:
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def random_lengths(gen: torch.Generator, rows: int, max_len: int) -> torch.Tensor:
    lengths = torch.randint(0, max_len + 1, (rows,), generator=gen)
    lengths[0] = 0  # an empty history
    lengths[1] = max_len  # a full one
    return lengths


@pytest.mark.parametrize("k", [1, 10, 60])
@pytest.mark.parametrize("with_secondary", [True, False])
def test_select_topk_matches_sort_with_many_ties(k: int, with_secondary: bool) -> None:
    gen = torch.Generator().manual_seed(k)
    rows, max_len = 64, 40
    # Few distinct values: ties are everywhere, including -0.0 against 0.0.
    scores = torch.randint(-4, 5, (rows, max_len), generator=gen).float() / 4
    scores[scores == 0] = torch.where(torch.rand(int((scores == 0).sum()), generator=gen) < 0.5,
                                      -0.0, 0.0)
    valid = length_mask(random_lengths(gen, rows, max_len), max_len)
    valid &= torch.rand(rows, max_len, generator=gen) < 0.9  # id-0 holes inside the length
    secondary = torch.rand(rows, max_len, generator=gen) < 0.7 if with_secondary else None

    got = select_topk(scores, valid, secondary, k)
    assert got.indices.shape == (rows, k) and got.scores.shape == (rows, k)
    assert_topk_equal(got, brute_select(scores, valid, secondary, k))


def test_select_topk_continuous_scores() -> None:
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(32, 100, generator=gen) * 10
    valid = length_mask(random_lengths(gen, 32, 100), 100)
    secondary = torch.rand(32, 100, generator=gen) < 0.8
    assert_topk_equal(
        select_topk(scores, valid, secondary, 50), brute_select(scores, valid, secondary, 50)
    )


def test_select_topk_hand_example() -> None:
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1, -0.3, 0.7, 0.2]])
    valid = torch.tensor([[True, True, True, True, True, True, True, False]])
    secondary = torch.tensor([[True, True, True, True, True, False, False, True]])
    got = select_topk(scores, valid, secondary, 8)
    # 0.9 twice (most recent first), 0.5 twice, 0.1, then the two without score (most recent
    # first, score 0), and position 7 is padding.
    assert got.indices.tolist() == [[3, 1, 2, 0, 4, 6, 5, 0]]
    assert got.scores[0].tolist() == pytest.approx([0.9, 0.9, 0.5, 0.5, 0.1, 0.0, 0.0, 0.0])
    assert got.lengths.tolist() == [7]
    assert got.scored_lengths.tolist() == [5]


def test_grouped_cosine_matches_brute_einsum() -> None:
    gen = torch.Generator().manual_seed(2)
    users, max_len, dim = 7, 13, 8
    # Uneven, unsorted users: user 3 has many samples, users 5 and 6 none.
    sample_user = torch.cat([torch.full((15,), 3), torch.randint(0, 5, (25,), generator=gen)])
    sample_user = sample_user[torch.randperm(40, generator=gen)]

    history = torch.randn(users, max_len, dim, generator=gen)
    target = torch.randn(40, dim, generator=gen)
    brute = torch.einsum("bld,bd->bl", history[sample_user], target)
    torch.testing.assert_close(grouped_cosine(history, target, sample_user), brute)

    # Integer-valued vectors (the int8 SCL case): exactly equal, whatever the summation order.
    history_int = torch.randint(-127, 128, (users, max_len, 128), generator=gen).float()
    target_int = torch.randint(-127, 128, (40, 128), generator=gen).float()
    brute_int = torch.einsum("bld,bd->bl", history_int[sample_user], target_int)
    assert torch.equal(grouped_cosine(history_int, target_int, sample_user), brute_int)


def test_grouped_cosine_empty_block() -> None:
    history = torch.randn(3, 5, 4)
    out = grouped_cosine(history, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, 5)


def test_normalize_scl_and_presence() -> None:
    gen = torch.Generator().manual_seed(3)
    vectors = torch.randint(-127, 128, (6, 128), generator=gen).to(torch.int8)
    vectors[2] = 0
    vectors[4] = 0
    vectors[4, 7] = -1  # a single nonzero entry still counts as a vector
    present = scl_present(vectors)
    assert present.tolist() == [True, True, False, True, True, True]

    unit = normalize_scl(vectors)
    assert unit.dtype == torch.float32
    as_float = vectors.double() / 127
    expected = as_float / as_float.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    torch.testing.assert_close(unit.double(), expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(unit[2], torch.zeros(128))
    torch.testing.assert_close(unit[present].norm(dim=-1), torch.ones(5))


def test_category_match_topk_matches_loop() -> None:
    gen = torch.Generator().manual_seed(4)
    rows, max_len, k = 50, 30, 8
    hist_cates = torch.randint(0, 4, (rows, max_len), generator=gen)
    lengths = random_lengths(gen, rows, max_len)
    target = torch.randint(0, 4, (rows,), generator=gen)
    target[2] = 0  # unknown category: matches nothing, not even unknown behaviors

    got = category_match_topk(hist_cates, lengths, target, k)
    for b in range(rows):
        matches = [p for p in range(int(lengths[b]))
                   if target[b] != 0 and hist_cates[b, p] == target[b]]
        want = list(reversed(matches))[:k]
        n = len(want)
        assert got.lengths[b] == n and got.scored_lengths[b] == n
        assert got.indices[b].tolist() == want + [0] * (k - n)
        assert got.scores[b].tolist() == [1.0] * n + [0.0] * (k - n)
    assert got.lengths[2] == 0


def numpy_cosine(hist: np.ndarray, target: np.ndarray) -> np.ndarray:
    """muse_gsu's documented formula: exact int dot / sqrt(|a|^2 |h|^2) in float64, to float32."""
    hist64, target64 = hist.astype(np.int64), target.astype(np.int64)
    dots = (hist64 @ target64).astype(np.float64)
    norms = np.sqrt(((hist64**2).sum(-1) * (target64**2).sum()).astype(np.float64))
    return np.clip(dots / np.maximum(norms, 1.0), -1.0, 1.0).astype(np.float32)


def test_muse_gsu_matches_brute_force_on_int8() -> None:
    gen = torch.Generator().manual_seed(5)
    users, max_len, k = 6, 60, 20
    hist = torch.randint(-127, 128, (users, max_len, 128), generator=gen).to(torch.int8)
    # Repeated items (identical vectors: exact ties) and items without SCL vector.
    hist[:, 40:50] = hist[:, 10:20]
    hist[torch.rand(users, max_len, generator=gen) < 0.15] = 0
    hist_lengths = torch.tensor([60, 0, 7, 35, 60, 25])
    sample_user = torch.tensor([0, 0, 1, 2, 2, 3, 3, 3, 4, 5, 0, 4])
    targets = torch.randint(-127, 128, (12, 128), generator=gen).to(torch.int8)
    targets[0] = hist[0, 12]  # a target seen twice in its history (positions 12 and 42)
    targets[8] = 0  # a target without SCL vector (user 4, 60 behaviors)

    got = muse_gsu(hist, hist_lengths, targets, sample_user, k)

    cosine = torch.zeros(12, max_len)
    for b in range(12):
        u = int(sample_user[b])
        cosine[b] = torch.from_numpy(numpy_cosine(hist[u].numpy(), targets[b].numpy()))
        exact = hist[u].double() @ targets[b].double() / (
            hist[u].double().norm(dim=-1) * targets[b].double().norm()
        ).clamp_min(1e-30)
        torch.testing.assert_close(cosine[b].double(), exact, rtol=0, atol=1e-6)
    valid = length_mask(hist_lengths, max_len)[sample_user]
    secondary = scl_present(hist)[sample_user] & scl_present(targets).unsqueeze(1)
    assert_topk_equal(got, brute_select(cosine, valid, secondary, k))

    assert got.scores.min() >= -1.0 and got.scores.max() <= 1.0
    assert got.indices[0, :2].tolist() == [42, 12] and got.scores[0, :2].tolist() == [1.0, 1.0]
    # No target vector: the most recent behaviors, no similarity.
    assert got.indices[8].tolist() == list(range(59, 59 - k, -1))
    assert got.scored_lengths[8] == 0 and torch.equal(got.scores[8], torch.zeros(k))
    assert got.lengths.tolist() == [min(k, int(hist_lengths[u])) for u in sample_user]


def test_muse_gsu_by_sample_equals_muse_gsu() -> None:
    """The static-shape form (from ids, one sample at a time) gives muse_gsu's TopK bit for bit."""
    gen = torch.Generator().manual_seed(11)
    scl = torch.randint(-127, 128, (40, 128), generator=gen).to(torch.int8)
    scl[0] = 0
    scl[7] = 0  # an SCL row that is all zero: items mapped to it have no vector
    scl[9] = scl[3]  # two rows with one vector: exact ties, broken by recency
    item_scl_row = torch.randint(0, 40, (500,), generator=gen).int()
    users, max_len, k = 9, 120, 30
    hist_items = torch.randint(1, 500, (users, max_len), generator=gen)
    hist_lengths = torch.tensor([120, 0, 5, 64, 120, 31, 1, 90, 119])
    hist_items[length_mask(hist_lengths, max_len).logical_not()] = 0
    sample_user = torch.randint(0, users, (50,), generator=gen)
    target_items = torch.randint(0, 500, (50,), generator=gen)

    got = muse_gsu_by_sample(scl, item_scl_row, hist_items, hist_lengths, sample_user, target_items, k)
    vectors = scl[item_scl_row.long()]
    want = muse_gsu(vectors[hist_items], hist_lengths, vectors[target_items], sample_user, k)
    assert_topk_equal(got, want)
    assert got.scored_lengths.lt(got.lengths).any() and got.lengths.eq(0).any()


def test_gather_selected_zeroes_padding_slots() -> None:
    items = torch.arange(1, 31).reshape(3, 10)  # user u's behavior p has id 10 u + p + 1
    topk = TopK(
        indices=torch.tensor([[4, 2, 0], [9, 0, 0]]),
        scores=torch.zeros(2, 3),
        lengths=torch.tensor([2, 1]),
        scored_lengths=torch.tensor([2, 1]),
    )
    sample_user = torch.tensor([2, 0])
    assert gather_selected(items, sample_user, topk).tolist() == [[25, 23, 0], [10, 0, 0]]
    vectors = torch.randn(3, 10, 4)
    picked = gather_selected(vectors, sample_user, topk)
    assert picked.shape == (2, 3, 4)
    assert torch.equal(picked[0, 1], vectors[2, 2]) and torch.equal(picked[1, 1], torch.zeros(4))


def test_select_topk_short_rows_pad_to_k() -> None:
    scores = torch.tensor([[0.3, -0.2], [0.1, 0.4]])
    valid = torch.tensor([[True, False], [False, False]])
    got = select_topk(scores, valid, None, 4)
    assert got.indices.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]
    assert got.scores[0].tolist() == pytest.approx([0.3, 0, 0, 0])
    assert got.scores[1].tolist() == [0, 0, 0, 0]
    assert got.lengths.tolist() == [1, 0]


def _serving_case(length: int, history_length: int, candidates: int, k: int, missing: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(-127, 128, (length, 128), dtype=torch.int8, generator=g)
    history[torch.rand(length, generator=g) < missing] = 0
    cands = torch.randint(-127, 128, (candidates, 128), dtype=torch.int8, generator=g)
    cands[0] = 0  # a candidate without SCL vector: recency order, scores 0
    return history, cands


@pytest.mark.parametrize("block", [None, 8, 64])
@pytest.mark.parametrize("length,history_length,k", [(300, 300, 50), (300, 120, 50), (40, 30, 50), (64, 0, 8),
                                                     (2000, 1700, 50), (1001, 1001, 7)])
def test_serving_topk_matches_muse_gsu(length, history_length, k, block):
    from muse_torchrec.model.gsu import serving_topk

    history, cands = _serving_case(length, history_length, 37, k, missing=0.1, seed=length + k)
    fast = serving_topk(history, history_length, cands, k, block=block)
    exact = muse_gsu(history.unsqueeze(0), torch.tensor([history_length]), cands,
                     torch.zeros(cands.shape[0], dtype=torch.long), k)
    assert torch.equal(fast.lengths, exact.lengths)
    assert torch.equal(fast.scored_lengths, exact.scored_lengths)
    torch.testing.assert_close(fast.scores, exact.scores, rtol=0, atol=1e-6)
    # Random vectors have no equal cosines: the positions agree too, padding slots included.
    assert torch.equal(fast.indices, exact.indices)


@pytest.mark.parametrize("rows,width,k,block", [(5, 4096, 50, 64), (3, 512, 7, 8), (4, 96, 50, 32), (2, 640, 64, 8)])
def test_blocked_topk_equals_torch_topk(rows, width, k, block):
    """Same values as one torch.topk, on keys with many exact ties and -inf padding; every index
    points at its value."""
    from muse_torchrec.model.gsu import blocked_topk

    g = torch.Generator().manual_seed(width + k)
    key = torch.randint(-20, 20, (rows, width), generator=g).float()  # ~width / 40 copies of each value
    key[:, -width // 5:] = -float("inf")
    key[0, : width // 2] = 19.0  # one row with a tie over many blocks at the top
    values, indices = blocked_topk(key, k, block)
    expected = torch.topk(key, k, dim=1).values
    assert torch.equal(values, expected)
    assert torch.equal(key.gather(1, indices), values)
    assert all(len(set(row)) == k for row in indices.tolist())


def test_blocked_topk_rejects_a_ragged_width():
    from muse_torchrec.model.gsu import blocked_topk

    with pytest.raises(ValueError, match="not a multiple of block"):
        blocked_topk(torch.zeros(2, 100), 5, 64)
