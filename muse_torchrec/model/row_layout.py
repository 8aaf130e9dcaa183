"""Where the tensors the dense tower reads lie among one batch's looked-up rows, and their padding in
static shapes.

A batch's lookups give the embeddings of its ids feature after feature ([N, D], the order of the
KJT's values), N varying from batch to batch. ``SparseArch.rows`` pads them with zero rows to the
most a batch of B samples can hold plus one (``RowLayout.capacity``); ``padded_slots`` then gathers
every sample's slots of a feature from those rows, at indices computed from the lengths on the
device, through the rows' order (a routed lookup gives them in another order than the ids'). Every
shape is fixed by B and the layout, so the padding can be captured in CUDA graphs with the tower
(``compile_tower``, "graphs"): a replay instead of the jagged-to-padded conversion's dozen host
operations, forward and backward, on a step bound by host time (benchmarks/RESULTS.md row 65).
``SparseArch.forward`` keeps the conversion through fbgemm's ``jagged_to_padded_dense``, the
reference the tests compare this with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import torch


@dataclass(frozen=True)
class RowLayout:
    """The features of a batch's rows, in their order, and the slots each gives a sample.

    Attributes:
        keys: the features, in the order of the rows (and of the KJT's lengths).
        slots: per key, the most ids a sample has (1 for single-id features).
    """

    keys: Tuple[str, ...]
    slots: Tuple[int, ...]

    @classmethod
    def of(cls, keys: Sequence[str], slots: Dict[str, int]) -> "RowLayout":
        return cls(tuple(keys), tuple(slots[key] for key in keys))

    def capacity(self, batch_size: int) -> int:
        """The most rows a batch of ``batch_size`` samples can look up."""
        return batch_size * sum(self.slots)

    def positions(self, keys: Sequence[str]) -> Tuple[int, ...]:
        return tuple(self.keys.index(key) for key in keys)


def row_starts(lengths: torch.Tensor, features: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """KJT lengths [F * B] (feature-major) -> (the row of each sample's first id per feature
    [F, B] int64, the lengths as [F, B])."""
    flat = lengths.long()
    return (torch.cumsum(flat, 0) - flat).view(features, -1), lengths.view(features, -1)


def padded_slots(
    rows: torch.Tensor,
    order: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    features: Sequence[int],
    width: int,
) -> torch.Tensor:
    """The first ``width`` ids of every sample in each of ``features``, their embeddings side by side.

    Args:
        rows: [M, D] looked-up embeddings, row ``order[N]`` zeros.
        order: [N + 1] int64, the row of each id in the order of the KJT's values (ids sharing a row
            may share it), then of zero rows; N at least the ids of the batch.
        starts, lengths: [F, B] (``row_starts``).
        features: indices into F whose samples have equal lengths (an item sequence and its
            categories), concatenated in this order along the last dimension.
        width: slots per sample; slots past a sample's length read the zero row ``order[N]``.

    Returns: [B, width, len(features) * D].
    """
    chosen = list(features)
    slots = torch.arange(width, device=rows.device)
    index = starts[chosen].unsqueeze(2) + slots  # [f, B, width]
    index = torch.where(slots < lengths[chosen].unsqueeze(2), index, order.shape[0] - 1)
    # One gather of the rows at the composed index: never every row reordered, forward or backward.
    return rows[order[index.permute(1, 2, 0)]].flatten(2)  # [B, width, f, D] -> [B, width, f * D]
