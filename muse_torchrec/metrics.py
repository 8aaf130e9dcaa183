"""Evaluation metrics: AUC, exact GAUC, per-batch GAUC (the reference's), log loss, across ranks.

Definitions (MUSE_SPEC.md section 7):

- **AUC**: ROC AUC over the whole evaluation set, i.e. the probability that a random positive
  scores above a random negative, a tie counting 1/2.
- **GAUC (exact)**: the impression-weighted mean of per-user AUC,
  ``sum_u n_u * AUC_u / sum_u n_u``, over the users that have both a click and a non-click;
  ``n_u`` counts all impressions of user ``u``. Users are grouped over the *whole* evaluation set,
  across batches and ranks.
- **GAUC (per batch)**: the public reference implementation's variant, the same formula applied
  within each batch and summed over batches: a user whose impressions fall into two batches counts
  as two users, each with only that batch's impressions (see :class:`PerBatchGAUC`).
- **Log loss**: mean binary cross-entropy of the click logits.

All AUCs come from one rank-sum routine (Mann-Whitney U with average ranks for ties) computed in
exact int64 arithmetic on doubled ranks, so tie handling costs no precision and the result does not
depend on row order. Every ``weights`` argument is a 0/1 row mask: 0 marks a padding row that is
ignored, as the loader pads the last batch so that every rank runs the same number of steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist


ArrayLike = Union[np.ndarray, torch.Tensor]


def _to_numpy(x: ArrayLike) -> np.ndarray:
    """A host numpy view of a tensor (any device) or array, shape unchanged."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        # numpy has no bfloat16 (mixed-precision logits); float32 holds every bfloat16 exactly.
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def _keep_rows(weights: Optional[ArrayLike], *arrays: ArrayLike) -> Tuple[np.ndarray, ...]:
    """The rows of each [N] array whose weight is 1 (all rows when ``weights`` is None).

    Raises ValueError for weights other than 0/1: a fractional weight would have no defined
    meaning for AUC, so it is refused rather than silently treated as a mask.
    """
    columns = tuple(_to_numpy(a) for a in arrays)
    if weights is None:
        return columns
    w = _to_numpy(weights)
    if not np.isin(w, (0, 1)).all():
        raise ValueError("weights must be a 0/1 row mask (0 = padding row)")
    keep = w == 1
    return tuple(c[keep] for c in columns)


def _per_group_auc(
    group: np.ndarray, labels: np.ndarray, scores: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """AUC of each group of rows, by rank sums with exact tie handling.

    Rows are sorted by (group, score); within a group, each run of equal scores gets the average of
    the ranks it spans. Ranks are kept doubled so that those averages stay integers and the rank
    sums are exact in int64. With P positives, N negatives and doubled positive rank sum R2 in a
    group, AUC = (R2 / 2 - P (P + 1) / 2) / (P N).

    Args:
        group: [N] int64 group key of each row (e.g. the user id).
        labels: [N] 0/1 labels, 1 = click.
        scores: [N] scores, higher = more likely a click.

    Returns:
        auc: [G] float64 AUC of each distinct group, in ascending key order; NaN for a group whose
            labels are all equal.
        sizes: [G] int64 number of rows of each group.
    """
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    n = len(group)
    if n == 0:
        return np.empty(0, np.float64), np.empty(0, np.int64)
    order = np.lexsort((scores, group))
    g, s = group[order], scores[order]
    positive = labels[order] > 0.5

    new_group = np.ones(n, dtype=bool)
    new_group[1:] = g[1:] != g[:-1]
    new_tie = new_group.copy()
    new_tie[1:] |= s[1:] != s[:-1]
    group_starts = np.flatnonzero(new_group)
    tie_starts = np.flatnonzero(new_tie)
    tie_ends = np.append(tie_starts[1:], n)
    tie_of_row = np.cumsum(new_tie) - 1
    group_of_row = np.cumsum(new_group) - 1

    # A tie run at sorted positions [a, b) of a group starting at c holds 1-based ranks
    # a-c+1 .. b-c; twice their average is a + b + 1 - 2c.
    twice_rank = (
        tie_starts[tie_of_row] + tie_ends[tie_of_row] + 1 - 2 * group_starts[group_of_row]
    )
    twice_rank_sum = np.add.reduceat(np.where(positive, twice_rank, 0), group_starts)
    num_pos = np.add.reduceat(positive.astype(np.int64), group_starts)
    sizes = np.diff(np.append(group_starts, n))
    num_neg = sizes - num_pos
    # A single-class group gives 0 / 0 = NaN: with no negatives the positives hold ranks 1..P, so
    # the numerator is 0 too.
    with np.errstate(invalid="ignore"):
        auc = (twice_rank_sum - num_pos * (num_pos + 1)) / (2.0 * num_pos * num_neg)
    return auc, sizes


def _gauc_sums(
    user_key: np.ndarray, labels: np.ndarray, scores: np.ndarray
) -> Tuple[float, int, int]:
    """Numerator and denominators of GAUC over the users having both classes.

    Returns:
        ``(sum_u n_u * AUC_u, sum_u n_u, number of users)``, the sums over users with both classes.
    """
    auc_u, n_u = _per_group_auc(user_key, labels, scores)
    used = ~np.isnan(auc_u)
    return float(np.sum(auc_u[used] * n_u[used])), int(n_u[used].sum()), int(used.sum())


def auc(labels: ArrayLike, scores: ArrayLike, weights: Optional[ArrayLike] = None) -> float:
    """Exact ROC AUC, ties counted as 1/2.

    Args:
        labels: [N] 0/1 labels, 1 = click.
        scores: [N] scores (logits or probabilities; only their order matters).
        weights: optional [N] 0/1 mask; rows with weight 0 are padding and ignored.

    Returns:
        The AUC, or NaN when the kept rows hold only one class.
    """
    labels, scores = _keep_rows(weights, labels, scores)
    per_group, _ = _per_group_auc(np.zeros(len(labels), np.int64), labels, scores)
    return float(per_group[0]) if len(per_group) else math.nan


def grouped_auc(
    user_key: ArrayLike,
    labels: ArrayLike,
    scores: ArrayLike,
    weights: Optional[ArrayLike] = None,
) -> Tuple[float, int, int]:
    """Exact GAUC: impression-weighted mean of per-user AUC over users having both classes.

    Args:
        user_key: [N] int64 user id of each impression.
        labels: [N] 0/1 labels, 1 = click.
        scores: [N] scores.
        weights: optional [N] 0/1 mask; rows with weight 0 are padding and ignored.

    Returns:
        ``(gauc, num_users_used, num_impressions_used)``; gauc is NaN when no user has both classes.
    """
    user_key, labels, scores = _keep_rows(weights, user_key, labels, scores)
    weighted_sum, impressions, users = _gauc_sums(user_key, labels, scores)
    return (weighted_sum / impressions if impressions else math.nan), users, impressions


def log_loss(labels: ArrayLike, logits: ArrayLike, weights: Optional[ArrayLike] = None) -> float:
    """Mean binary cross-entropy of click logits, computed stably in float64.

    ``-y log sigmoid(z) - (1 - y) log(1 - sigmoid(z)) = log(1 + e^z) - y z``; ``np.logaddexp``
    evaluates ``log(1 + e^z)`` without overflow for any finite logit.

    Args:
        labels: [N] 0/1 labels, 1 = click.
        logits: [N] click logits (not probabilities).
        weights: optional [N] 0/1 mask; rows with weight 0 are padding and ignored.

    Returns:
        The mean over the kept rows, NaN when there are none.
    """
    labels, logits = _keep_rows(weights, labels, logits)
    if len(labels) == 0:
        return math.nan
    z = logits.astype(np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - labels.astype(np.float64) * z))


@dataclass
class PerBatchGAUC:
    """GAUC as the public reference implementation computes it: users grouped within each batch.

    For every batch b and every user u with both classes among that batch's impressions, let
    ``n_bu`` be u's impressions in b and ``AUC_bu`` their AUC. The metric is
    ``sum_{b,u} n_bu * AUC_bu / sum_{b,u} n_bu``: a user whose impressions are split over two
    batches counts as two users, and a part holding one class only is dropped even when the user's
    whole set has both. Summing the three fields over ranks gives the metric over all ranks'
    batches.

    Attributes:
        weighted_auc_sum: ``sum n_bu * AUC_bu`` so far.
        num_impressions: ``sum n_bu`` so far.
        num_users: number of (batch, user) pairs counted so far.
    """

    weighted_auc_sum: float = 0.0
    num_impressions: int = 0
    num_users: int = 0

    def update(
        self,
        user_key: ArrayLike,
        labels: ArrayLike,
        scores: ArrayLike,
        weights: Optional[ArrayLike] = None,
    ) -> None:
        """Adds one batch: [B] user ids, 0/1 labels, scores and optional 0/1 padding mask."""
        weighted_sum, impressions, users = _gauc_sums(
            *_keep_rows(weights, user_key, labels, scores)
        )
        self.weighted_auc_sum += weighted_sum
        self.num_impressions += impressions
        self.num_users += users

    def compute(self) -> float:
        """The per-batch GAUC so far, NaN when no batch had a user with both classes."""
        return self.weighted_auc_sum / self.num_impressions if self.num_impressions else math.nan


@dataclass(frozen=True)
class EvalMetrics:
    """Metrics of one evaluation over every rank's non-padding samples.

    Attributes:
        auc: AUC of the logits over the whole set.
        gauc: exact GAUC (each user's impressions grouped over the whole set, across ranks).
        gauc_per_batch: the reference implementation's per-batch GAUC (:class:`PerBatchGAUC`).
        logloss: mean binary cross-entropy of the logits.
        num_eval_samples: non-padding samples evaluated, over all ranks.
        num_gauc_users: users counted by the exact GAUC (both classes present).
        num_gauc_impressions: impressions of those users.
        num_gauc_users_per_batch: (batch, user) pairs counted by the per-batch GAUC.
        best_auc: AUC of the true click probabilities, when the data knows them (synthetic).
        best_gauc: exact GAUC of the true click probabilities, likewise.
    """

    auc: float
    gauc: float
    gauc_per_batch: float
    logloss: float
    num_eval_samples: int
    num_gauc_users: int
    num_gauc_impressions: int
    num_gauc_users_per_batch: int
    best_auc: Optional[float] = None
    best_gauc: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict; NaN (undefined metric) becomes None, since JSON has no NaN."""
        return {
            key: None if isinstance(value, float) and math.isnan(value) else value
            for key, value in dataclasses.asdict(self).items()
        }


# Per-rank bookkeeping exchanged before the rows: it fixes the gather lengths and the column layout,
# and carries the per-batch GAUC sums. float64 holds these integers exactly (below 2**53).
_META_FIELDS = (
    "rows",
    "batches",
    "true_prob_batches",
    "pb_weighted_auc_sum",
    "pb_impressions",
    "pb_users",
)


class EvalAccumulator:
    """Collects one evaluation's batches on each rank and computes :class:`EvalMetrics`.

    Padding rows (weight 0) are dropped on arrival and the rest is kept in host memory (32 bytes a
    sample, 40 with true_prob; every rank holds all ranks' rows during :meth:`compute`), so that
    :meth:`compute` can group each user's impressions over the whole set. With torch.distributed
    initialised and more than one rank, :meth:`compute` is a collective: every rank must call it,
    and every rank returns the same metrics, computed on all ranks' rows concatenated in rank order.
    """

    def __init__(self) -> None:
        self._user_key: List[np.ndarray] = []
        self._labels: List[np.ndarray] = []
        self._logits: List[np.ndarray] = []
        self._true_prob: List[np.ndarray] = []
        self._per_batch = PerBatchGAUC()

    def update(
        self,
        user_key: ArrayLike,
        labels: ArrayLike,
        logits: ArrayLike,
        weights: Optional[ArrayLike] = None,
        true_prob: Optional[ArrayLike] = None,
    ) -> None:
        """Adds one batch.

        Args:
            user_key: [B] int64 user id of each sample.
            labels: [B] 0/1 labels, 1 = click.
            logits: [B] click logits.
            weights: optional [B] 0/1 mask, 0 = padding row to ignore.
            true_prob: optional [B] true click probability (synthetic data); give it for every
                batch or for none.
        """
        if self._user_key and (true_prob is not None) != bool(self._true_prob):
            raise ValueError("true_prob must be given for every batch or for none")
        columns = (user_key, labels, logits) + (() if true_prob is None else (true_prob,))
        kept = _keep_rows(weights, *columns)
        self._user_key.append(kept[0].astype(np.int64))
        self._labels.append(kept[1].astype(np.float64))
        self._logits.append(kept[2].astype(np.float64))
        if true_prob is not None:
            self._true_prob.append(kept[3].astype(np.float64))
        self._per_batch.update(kept[0], kept[1], kept[2])

    def compute(self, process_group: Optional[dist.ProcessGroup] = None) -> EvalMetrics:
        """Metrics over every rank's rows; a collective when more than one rank takes part.

        Args:
            process_group: the group to gather over; None = the default group.

        Raises:
            ValueError: on every rank alike, if some ranks gave true_prob and others did not.
        """
        local_meta = torch.tensor(
            [
                sum(len(k) for k in self._user_key),
                len(self._user_key),
                len(self._true_prob),
                self._per_batch.weighted_auc_sum,
                self._per_batch.num_impressions,
                self._per_batch.num_users,
            ],
            dtype=torch.float64,
        )
        distributed = (
            dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(process_group) > 1
        )
        # [world, len(_META_FIELDS)]: one row per rank. Gathered rather than all-reduced so that the
        # row lengths are known for the gather below; the sums over ranks then come from one place.
        meta = local_meta[None]
        if distributed:
            meta = _all_gather_rows(meta, [1] * dist.get_world_size(process_group), process_group)
        totals = dict(zip(_META_FIELDS, meta.sum(dim=0).tolist()))
        if 0 < totals["true_prob_batches"] < totals["batches"]:
            raise ValueError("true_prob was given for some batches and not for others")
        has_true_prob = totals["batches"] > 0 and totals["true_prob_batches"] == totals["batches"]

        # Ranks without batches still contribute an empty [0, C] block of the agreed layout.
        value_lists = [self._labels, self._logits] + ([self._true_prob] if has_true_prob else [])
        user_key = torch.from_numpy(np.concatenate(self._user_key or [np.empty(0, np.int64)]))
        values = torch.from_numpy(
            np.stack([np.concatenate(v or [np.empty(0)]) for v in value_lists], axis=1)
        )
        if distributed:
            lengths = [int(n) for n in meta[:, 0].tolist()]
            user_key = _all_gather_rows(user_key, lengths, process_group)
            values = _all_gather_rows(values, lengths, process_group)

        user_key_np, values_np = user_key.numpy(), values.numpy()
        labels, logits = values_np[:, 0], values_np[:, 1]
        gauc, gauc_users, gauc_impressions = grouped_auc(user_key_np, labels, logits)
        per_batch = PerBatchGAUC(
            weighted_auc_sum=totals["pb_weighted_auc_sum"],
            num_impressions=int(totals["pb_impressions"]),
            num_users=int(totals["pb_users"]),
        )
        best_auc = best_gauc = None
        if has_true_prob:
            best_auc = auc(labels, values_np[:, 2])
            best_gauc = grouped_auc(user_key_np, labels, values_np[:, 2])[0]
        return EvalMetrics(
            auc=auc(labels, logits),
            gauc=gauc,
            gauc_per_batch=per_batch.compute(),
            logloss=log_loss(labels, logits),
            num_eval_samples=len(labels),
            num_gauc_users=gauc_users,
            num_gauc_impressions=gauc_impressions,
            num_gauc_users_per_batch=per_batch.num_users,
            best_auc=best_auc,
            best_gauc=best_gauc,
        )


def _all_gather_rows(
    local: torch.Tensor, lengths: List[int], group: Optional[dist.ProcessGroup]
) -> torch.Tensor:
    """Concatenates every rank's rows in rank order; the same result on every rank.

    all_gather needs equal shapes, so each rank pads its block to the longest one and the padding is
    trimmed after the gather. The transfer runs on the device the backend needs (CUDA for NCCL).

    Args:
        local: [n_r, ...] this rank's rows.
        lengths: [world] n_r of every rank, known to all ranks beforehand.
        group: the process group; None = the default group.

    Returns:
        [sum(lengths), ...] on the host.
    """
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend(group) == dist.Backend.NCCL
        else torch.device("cpu")
    )
    padded = local.new_zeros((max(lengths),) + tuple(local.shape[1:]), device=device)
    padded[: len(local)] = local
    gathered = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([block[:n].cpu() for block, n in zip(gathered, lengths)])
