"""MUSE's embedding tables: one TorchRec EmbeddingCollection, built on the ``meta`` device for the planner.

Every table sits in one (unpooled) EmbeddingCollection:

- the shared item and category tables: the target, the GSU's top-K and the recent-50 behaviors (and,
  for GSUs that score the whole history, every behavior) read the same rows;
- the user and target side tables (one id per sample; what an EmbeddingBagCollection would sum-pool,
  a sequence of at most one id gives as is).

Why one collection: each sharded module costs every training step its own input distribution,
lookup, output distribution and fused backward call, and the step is host-bound (a second module
for the side features cost 13 % of the samples/s on one GPU and 36 % on two, benchmarks/RESULTS.md
row 23). An EmbeddingCollection stores all its tables at one width: the item width. A side table
configured narrower (the reference uses D/2 for three profile tables) is read through its first
``dim`` columns; the others are never read, so never trained, and the model is the narrower one.

Row 0 of every table is padding/unknown. The batch builder drops id 0 from every feature, so row 0
is never read nor trained: an unknown target or side feature gives a zero embedding, like padding.
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping

import torch
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection

from muse_torchrec import features as F
from muse_torchrec.config import EmbeddingConfig as EmbeddingDims


def table_dim(dims: EmbeddingDims, table: str) -> int:
    return int(dims.dims.get(table, dims.default_dim))


def sequence_dim(dims: EmbeddingDims) -> int:
    """The width D of the item and category tables, which is the collection's width."""
    item, cate = table_dim(dims, F.ITEM.name), table_dim(dims, F.CATE.name)
    if item != cate:
        raise ValueError(
            f"model.embeddings.dims: item ({item}) and cate ({cate}) must be equal: "
            "the model concatenates them per behavior and the embedding collection has one width"
        )
    return item


def side_dims(dims: EmbeddingDims) -> Dict[str, int]:
    """Side feature name -> the width the model reads (in ``features.SIDE_FEATURES`` order).

    Raises ValueError for a width above the item width: the collection stores every table at the
    item width, and widening the 243 M-row item table for a side table would multiply its memory.
    """
    width = sequence_dim(dims)
    out = {feature: table_dim(dims, table) for feature, table in F.SIDE_FEATURES.items()}
    wider = {f: d for f, d in out.items() if d > width}
    if wider:
        raise ValueError(f"model.embeddings.dims: side tables {wider} are wider than the item table ({width}); "
                         "every table is stored at the item width, so side widths must be <= it")
    return out


def build_collection(
    vocab_sizes: Mapping[str, int],
    dims: EmbeddingDims,
    sequence_features: Iterable[str],
    device: torch.device = torch.device("meta"),
) -> EmbeddingCollection:
    """The model's EmbeddingCollection: item, category and side tables, all at the item width.

    Args:
        vocab_sizes: table name -> number of rows (row 0 included).
        dims: embedding dimensions from the config (checked by ``side_dims``).
        sequence_features: the item/category sequence features this model reads (keys of
            ``features.SEQUENCE_FEATURES`` or ``features.HISTORY_FEATURES``); every side feature is read.
    """
    wanted = set(sequence_features)
    feature_map = {
        f: t for f, t in {**F.SEQUENCE_FEATURES, **F.HISTORY_FEATURES}.items() if f in wanted
    }
    feature_map.update(F.SIDE_FEATURES)
    width = sequence_dim(dims)
    side_dims(dims)  # refuses side widths above the collection's
    ordered = F.lookup_order(feature_map)
    tables = [
        EmbeddingConfig(
            name=table,
            num_embeddings=int(vocab_sizes[table]),
            embedding_dim=width,
            feature_names=[f for f in ordered if feature_map[f] == table],
        )
        for table in (F.ITEM.name, F.CATE.name, *F.SIDE_FEATURES.values())
    ]
    return EmbeddingCollection(tables=tables, device=device)
