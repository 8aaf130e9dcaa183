"""Random SampleBlocks and SCL tables for model and batch tests (no files involved)."""

from typing import Dict, Tuple

import numpy as np

from muse_torchrec import features as F
from muse_torchrec.data.block import SampleBlock

VOCAB: Dict[str, int] = {
    "item": 400, "cate": 30, "user": 50, "profile_1": 12, "profile_2": 5, "profile_3": 51,
    "profile_4": 60, "profile_5": 8, "item_city": 20, "item_province": 9,
}


def random_scl(rng: np.random.Generator, missing: float = 0.1) -> Tuple[np.ndarray, np.ndarray]:
    """([S+1, 128] int8 SCL table with row 0 zeros, [V_item] int32 item -> SCL row, 0 for ~missing)."""
    n_items = VOCAB["item"]
    has = rng.random(n_items) > missing
    has[0] = False
    item_scl_row = np.zeros(n_items, dtype=np.int32)
    item_scl_row[has] = np.arange(1, has.sum() + 1)
    vectors = rng.normal(size=(has.sum() + 1, F.SCL_DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    scl = np.trunc(np.clip(vectors, -1, 1) * 127).astype(np.int8)
    scl[0] = 0
    return scl, item_scl_row


def random_block(rng: np.random.Generator, num_users: int, max_len: int, samples_per_user: int = 3,
                 zero_id_share: float = 0.05) -> SampleBlock:
    """A block whose users have histories of random length (some empty), with some id-0 entries."""
    lengths = rng.integers(0, max_len + 1, size=num_users)
    lengths[0] = 0
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    hist_items = rng.integers(1, VOCAB["item"], size=n)
    hist_items[rng.random(n) < zero_id_share] = 0
    hist_cates = rng.integers(1, VOCAB["cate"], size=n)
    counts = rng.integers(1, samples_per_user + 1, size=num_users)
    sample_user = np.repeat(np.arange(num_users), counts).astype(np.int64)
    b = sample_user.size
    target = {name: rng.integers(0, VOCAB[name], size=b) for name in ("item", "cate", "item_city", "item_province")}
    users = {name: rng.integers(0, VOCAB[name], size=num_users) for name in F.USER_FEATURES}
    return SampleBlock(
        labels=(rng.random(b) < 0.3).astype(np.float32),
        user_key=(sample_user * 7919 - 1000).astype(np.int64),
        sample_user=sample_user,
        target=target,
        user_features=users,
        hist_offsets=offsets,
        hist_items=hist_items,
        hist_cates=hist_cates,
        true_prob=rng.random(b).astype(np.float32),
    )
