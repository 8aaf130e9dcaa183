"""SampleBlock: what the loader reads from prepared shards, before any model-specific processing.

A block holds B samples and the U distinct users they reference; each user's lists are stored once
(a user's ~11 samples share them), exactly as the prepared shards store them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np


@dataclass
class SampleBlock:
    """B samples and their U distinct users, as numpy arrays in host memory.

    Attributes:
        labels: [B] float32, 1.0 = click.
        user_key: [B] int64, the raw user id (groups impressions for GAUC).
        sample_user: [B] int64, index of each sample's user in ``0..U-1``.
        target: table name -> [B] int64 vocabulary rows of the target-side features
            ("item", "cate", "item_city", "item_province"); 0 = padding / unknown.
        user_features: table name -> [U] int64 rows ("user", "profile_1".."profile_5").
        hist_offsets: [U + 1] int64 offsets into ``hist_items`` / ``hist_cates``.
        hist_items: [N] int64 item rows of every user's behaviors, oldest first.
        hist_cates: [N] int64 category rows aligned with ``hist_items``.
        true_prob: [B] float32 true click probability when the data knows it (synthetic), else None.
    """

    labels: np.ndarray
    user_key: np.ndarray
    sample_user: np.ndarray
    target: Dict[str, np.ndarray]
    user_features: Dict[str, np.ndarray]
    hist_offsets: np.ndarray
    hist_items: np.ndarray
    hist_cates: np.ndarray
    true_prob: Optional[np.ndarray] = None

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_users(self) -> int:
        return int(self.hist_offsets.shape[0] - 1)
