"""TorchRec embedding collections of MUSE, built on the ``meta`` device for the sharding planner.

- One EmbeddingCollection (sequence, unpooled) holds the shared item and category tables: the
  target, the GSU's top-K and the recent-50 behaviors (and, for GSUs that score the whole history,
  every behavior) read the same rows. TorchRec requires one embedding dimension for all its tables.
- One EmbeddingBagCollection (pooled, one id per sample) holds the user and target side features.

Row 0 of every table is padding/unknown. The batch builder drops id 0 from every feature, so row 0
is never read nor trained: an unknown target gives a zero embedding, like padding.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from muse_torchrec import features as F
from muse_torchrec.config import EmbeddingConfig as EmbeddingDims


def table_dim(dims: EmbeddingDims, table: str) -> int:
    return int(dims.dims.get(table, dims.default_dim))


def sequence_dim(dims: EmbeddingDims) -> int:
    """The one dimension of the item and category tables (an EmbeddingCollection constraint)."""
    item, cate = table_dim(dims, F.ITEM.name), table_dim(dims, F.CATE.name)
    if item != cate:
        raise ValueError(
            f"model.embeddings.dims: item ({item}) and cate ({cate}) must be equal: "
            "TorchRec's EmbeddingCollection needs one dimension for all its tables"
        )
    return item


def _features_of(table: str, feature_map: Mapping[str, str]) -> List[str]:
    return [feature for feature, t in feature_map.items() if t == table]


def build_sequence_collection(
    vocab_sizes: Mapping[str, int],
    dims: EmbeddingDims,
    sequence_features: Iterable[str],
    device: torch.device = torch.device("meta"),
) -> EmbeddingCollection:
    """EmbeddingCollection of the shared item and category tables.

    Args:
        vocab_sizes: table name -> number of rows (row 0 included).
        dims: embedding dimensions from the config.
        sequence_features: the sequence features this model reads (keys of ``features.SEQUENCE_FEATURES``
            or ``features.HISTORY_FEATURES``).
    """
    wanted = set(sequence_features)
    feature_map = {
        f: t for f, t in {**F.SEQUENCE_FEATURES, **F.HISTORY_FEATURES}.items() if f in wanted
    }
    dim = sequence_dim(dims)
    tables = [
        EmbeddingConfig(
            name=table,
            num_embeddings=int(vocab_sizes[table]),
            embedding_dim=dim,
            feature_names=_features_of(table, feature_map),
        )
        for table in (F.ITEM.name, F.CATE.name)
    ]
    return EmbeddingCollection(tables=tables, device=device)


def build_pooled_collection(
    vocab_sizes: Mapping[str, int],
    dims: EmbeddingDims,
    device: torch.device = torch.device("meta"),
) -> EmbeddingBagCollection:
    """EmbeddingBagCollection of the user and target side features (one id per sample, sum-pooled)."""
    tables = [
        EmbeddingBagConfig(
            name=table,
            num_embeddings=int(vocab_sizes[table]),
            embedding_dim=table_dim(dims, table),
            feature_names=[feature],
            pooling=PoolingType.SUM,
        )
        for feature, table in F.POOLED_FEATURES.items()
    ]
    return EmbeddingBagCollection(tables=tables, device=device)


def pooled_dims(dims: EmbeddingDims) -> Dict[str, int]:
    """Pooled feature name -> its embedding width (in ``POOLED_FEATURES`` order)."""
    return {feature: table_dim(dims, table) for feature, table in F.POOLED_FEATURES.items()}
