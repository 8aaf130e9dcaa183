"""The one place that knows Taobao-MM field names and which features share which embedding table.

Raw Taobao-MM column names (MUSE_SPEC section 2) are strings such as ``"205"``; everywhere else the
code uses the table and feature names defined here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Tuple

# Raw column names.
LABEL = "label_0"
USER_ID = "129_1"
USER_PROFILE = ("130_1", "130_2", "130_3", "130_4", "130_5")
ITEM_ID = "205"
ITEM_CATE = "206"
ITEM_CITY = "213"
ITEM_PROVINCE = "214"
HIST_ITEMS = "150_2_180"
HIST_CATES = "151_2_180"
SCL_VECTOR = "205_c"

SCL_DIM = 128
# SCL int8 values were made as trunc(clip(x, -1, 1) * 127) from L2-normalised vectors.
SCL_SCALE = 127.0
MAX_HISTORY = 1000
RECENT = 50


@dataclass(frozen=True)
class Table:
    """An embedding table and the raw columns whose ids index it (they share one vocabulary)."""

    name: str
    raw_columns: Tuple[str, ...]


# Vocabulary / embedding tables. Item and category tables are shared by target and history.
ITEM = Table("item", (ITEM_ID, HIST_ITEMS))
CATE = Table("cate", (ITEM_CATE, HIST_CATES))
USER = Table("user", (USER_ID,))
PROFILE = tuple(Table(f"profile_{c.split('_')[1]}", (c,)) for c in USER_PROFILE)
CITY = Table("item_city", (ITEM_CITY,))
PROVINCE = Table("item_province", (ITEM_PROVINCE,))

TABLES: Tuple[Table, ...] = (ITEM, CATE, USER, *PROFILE, CITY, PROVINCE)
TABLES_BY_NAME: Dict[str, Table] = {t.name: t for t in TABLES}

# Sequence (unpooled) features read through the shared item / category tables.
SEQUENCE_FEATURES: Dict[str, str] = {
    "item_target": ITEM.name,
    "item_topk": ITEM.name,
    "item_recent": ITEM.name,
    "cate_target": CATE.name,
    "cate_topk": CATE.name,
    "cate_recent": CATE.name,
}
# Whole-history features, looked up only by GSUs that need trainable embeddings of every behavior.
HISTORY_FEATURES: Dict[str, str] = {"item_hist": ITEM.name, "cate_hist": CATE.name}

# Side features (one id per sample, each its own table): feature name -> table name.
USER_FEATURES: Dict[str, str] = {USER.name: USER.name, **{t.name: t.name for t in PROFILE}}
TARGET_SIDE_FEATURES: Dict[str, str] = {CITY.name: CITY.name, PROVINCE.name: PROVINCE.name}
SIDE_FEATURES: Dict[str, str] = {**USER_FEATURES, **TARGET_SIDE_FEATURES}

# Every feature in the embedding collection's order: each table's features (tables in ``TABLES``
# order, a table's features in the order above), so the side features come last.
_LOOKUP_ORDER: Dict[str, int] = {
    feature: rank for rank, feature in enumerate(
        f for table in TABLES for f, t in {**SEQUENCE_FEATURES, **HISTORY_FEATURES, **SIDE_FEATURES}.items()
        if t == table.name
    )
}


def lookup_order(features: Iterable[str]) -> List[str]:
    """``features`` in the embedding collection's order (``model.embeddings.build_collection``).

    Why: TorchRec permutes a KJT whose keys come in another order than its sharding's before every
    input distribution; batches built in this order need no permute (one rank, or every table
    sharded one way, as the GPU configs do). Raises KeyError for a feature no table serves.
    """
    return sorted(features, key=_LOOKUP_ORDER.__getitem__)
