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

With several ranks and row-wise tables the distributions are real. ``RowWiseLookup`` runs them
with less host work than TorchRec's: one bucketisation, one read-back of the counts, the ids' and
the embeddings' all-to-alls, one autograd function (backward: the gradients' all-to-all, divided by
the world size as TorchRec divides them). Not yet measured on 2+ GPUs, so it is opt-in.

``train.sparse_lookup`` chooses: "direct" (the default) uses ``DirectLookup`` where it applies (one
rank, the plain step, one table-wise lookup), "direct_row_wise" also ``RowWiseLookup`` (the plain
step, every table row-wise, one lookup), "distributed" always runs TorchRec's forward.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding import ShardedEmbeddingCollection
from torchrec.distributed.types import ShardingType
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from muse_torchrec.config import ConfigError
from muse_torchrec.model.muse import SparseArch

SPARSE_LOOKUPS = ("direct", "direct_row_wise", "distributed")


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

    def __call__(self, features: KeyedJaggedTensor) -> Dict[str, JaggedTensor]:
        """KJT of B samples (every key the same B) -> per feature a JaggedTensor of [n_f, D] embeddings
        with that feature's lengths [B]."""
        if features.variable_stride_per_key():
            raise ValueError(f"{type(self).__name__}: features with a batch size per key are not supported")
        features = self._in_lookup_order(features)
        embeddings = self._embeddings(features)  # [sum of n_f, D]
        values = embeddings.split(features.length_per_key())
        lengths = features.lengths().view(len(self.feature_names), -1)
        return {name: JaggedTensor(values=v, lengths=l) for name, v, l in zip(self.feature_names, values, lengths)}

    def _embeddings(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """The embeddings of ``features.values()`` in order: [n, D]."""
        return self.lookup(features).view(-1, self.dim)


class _RowsAllToAll(torch.autograd.Function):
    """Rows of [N, D] to every rank (``send[r]`` rows to rank r) -> the rows received [sum(recv), D];
    backward sends the gradients back, divided by the world size (TorchRec's gradient division)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, send: List[int], recv: List[int], group: dist.ProcessGroup) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = rows.new_empty((sum(recv), rows.shape[1]))
        dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[torch.Tensor, None, None, None]:
        out = grad.new_empty((sum(ctx.send), grad.shape[1]))
        dist.all_to_all_single(out, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv,
                               group=ctx.group)
        return out.div_(dist.get_world_size(ctx.group)), None, None, None


class RowWiseLookup(DirectLookup):
    """``DirectLookup`` over row-wise tables on W ranks: each id goes to the rank holding its row.

    Args (besides ``DirectLookup``'s): block_sizes: rows per rank of each feature's table [F] (rank r
    holds rows [r * size, (r + 1) * size)); group: the ranks' process group.
    """

    def __init__(self, lookup: nn.Module, feature_names: List[str], dim: int, block_sizes: List[int],
                 group: dist.ProcessGroup) -> None:
        super().__init__(lookup, feature_names, dim)
        self.group, self.world_size = group, dist.get_world_size(group)
        self.block_sizes = torch.tensor(block_sizes)
        features, ranks = len(feature_names), self.world_size
        # Received rows are (source rank, feature); the lookup reads them feature-major.
        self.feature_major = torch.tensor([r * features + f for f in range(features) for r in range(ranks)],
                                          dtype=torch.int32)

    def _embeddings(self, features: KeyedJaggedTensor) -> torch.Tensor:
        ranks, count, batch = self.world_size, len(self.feature_names), features.stride()
        device = features.values().device
        if self.block_sizes.device != device or self.block_sizes.dtype != features.values().dtype:
            self.block_sizes = self.block_sizes.to(features.values())  # once, not a copy a step
            self.feature_major = self.feature_major.to(device)
        # lengths [W * F * B] and ids (destination rank, feature, sample), ids local to their rank's rows
        lengths, ids, _, _, unbucketize = torch.ops.fbgemm.block_bucketize_sparse_features(
            features.lengths(), features.values(), bucketize_pos=False, sequence=True,
            block_sizes=self.block_sizes, my_size=ranks, weights=None)
        send_counts = lengths.view(ranks, -1).sum(1)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        recv_lengths = torch.empty_like(lengths)
        dist.all_to_all_single(recv_lengths, lengths, group=self.group)
        counts = torch.cat([send_counts, recv_counts]).tolist()  # the step's one read-back
        send, recv = counts[:ranks], counts[ranks:]
        recv_ids = ids.new_empty(sum(recv))
        dist.all_to_all_single(recv_ids, ids, output_split_sizes=recv, input_split_sizes=send, group=self.group)
        # (source, feature, sample) -> (feature, source, sample): ``order`` holds each read row's position
        positions = torch.arange(recv_ids.numel(), device=device)
        read_lengths, order, _ = torch.ops.fbgemm.permute_2D_sparse_data(
            self.feature_major, recv_lengths.view(ranks * count, batch), positions)
        read = KeyedJaggedTensor(keys=self.feature_names, values=recv_ids.index_select(0, order),
                                 lengths=read_lengths.view(-1), stride=ranks * batch)
        rows = self.lookup(read).view(-1, self.dim)
        as_received = rows.index_select(0, torch.empty_like(order).scatter_(0, order, positions))
        mine = _RowsAllToAll.apply(as_received, recv, send, self.group)  # (destination rank, feature, sample)
        return mine.index_select(0, unbucketize)


def direct_lookup_of(collection: nn.Module, row_wise: bool = False) -> Tuple[Optional[DirectLookup], str]:
    """A ``DirectLookup`` for a sharded collection where its distributions are identities, with
    ``row_wise`` a ``RowWiseLookup`` where every table is row-wise; else None; with the reason either
    way (for the run's log)."""
    if not isinstance(collection, ShardedEmbeddingCollection):
        return None, f"the collection is a {type(collection).__name__}, not a ShardedEmbeddingCollection"
    world_size = collection._env.world_size
    sharding_types = list(collection._sharding_type_to_sharding)
    one_rank = world_size == 1 and sharding_types == [ShardingType.TABLE_WISE.value]
    rows = row_wise and sharding_types == [ShardingType.ROW_WISE.value]
    if not (one_rank or rows) or len(collection._lookups) != 1:
        return None, f"{world_size} ranks, sharding types {sharding_types}"
    if collection._use_index_dedup or collection._need_indices:
        return None, "the collection deduplicates indices or returns them"
    lookup = collection._lookups[0]
    tables = [(name, table) for config in lookup.grouped_configs for table in config.embedding_tables
              for name in table.feature_names]
    dims = {table.embedding_dim for _, table in tables}
    if len(dims) != 1:
        return None, f"tables of several widths {sorted(dims)}"
    names, dim = [name for name, _ in tables], dims.pop()
    if one_rank:
        return DirectLookup(lookup, names, dim), "one rank, table-wise: the lookup called directly"
    # TorchRec's row-wise blocks: ceil(rows / W) rows per rank, rank r's from r * block.
    block_sizes = [-(-table.num_embeddings // world_size) for _, table in tables]
    rank = collection._env.rank
    if any(table.local_metadata.shard_offsets[0] != rank * size for (_, table), size in zip(tables, block_sizes)):
        return None, "row-wise shards of uneven blocks"
    return (RowWiseLookup(lookup, names, dim, block_sizes, collection._env.process_group),
            f"{world_size} ranks, row-wise: our own distribution over the lookup")


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
        arch.lookup, reason = direct_lookup_of(arch.tables, row_wise=setting == "direct_row_wise")
        reasons.append(reason if arch.lookup is not None else f"TorchRec's forward ({reason})")
    return "; ".join(reasons)
