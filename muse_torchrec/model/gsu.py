"""General Search Units: choose the top-K behaviors of each sample's history (MUSE_SPEC section 5).

Conventions shared by every GSU here and by whatever reads a :class:`TopK`:

- Histories are oldest first, so a higher position is a more recent behavior.
- Position ``p`` of a history is a real behavior iff ``p < length``; padding is never selected.
- The result has exactly ``k`` slots per sample, best first. Slots ``>= lengths`` are padding
  (index 0, score 0.0) and must be masked downstream with :func:`length_mask`.
- Ties in score are broken by recency: the more recent behavior ranks first. This is exact (no
  tolerance): MUSE cosines of identical int8 vectors (the same item seen twice) are bit-identical.

The functions are plain torch (CPU and CUDA). Those that produce shapes from data (``muse_gsu``,
``grouped_cosine``) read one scalar back from the device, so call them outside an fx-traced model
(in the loader, or as an input transform before the sparse lookup).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from muse_torchrec.features import SCL_DIM
from muse_torchrec.model.serving_keys import ranking_keys, serving_keys

# Composite ranking key (see select_topk), from the most to the least significant bits:
# tier (2 bits) | order-preserving float32 bits of the score (32 bits) | position; int64 holds 63.
_SCORE_BITS = 32
_MAX_POSITION_BITS = 63 - _SCORE_BITS - 2


class TopK(NamedTuple):
    """The behaviors a GSU selected for each of B samples, best first.

    Attributes:
        indices: B x K long, positions into the sample's history (0 in padding slots).
        scores: B x K float, the GSU relevance of each selected behavior (0.0 in padding slots and
            for behaviors that have no similarity, e.g. an item without SCL vector).
        lengths: B long, number of real slots (``min(K, selectable behaviors)``).
        scored_lengths: B long, number of leading slots whose score is a real similarity; slots in
            ``[scored_lengths, lengths)`` are selected behaviors without one (ranked after all
            scored behaviors), so a consumer can leave them out of, e.g., a similarity histogram.
    """

    indices: Tensor
    scores: Tensor
    lengths: Tensor
    scored_lengths: Tensor


def length_mask(lengths: Tensor, max_len: int) -> Tensor:
    """True at real positions: B x max_len bool, ``mask[b, p] = p < lengths[b]``."""
    positions = torch.arange(max_len, device=lengths.device)
    return positions.unsqueeze(0) < lengths.unsqueeze(-1)


def scl_present(vectors_int8: Tensor) -> Tensor:
    """Whether an item has an SCL vector: [...] bool for [..., 128] int8 (missing = all zero)."""
    return vectors_int8.ne(0).any(dim=-1)


def _squared_norm(vectors_int8: Tensor) -> Tensor:
    """Squared L2 norm of raw int8 SCL vectors: [...] float64 for [..., 128] int8 (0 if missing).

    The value is an integer below 2**21 (128 * 127**2): exact in float32 whatever the summation
    order; float64 only for the products and square roots made from it.
    """
    return vectors_int8.float().square().sum(dim=-1).double()


def normalize_scl(vectors_int8: Tensor) -> Tensor:
    """Dequantise and L2-normalise SCL vectors: [..., 128] int8 -> [..., 128] float32.

    The /127 dequantisation scale cancels in the normalisation, so it is not applied. A missing
    vector (all zero) stays all zero; see :func:`scl_present`.
    """
    if vectors_int8.shape[-1] != SCL_DIM:
        raise ValueError(f"SCL vectors have {SCL_DIM} dims, got shape {tuple(vectors_int8.shape)}")
    # A nonzero int8 vector has norm >= 1, so the clamp only touches missing (zero) vectors.
    norm = _squared_norm(vectors_int8).sqrt().clamp_min(1.0).float()
    return vectors_int8.float() / norm.unsqueeze(-1)


class UserSlots(NamedTuple):
    """Where each sample's target goes in a per-user batch of targets (see :func:`grouped_cosine`).

    Attributes:
        rank: [B] long, slot of each sample among its user's samples.
        max_samples: the largest number of samples of one user (the slot count).
    """

    rank: Tensor
    max_samples: int


def user_slots(sample_user: Tensor, num_users: int) -> UserSlots:
    """Slot of each sample among its user's samples. On a GPU this reads the maximum back to the
    host (a sync): compute it on the host beforehand where the step must not wait."""
    if sample_user.numel() == 0:
        return UserSlots(torch.zeros_like(sample_user), 0)
    counts = torch.bincount(sample_user, minlength=num_users)
    order = torch.argsort(sample_user, stable=True)
    first_of_user = torch.cumsum(counts, dim=0) - counts
    rank = torch.empty_like(sample_user)
    rank[order] = torch.arange(sample_user.numel(), device=sample_user.device) - first_of_user[
        sample_user[order]
    ]
    return UserSlots(rank, int(counts.max()))


def grouped_cosine(history: Tensor, target: Tensor, sample_user: Tensor, slots: Optional[UserSlots] = None) -> Tensor:
    """Dot product of each sample's target with every behavior of its user.

    With unit vectors (:func:`normalize_scl`) this is the cosine. Samples are grouped per user and
    scored with one batched matmul, so the B x L x D tensor ``history[sample_user]`` (11x the
    history bytes at ~11 samples per user) is never built; the cost is U x M x L with M the largest
    number of samples of one user in the block.

    Args:
        history: U x L x D float, each user's behavior vectors.
        target: B x D float, each sample's target vector.
        sample_user: B long, index of each sample's user in ``0..U-1``.
        slots: ``user_slots(sample_user, U)`` if already known (on ``history``'s device).

    Returns:
        B x L, ``out[b, l] = <history[sample_user[b], l], target[b]>``.
    """
    num_users, _, dim = history.shape
    rank, max_samples = slots if slots is not None else user_slots(sample_user, num_users)
    targets_per_user = history.new_zeros(num_users, max_samples, dim)
    targets_per_user[sample_user, rank] = target.to(history.dtype)
    scores = torch.bmm(targets_per_user, history.transpose(1, 2))  # U x M x L
    return scores[sample_user, rank]


def _order_preserving_bits(scores: Tensor) -> Tensor:
    """Map float32 scores to int64 keys in [0, 2**32) with the same order; equal floats, equal keys.

    NaN scores are not supported (they would rank above +inf or below -inf).
    """
    # Adding +0.0 turns -0.0 into +0.0, which compares equal and must get the same key.
    bits = (scores.float() + 0.0).view(torch.int32).long()
    # Non-negative floats order like their bit patterns; negative ones in reverse.
    return torch.where(bits >= 0, bits + 2**31, -1 - bits)


def select_topk(
    scores: Tensor, valid: Tensor, secondary_valid: Optional[Tensor], k: int
) -> TopK:
    """The K best positions of each row by score, with the conventions of this module.

    Ranking: valid positions with ``secondary_valid`` (e.g. "has an SCL vector") by score, then
    valid positions without it ("no similarity: treat as lowest", score 0.0 in the output), each
    group ties broken by recency (higher position first). Invalid positions are never selected.

    One ``torch.topk`` over a unique int64 key per position (tier, exact order-preserving bits of
    the float32 score, position) makes the order total, so ties are exact and deterministic on every
    device. Scores are ranked at float32 precision.

    Args:
        scores: B x L float relevance (higher is better).
        valid: B x L bool, False for padding (beyond the history length, or id 0).
        secondary_valid: B x L bool or None (None = every valid position has a score).
        k: number of slots per sample.

    Returns:
        TopK with B x k indices and scores, B lengths and scored lengths.
    """
    num_rows, max_len = scores.shape
    position_bits = max(1, (max_len - 1).bit_length())
    if position_bits > _MAX_POSITION_BITS:
        raise ValueError(f"histories longer than 2**{_MAX_POSITION_BITS} are not supported")
    scored = valid if secondary_valid is None else valid & secondary_valid
    # Tier 2: scored; 1: selectable without a score; 0: padding (only picked when k exceeds the
    # selectable count, then blanked below).
    tier = valid.long() + scored.long()
    # Unscored positions rank by recency alone: their score bits are a constant.
    score_bits = torch.where(scored, _order_preserving_bits(scores), torch.zeros_like(tier))
    positions = torch.arange(max_len, device=scores.device).expand(num_rows, max_len)
    key = (tier << (_SCORE_BITS + position_bits)) | (score_bits << position_bits) | positions

    _, indices = torch.topk(key, min(k, max_len), dim=1)
    picked_scores = torch.where(scored, scores, torch.zeros_like(scores)).gather(1, indices)
    missing = k - indices.shape[1]
    indices = F.pad(indices, (0, missing))
    picked_scores = F.pad(picked_scores, (0, missing))

    lengths = valid.sum(dim=1).clamp(max=k)
    real = length_mask(lengths, k)
    return TopK(
        indices=torch.where(real, indices, torch.zeros_like(indices)),
        scores=torch.where(real, picked_scores, torch.zeros_like(picked_scores)),
        lengths=lengths,
        scored_lengths=scored.sum(dim=1).clamp(max=k),
    )


@torch.no_grad()
def category_match_topk(
    hist_cates: Tensor, hist_lengths: Tensor, target_cate: Tensor, k: int
) -> TopK:
    """SIM-hard GSU: the K most recent behaviors whose category equals the target's.

    Category 0 (unknown) never matches. Selected behaviors get score 1.0.

    Args:
        hist_cates: B x L long, behavior categories, oldest first.
        hist_lengths: B long, history lengths.
        target_cate: B long, target categories.
        k: number of slots per sample.
    """
    match = category_matches(hist_cates, hist_lengths, target_cate)
    # Equal scores everywhere: the recency tie-break gives "most recent first".
    return select_topk(match.float(), match, None, k)


def category_matches(hist_cates: Tensor, hist_lengths: Tensor, target_cate: Tensor) -> Tensor:
    """B x L bool: the behaviors SIM-hard may select (category equal to the target's, 0 never matches);
    ``category_match_topk`` selects min(k, matches per row) of them."""
    same = hist_cates.eq(target_cate.unsqueeze(1)) & target_cate.ne(0).unsqueeze(1)
    return same & length_mask(hist_lengths, hist_cates.shape[1])


@torch.no_grad()
def muse_gsu(
    hist_scl_int8: Tensor,
    hist_lengths: Tensor,
    target_scl_int8: Tensor,
    sample_user: Tensor,
    k: int,
    slots: Optional[UserSlots] = None,
) -> TopK:
    """MUSE GSU: the K behaviors with the highest SCL cosine to the target, for a block of samples.

    Behaviors without SCL vector have no similarity: they rank after every behavior that has one
    (most recent first) with score 0.0. A target without SCL vector therefore gets its K most recent
    behaviors, all with score 0.0 (``scored_lengths`` 0).

    The cosine is computed from exact integer dot products of the raw int8 vectors (the /127
    dequantisation cancels) and exact squared norms, in float64, then rounded once to float32. Equal
    vectors therefore get bit-identical scores (the recency tie-break is exact), and the scores do
    not depend on the device (float32 sqrt is not correctly rounded on every CPU kernel).

    Args:
        hist_scl_int8: U x L x 128 int8, SCL vectors of each user's behaviors (zero = missing).
        hist_lengths: U long, history lengths (positions < length are real behaviors).
        target_scl_int8: B x 128 int8, SCL vector of each sample's target (zero = missing).
        sample_user: B long, index of each sample's user in ``0..U-1``.
        k: number of slots per sample.
        slots: ``user_slots(sample_user, U)`` if already known (then nothing reads back to the host).

    Returns:
        TopK over positions of the sample's user history; scores are cosines in [-1, 1].
    """
    # Integer dot products stay exact in float32 (|dot| <= 128 * 127**2 < 2**24) and in TF32,
    # but not if autocast rounded the matmul output to 16 bits. Convert once: the history is the
    # large operand (U x L x 128).
    history = hist_scl_int8.float()
    target = target_scl_int8.float()
    with torch.autocast(device_type=hist_scl_int8.device.type, enabled=False):
        dots = grouped_cosine(history, target, sample_user, slots)
    # Squared norms are integers below 2**21: exact in float32 whatever the summation order.
    hist_sq = history.square().sum(dim=-1)[sample_user]
    valid = length_mask(hist_lengths, hist_scl_int8.shape[1])[sample_user]
    return _cosine_topk(dots, hist_sq, target.square().sum(dim=-1), valid, k)


def _cosine_topk(dots: Tensor, hist_sq: Tensor, target_sq: Tensor, valid: Tensor, k: int) -> TopK:
    """MUSE's selection from exact integer statistics of the int8 vectors (see :func:`muse_gsu`).

    Args:
        dots: B x L float, <target, behavior> of the raw int8 vectors (integers).
        hist_sq: B x L float, squared norms of the behaviors (integers, 0 = no SCL vector).
        target_sq: B float, squared norms of the targets.
        valid: B x L bool, real behaviors.
    """
    # |a|^2 |h|^2 < 2**42 is exact in float64: one sqrt and one division, then one rounding.
    norms = (target_sq.double().unsqueeze(1) * hist_sq.double()).sqrt()
    # Nonzero int8 vectors have norm >= 1; missing ones have dot 0, so the clamp only avoids 0 / 0.
    # No clamp to [-1, 1] is needed: parallel vectors give exactly +-1 (exact sqrt of a square),
    # others stay more than 1e-13 inside, far beyond float64 rounding.
    cosine = (dots.double() / norms.clamp_min(1.0)).float()
    has_similarity = target_sq.gt(0).unsqueeze(1) & hist_sq.gt(0)
    return select_topk(cosine, valid, has_similarity, k)


@torch.no_grad()
def muse_gsu_by_sample(
    scl_int8: Tensor,
    item_scl_row: Tensor,
    hist_items: Tensor,
    hist_lengths: Tensor,
    sample_user: Tensor,
    target_items: Tensor,
    k: int,
) -> TopK:
    """:func:`muse_gsu` from item ids, scoring each sample against its user's row on its own: the
    same TopK, exactly, with no shape that depends on the data (no per-user grouping, nothing read
    back), so it can be compiled and captured in a CUDA graph (``data.device_gsu``).

    Eager, it builds the B x L x 128 history of every sample (11x the per-user bytes); compiled,
    the gathers and the 128-wide reductions fuse into one kernel that builds nothing of that size.

    Args:
        scl_int8: [S + 1, 128] int8 SCL table (row 0 and missing vectors all zero).
        item_scl_row: [V] item id -> SCL row.
        hist_items: U x L long, each user's behavior item ids; hist_lengths: U long.
        sample_user: B long, index of each sample's user; target_items: B long.
        k: number of slots per sample.
    """
    target = scl_int8[item_scl_row[target_items].long()].float()
    history = scl_int8[item_scl_row[hist_items[sample_user]].long()].float()
    # Sums of products of int8 values: integers below 2**24, exact in float32 in any order.
    dots = (history * target.unsqueeze(1)).sum(dim=-1)
    valid = length_mask(hist_lengths, hist_items.shape[1])[sample_user]
    return _cosine_topk(dots, history.square().sum(dim=-1), target.square().sum(dim=-1), valid, k)


def gather_selected(per_user: Tensor, sample_user: Tensor, topk: TopK) -> Tensor:
    """Values of the selected behaviors, zero in padding slots.

    Args:
        per_user: U x L x ... per-behavior values (item ids, categories, vectors).
        sample_user: B long, index of each sample's user.
        topk: selection over the users' histories.

    Returns:
        B x K x ..., ``per_user[sample_user[b], topk.indices[b, j]]`` for real slots, else 0
        (id 0 = padding for id tensors).
    """
    picked = per_user[sample_user.unsqueeze(1), topk.indices]
    real = length_mask(topk.lengths, topk.indices.shape[1])
    real = real.reshape(real.shape + (1,) * (picked.dim() - 2))
    return torch.where(real, picked, torch.zeros_like(picked))


def blocked_topk(key: Tensor, k: int, block: int, block_max: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``torch.topk(key, k, dim=1)`` of a wide [C, N] matrix in two narrow passes: same values, exactly.

    Stage 1 takes the max of every ``block`` columns and keeps the k blocks with the largest maxima;
    stage 2 takes the top k of those k * block columns. Exact: if an element x of the true top k lay
    in a block outside the kept ones, each kept block would hold an element >= x, so the kept
    columns hold k elements >= x whatever x is, and the top k of the kept columns are >= the true
    ones rank by rank (equal values may come from other positions, as with ``torch.topk``).

    Why: ``torch.topk`` over 100 k-wide rows costs several passes over the matrix; a max per block
    is one pass (or none, when the maxima come with the keys), and the topks left are over
    ~N / block and k * block columns.

    Args:
        key: [C, N] float, N a multiple of ``block`` (pad with -inf).
        k: number of largest entries per row, ``k <= N``.
        block: columns per block.
        block_max: [C, N / block] maxima of the blocks, if already known.

    Returns:
        (values [C, k] descending, indices [C, k] into the N columns).
    """
    rows, width = key.shape
    if width % block:
        raise ValueError(f"blocked_topk: width {width} is not a multiple of block {block}")
    blocks = width // block
    if blocks <= k:
        return torch.topk(key, k, dim=1)
    if block_max is None:
        block_max = key.view(rows, blocks, block).amax(dim=2)
    best_blocks = torch.topk(block_max, k, dim=1).indices
    columns = (best_blocks.unsqueeze(2) * block + torch.arange(block, device=key.device)).view(rows, k * block)
    values, picked = torch.topk(key.gather(1, columns), k, dim=1)
    return values, columns.gather(1, picked)


# Serving key of the most recent behavior without SCL vector; older ones sit one unit lower each.
# It is below every scored key, since a scored key dot / |h| never exceeds |c| in size, and |c| is
# at most sqrt(128) * 127, under 2**11. Integer steps stay exact in float32 up to 2**23 behaviors.
_UNSCORED_KEY = -float(2**12)


@torch.no_grad()
def serving_topk(history_int8: Tensor, history_length: int, candidates_int8: Tensor, k: int,
                 block: Optional[int] = 256, fused: bool = True) -> TopK:
    """MUSE GSU for serving: one user's cached history against C candidates.

    Same selection rules as :func:`muse_gsu` (behaviors without SCL vector after every scored one,
    most recent first, score 0; positions >= ``history_length`` never chosen), computed for speed:
    exact int8 dot products turned into ranking keys ``dot * scale[l] + bias[l]`` (scale 1 / |h_l|
    for scored behaviors; the bias ranks the others by recency and padding last) with their block
    maxima (``serving_keys``: one fused kernel on CUDA), then :func:`blocked_topk`. Within a candidate's row ``dot / |h_l|``
    orders like the cosine (``|c|`` is the same along the row); the cosines of the K picked
    behaviors are made at the end. Equal cosines may come out in any order: the ESU reads items and
    scores, not positions, and equal cosines at float32 precision practically only come from the
    same item seen twice, so the ESU input is the same.

    Args:
        history_int8: L x 128 int8 SCL vectors of the user's behaviors, oldest first (zero = missing).
        history_length: number of real behaviors (a prefix of the L rows).
        candidates_int8: C x 128 int8 SCL vectors of the candidates (zero = missing).
        k: number of slots per candidate.
        block: columns per block of :func:`blocked_topk`, or None for one ``torch.topk``.
        fused: whether the keys may come from the fused GPU kernel (else the plain torch passes).
        (``block`` and ``fused`` change the speed only, not the result.)

    Returns:
        TopK over history positions, C rows.
    """
    length, device = history_int8.shape[0], history_int8.device
    width = length + (-length) % math.lcm(block or 1, 8)  # blocks of keys; _int_mm wants multiples of 8
    history = F.pad(history_int8, (0, 0, 0, width - length))
    positions = torch.arange(width, device=device)
    hist_norm = history.float().square().sum(dim=1).sqrt()
    cand_norm = candidates_int8.float().square().sum(dim=1).sqrt()
    valid = positions < history_length
    scored = valid & (hist_norm > 0)
    scale = torch.where(scored, 1.0 / hist_norm.clamp_min(1.0), 0.0)
    by_recency = _UNSCORED_KEY - (history_length - 1 - positions).float()
    bias = torch.where(scored, 0.0, torch.where(valid, by_recency, -float("inf")))
    take = min(k, width)
    if block:
        key, block_max = serving_keys(candidates_int8, history, scale, bias, block, fused)
        keys, indices = blocked_topk(key, take, block, block_max)
    else:
        keys, indices = torch.topk(ranking_keys(candidates_int8, history, scale, bias), take, dim=1)
    # Slot i is real iff i < min(k, history_length); its behavior is scored iff its key is a cosine.
    selectable = min(k, history_length)
    lengths = torch.full((candidates_int8.shape[0],), selectable, device=device, dtype=torch.long)
    real = length_mask(lengths, take)
    has_vector = (cand_norm > 0).unsqueeze(1)
    picked_scored = real & has_vector & (keys > _UNSCORED_KEY)
    cosine = torch.where(picked_scored, keys / cand_norm.clamp_min(1.0).unsqueeze(1), 0.0)
    # A candidate without vector has no cosine: its slots are the most recent behaviors.
    most_recent = (history_length - 1 - torch.arange(take, device=device)).clamp_min(0)
    indices = torch.where(has_vector, indices, most_recent)
    indices = torch.where(real, indices, 0)
    pad = (0, k - take)
    return TopK(indices=F.pad(indices, pad), scores=F.pad(cosine, pad), lengths=lengths,
                scored_lengths=picked_scored.sum(dim=1))
