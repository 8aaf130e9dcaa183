"""On one rank, the sharded embedding collection's lookup without its input and output distributions.

A ``ShardedEmbeddingCollection`` steps every batch through an input distribution (the features'
all-to-alls: splits, lengths, values), the lookup (fbgemm's table-batched kernels, the sparse
optimizer fused into their backward) and an output distribution (the embeddings' all-to-all, then
one ``JaggedTensor`` per feature). With one rank both distributions are identities, but they still
cost every step their collectives, read-backs and Python, forward and backward, on a step bound by
host time. ``DirectLookup`` calls the same lookup module, which holds the same tables and fused
optimizer as TorchRec's forward would use, and splits its output per feature itself. So
checkpoints, the plan and the optimizer state are TorchRec's, unchanged; only the identities are
skipped. tests/test_direct_lookup.py checks it against TorchRec's forward, lookup by lookup and
step by step.

``train.sparse_lookup`` chooses: "direct" (the default) uses it where it applies (one rank, the
plain step, one table-wise lookup), "distributed" always runs TorchRec's forward.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.distributed.embedding import ShardedEmbeddingCollection
from torchrec.distributed.types import ShardingType
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from muse_torchrec.config import ConfigError
from muse_torchrec.model.muse import SparseArch

SPARSE_LOOKUPS = ("direct", "distributed")


def check_sparse_lookup(name: str) -> None:
    """ConfigError unless ``name`` is a ``train.sparse_lookup`` (checked before a run builds anything)."""
    if name not in SPARSE_LOOKUPS:
        raise ConfigError(f"train.sparse_lookup: unknown {name!r}; choose one of {list(SPARSE_LOOKUPS)}")


class DirectLookup:
    """``features -> {feature: JaggedTensor of its embeddings}`` through one sharded lookup module.

    Args:
        lookup: the collection's table-wise lookup on this rank (``GroupedEmbeddingsLookup``):
            ``lookup(kjt)`` gives the embeddings of ``kjt.values()`` in order, flattened.
        feature_names: the features the lookup reads, in the order it reads them.
        dim: the width D of every table.
    """

    def __init__(self, lookup: nn.Module, feature_names: List[str], dim: int) -> None:
        self.lookup, self.feature_names, self.dim = lookup, list(feature_names), dim

    def _in_lookup_order(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """``features`` with its keys in the lookup's order (batches are built so: then as given)."""
        keys = features.keys()
        if keys == self.feature_names:
            return features
        if sorted(keys) != sorted(self.feature_names):
            raise ValueError(f"sparse features {keys} are not the embedding collection's features "
                             f"{self.feature_names}")
        return features.permute([keys.index(name) for name in self.feature_names])

    def flat(self, features: KeyedJaggedTensor) -> Tuple[KeyedJaggedTensor, torch.Tensor]:
        """KJT of B samples (every key the same B) -> (the KJT with its keys in the lookup's order, the
        embeddings of its values in order [N, D])."""
        if features.variable_stride_per_key():
            raise ValueError("DirectLookup: features with a batch size per key are not supported")
        features = self._in_lookup_order(features)
        return features, self.lookup(features).view(-1, self.dim)

    def __call__(self, features: KeyedJaggedTensor) -> Dict[str, JaggedTensor]:
        """KJT of B samples (every key the same B) -> per feature a JaggedTensor of [n_f, D] embeddings
        with that feature's lengths [B]."""
        features, embeddings = self.flat(features)
        values = embeddings.split(features.length_per_key())
        lengths = features.lengths().view(len(self.feature_names), -1)
        return {name: JaggedTensor(values=v, lengths=l) for name, v, l in zip(self.feature_names, values, lengths)}


def direct_lookup_of(collection: nn.Module) -> Tuple[Optional[DirectLookup], str]:
    """A ``DirectLookup`` for a sharded collection where its distributions are identities, else None;
    with the reason either way (for the run's log)."""
    if not isinstance(collection, ShardedEmbeddingCollection):
        return None, f"the collection is a {type(collection).__name__}, not a ShardedEmbeddingCollection"
    world_size = collection._env.world_size
    sharding_types = list(collection._sharding_type_to_sharding)
    if world_size != 1 or sharding_types != [ShardingType.TABLE_WISE.value] or len(collection._lookups) != 1:
        return None, f"{world_size} ranks, sharding types {sharding_types}"
    if collection._use_index_dedup or collection._need_indices:
        return None, "the collection deduplicates indices or returns them"
    lookup = collection._lookups[0]
    configs = lookup.grouped_configs
    dims = {table.embedding_dim for config in configs for table in config.embedding_tables}
    if len(dims) != 1:
        return None, f"tables of several widths {sorted(dims)}"
    names = [name for config in configs for name in config.feature_names()]
    return DirectLookup(lookup, names, dims.pop()), "one rank, table-wise: the lookup called directly"


def use_direct_lookup(model: nn.Module, setting: str, pipeline: str) -> str:
    """Give every ``SparseArch`` of the DMP-sharded ``model`` a ``DirectLookup`` where ``setting``
    (``train.sparse_lookup``) and the stepper (``train.pipeline``) allow it and it applies; returns
    how the lookups run, for the run's log.

    TorchRec's pipeline (``sparse_dist``) keeps the collection's forward: it traces the model to find
    the sharded modules it runs the input distribution of ahead.
    """
    check_sparse_lookup(setting)
    if setting == "distributed":
        return "TorchRec's forward (train.sparse_lookup: distributed)"
    if pipeline != "plain":
        return f"TorchRec's forward (train.pipeline {pipeline!r} runs its input distribution ahead)"
    reasons = []
    for arch in (m for m in model.modules() if isinstance(m, SparseArch)):
        arch.lookup, reason = direct_lookup_of(arch.tables)
        reasons.append(reason if arch.lookup is not None else f"TorchRec's forward ({reason})")
    return "; ".join(reasons)
