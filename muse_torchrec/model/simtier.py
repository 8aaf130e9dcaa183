"""SimTier: histogram of the GSU similarity scores of the selected behaviors (MUSE_SPEC section 6).

Two definitions, chosen at construction:

- ``"paper"``: [-1, 1] split into N equal tiers ``[lo, hi)`` (the last one closed, so a score of
  exactly 1.0 lands in it); the output is the count per tier.
- ``"reference"``: the public implementation's tiers of width 0.1, bin ``ceil(10 r) + 10`` in 22
  slots, output ``log(1 + count_b) * w_b`` with a learned weight per bin (init 1).

Unlike the reference, padded positions (``>= length``) are not counted in either mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from muse_torchrec.model.gsu import length_mask

SIMTIER_MODES = ("paper", "reference")
# Reference binning: ceil(10 r) + 10 maps [-1, 1] onto 0..20; it keeps 22 slots.
_REFERENCE_BINS = 22
_REFERENCE_TIERS_PER_UNIT = 10


def masked_histogram(bins: Tensor, lengths: Tensor, num_bins: int) -> Tensor:
    """Count of each bin over the real positions of each row.

    Args:
        bins: B x K long, bin of each position, in ``0..num_bins-1``.
        lengths: B long, positions ``>= lengths[b]`` are padding and not counted.
        num_bins: number of bins.

    Returns:
        B x num_bins float counts.
    """
    real = length_mask(lengths, bins.shape[1]).float()
    counts = real.new_zeros(bins.shape[0], num_bins)
    return counts.scatter_add_(1, bins, real)


class EqualTiers(nn.Module):
    """Paper tiers: [-1, 1] in ``num_tiers`` equal tiers. Scores B x K -> tiers B x K long."""

    def __init__(self, num_tiers: int = 20) -> None:
        super().__init__()
        if num_tiers < 1:
            raise ValueError(f"num_tiers must be positive, got {num_tiers}")
        self.num_bins = num_tiers

    def forward(self, scores: Tensor) -> Tensor:
        position = (scores.clamp(-1.0, 1.0) + 1.0) * (self.num_bins / 2.0)
        # floor gives half-open tiers; clamping puts 1.0 (position == num_tiers) in the last one.
        return position.floor().long().clamp(0, self.num_bins - 1)


class ReferenceTiers(nn.Module):
    """Reference tiers: bin ``ceil(10 r) + 10`` of 22. Scores B x K -> bin indices B x K long."""

    def __init__(self) -> None:
        super().__init__()
        self.num_bins = _REFERENCE_BINS

    def forward(self, scores: Tensor) -> Tensor:
        # Scores are cosines; clamping only absorbs float rounding just outside [-1, 1].
        tiers = torch.ceil(scores.clamp(-1.0, 1.0) * _REFERENCE_TIERS_PER_UNIT).long()
        return tiers + _REFERENCE_TIERS_PER_UNIT


class LogCountWeights(nn.Module):
    """Reference head: ``log(1 + count_b) * w_b``, one learned weight per bin (init 1).

    Counts B x N -> B x N.
    """

    def __init__(self, num_bins: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_bins))

    def forward(self, counts: Tensor) -> Tensor:
        return torch.log1p(counts) * self.weight


class SimTier(nn.Module):
    """Histogram of the similarity scores of the top-K behaviors: B x K -> B x ``output_dim``.

    Args:
        mode: ``"paper"`` (counts in ``num_tiers`` equal tiers of [-1, 1]) or ``"reference"``
            (22 bins of width 0.1, ``log(1 + count)`` times a learned weight per bin).
        num_tiers: number of tiers in paper mode (ignored in reference mode, which has 22 bins).
    """

    def __init__(self, mode: str = "paper", num_tiers: int = 20) -> None:
        super().__init__()
        if mode == "paper":
            self.tiers: nn.Module = EqualTiers(num_tiers)
            self.head: nn.Module = nn.Identity()
        elif mode == "reference":
            self.tiers = ReferenceTiers()
            self.head = LogCountWeights(self.tiers.num_bins)
        else:
            raise ValueError(f"unknown SimTier mode {mode!r}; expected one of {SIMTIER_MODES}")
        self.mode = mode
        self.output_dim: int = self.tiers.num_bins

    def forward(self, scores: Tensor, lengths: Tensor) -> Tensor:
        """
        Args:
            scores: B x K similarity scores in [-1, 1] (e.g. ``TopK.scores``).
            lengths: B long, number of real positions per row (``TopK.lengths``, or
                ``TopK.scored_lengths`` to leave behaviors without similarity out).

        Returns:
            B x output_dim float.
        """
        counts = masked_histogram(self.tiers(scores), lengths, self.output_dim)
        return self.head(counts)
