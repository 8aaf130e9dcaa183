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

With several ranks and row-wise tables the distributions are real. ``RoutedLookup`` runs the second
half, the rows' all-to-all, itself: the first half, each id sent to the rank holding its row, was
done by the data path ahead of the step (``data.routing.RowWiseRouter``), so the training thread
neither bucketises nor reads anything back. Its backward sends the gradients back, divided by the
world size as TorchRec's is. Batches without a routing (evaluation) go through TorchRec's forward.
Where the data path laid the rows' all-to-all out in fixed shapes (``Routing.fixed``), the step can
replay it inside its CUDA graph instead: ``RoutedLookup.read_rows`` gives the rows this rank looked
up, ``RoutedLookup.exchanged`` sends them in the graph (``MuseTrain``'s exchanged graphs).

``train.sparse_lookup`` chooses: "direct" (the default) uses ``DirectLookup`` where it applies (one
rank, the plain step, one table-wise lookup); "routed" also ``RoutedLookup`` (2+ ranks, the plain
step, every table row-wise, one lookup; the training batches routed by the data path);
"distributed" always runs TorchRec's forward.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as nnf
from torchrec.distributed.embedding import ShardedEmbeddingCollection
from torchrec.distributed.types import ShardingType
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from muse_torchrec.config import ConfigError
from muse_torchrec.data.routing import PEER_SLACK, Routing, RowWiseRouter, check_slack, in_order
from muse_torchrec.model.muse import SparseArch

SPARSE_LOOKUPS = ("direct", "routed", "distributed")


def _check_known(name: str) -> None:
    if name not in SPARSE_LOOKUPS:
        raise ConfigError(f"train.sparse_lookup: unknown {name!r}; choose one of {list(SPARSE_LOOKUPS)}")


def check_sparse_lookup(name: str, gsu_placement: str, exchange_slack: float = PEER_SLACK) -> None:
    """ConfigError unless ``name`` is a ``train.sparse_lookup`` the data path (``data.gsu_placement``)
    can serve (checked before a run builds anything): "routed" needs the data path's thread ahead
    of the step, which "device" runs; and unless ``train.exchange_slack`` leaves the first batch room."""
    _check_known(name)
    if name == "routed" and gsu_placement != "device":
        raise ConfigError(f"train.sparse_lookup: 'routed' routes the ids in the data path's thread ahead of the "
                          f"step, which data.gsu_placement 'device' runs, not {gsu_placement!r}")
    try:
        check_slack(exchange_slack)
    except ValueError as error:
        raise ConfigError(f"train.exchange_slack: {error}") from None


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

    def looked_up(self, features: KeyedJaggedTensor, routing: Optional[Routing] = None
                  ) -> Tuple[KeyedJaggedTensor, torch.Tensor, Optional[torch.Tensor]]:
        """KJT of B samples (every key the same B) -> (the KJT with its keys in the lookup's order, the
        embeddings of its N values [M, D] in the order the lookup gives them (M < N where the routing
        sent repeated ids once), the row of each value among them [N] int64, None where they are the
        values' own). ``routing``: the batch's (``RoutedLookup`` only)."""
        if features.variable_stride_per_key():
            raise ValueError(f"{type(self).__name__}: features with a batch size per key are not supported")
        features = in_order(features, self.feature_names)
        return (features, *self._embeddings(features, routing))

    def flat(self, features: KeyedJaggedTensor,
             routing: Optional[Routing] = None) -> Tuple[KeyedJaggedTensor, torch.Tensor]:
        """``looked_up`` with the embeddings in the order of the values [N, D]."""
        features, rows, order = self.looked_up(features, routing)
        return features, rows if order is None else rows.index_select(0, order)

    def _embeddings(self, features: KeyedJaggedTensor,
                    routing: Optional[Routing]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if routing is not None:
            raise ValueError("DirectLookup: a batch routed over several ranks, but the tables are on this rank alone")
        return self.lookup(features).view(-1, self.dim), None

    def __call__(self, features: KeyedJaggedTensor, routing: Optional[Routing] = None) -> Dict[str, JaggedTensor]:
        """KJT of B samples (every key the same B) -> per feature a JaggedTensor of [n_f, D] embeddings
        with that feature's lengths [B]."""
        features, embeddings = self.flat(features, routing)
        values = embeddings.split(features.length_per_key())
        lengths = features.lengths().view(len(self.feature_names), -1)
        return {name: JaggedTensor(values=v, lengths=l) for name, v, l in zip(self.feature_names, values, lengths)}


def _scattered(rows: torch.Tensor, places: torch.Tensor, count: int) -> torch.Tensor:
    """[count, D] with ``rows[i]`` [N, D] at row ``places[i]`` [N] int64 (a place taken twice gets
    either row), zeros elsewhere. The scatter rather than the gather by the inverse places: it runs
    a thread an element where a gather runs a block a row (on an H100, 210 k rows of 16 floats: 17
    against 130 us; 315 k: 74 against 193)."""
    return rows.new_zeros((count, rows.shape[1])).index_put_((places,), rows)


class _RowsAllToAll(torch.autograd.Function):
    """Rows [N, D] in the order they were looked up, ``as_sent`` [N] the row to send at each place
    (``send[r]`` of them to rank r, rank after rank) and its inverse ``as_looked_up`` [N] (each
    row's place) -> the rows received, ``recv[r]`` from rank r [sum(recv), D]. Backward: the
    gradients sent back, each to the place its row was looked up, and divided by the world size
    (TorchRec's row-wise output distribution divides them so)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, as_sent: torch.Tensor, as_looked_up: torch.Tensor, send: List[int],
                recv: List[int], group: dist.ProcessGroup) -> torch.Tensor:
        # The world size kept as a number (one entry of ``send`` per rank): no query of the group in
        # every backward (~0.2 ms a step under cProfile on one H100 host, benchmarks/RESULTS.md row 91).
        ctx.send, ctx.recv, ctx.group, ctx.world_size = send, recv, group, len(send)
        ctx.save_for_backward(as_sent)
        out = rows.new_empty((sum(recv), rows.shape[1]))
        dist.all_to_all_single(out, _scattered(rows, as_looked_up, rows.shape[0]), output_split_sizes=recv,
                               input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None, None, None, None]:
        (as_sent,) = ctx.saved_tensors
        sent = grad.new_empty((sum(ctx.send), grad.shape[1]))
        dist.all_to_all_single(sent, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv,
                               group=ctx.group)
        return _scattered(sent, as_sent, sent.shape[0]).div_(ctx.world_size), None, None, None, None, None


class _FixedAllToAll(torch.autograd.Function):
    """The rows this rank looked up, then zero rows [W * C + 1, D], with ``Routing.fixed``'s
    ``row_slots`` [W * C + 1] and ``send_slots`` [W * C] -> the rows received, C from each rank,
    then a zero row [W * C + 1, D]. Backward: the gradients sent back, divided by the world size
    (as ``_RowsAllToAll``'s). Fixed shapes, no host value: a CUDA graph can hold it, forward and
    backward."""

    @staticmethod
    def forward(ctx, read_rows: torch.Tensor, row_slots: torch.Tensor, send_slots: torch.Tensor,
                group: dist.ProcessGroup, world_size: int) -> torch.Tensor:
        ctx.group, ctx.world_size = group, world_size
        ctx.save_for_backward(send_slots)
        slots = send_slots.shape[0]
        # The zero rows go to the slot past those sent; the padding sent is zeros.
        sent = _scattered(read_rows, row_slots, slots + 1)
        out = torch.empty_like(sent)
        out[slots].zero_()
        dist.all_to_all_single(out[:slots], sent[:slots], group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None, None, None]:
        (send_slots,) = ctx.saved_tensors
        slots = send_slots.shape[0]
        back = grad.new_empty((slots, grad.shape[1]))
        dist.all_to_all_single(back, grad[:slots].contiguous(), group=ctx.group)
        # The padding's gradients (zeros: no id reads the padding received) land on the last zero row.
        return _scattered(back, send_slots, slots + 1).div_(ctx.world_size), None, None, None, None


class RoutedLookup(DirectLookup):
    """``DirectLookup`` over row-wise tables on W ranks, for batches routed by the data path.

    Args (besides ``DirectLookup``'s): collection: the sharded collection, whose own forward serves
    batches without a routing; group: the collection's process group (the rows' all-to-all).
    """

    def __init__(self, lookup: nn.Module, feature_names: List[str], dim: int, collection: nn.Module,
                 group: dist.ProcessGroup) -> None:
        super().__init__(lookup, feature_names, dim)
        self.collection, self.group = collection, group
        self.world_size = dist.get_world_size(group)

    def __call__(self, features: KeyedJaggedTensor, routing: Optional[Routing] = None) -> Dict[str, JaggedTensor]:
        # Unrouted (evaluation): the collection's own per-feature output, not concatenated and split again.
        return self.collection(features).wait() if routing is None else super().__call__(features, routing)

    def read_rows(self, features: KeyedJaggedTensor, routing: Routing) -> Tuple[KeyedJaggedTensor, torch.Tensor]:
        """For a batch whose routing has a fixed exchange (``Routing.fixed``, W ranks, C rows each):
        (the KJT with its keys in the lookup's order, the rows this rank looks up for every rank,
        then zero rows [W * C + 1, D]), for ``exchanged``."""
        if routing.fixed is None:
            raise ValueError("RoutedLookup.read_rows: the batch's routing has no fixed exchange")
        rows = self._looked_up_for_ranks(features, routing)
        slots = routing.fixed.send_slots.shape[0]
        return in_order(features, self.feature_names), nnf.pad(rows, (0, 0, 0, slots + 1 - rows.shape[0]))

    def exchanged(self, read_rows: torch.Tensor, row_slots: torch.Tensor, send_slots: torch.Tensor) -> torch.Tensor:
        """``read_rows`` [W * C + 1, D] and ``Routing.fixed``'s ``row_slots`` [W * C + 1] and
        ``send_slots`` [W * C] -> the rows of the batch's ids, C from each rank, then a zero row
        [W * C + 1, D] (in the order ``Routing.fixed.order`` reads). Fixed shapes, no host value:
        capturable in a CUDA graph."""
        return _FixedAllToAll.apply(read_rows, row_slots, send_slots, self.group, self.world_size)

    def _looked_up_for_ranks(self, features: KeyedJaggedTensor, routing: Routing) -> torch.Tensor:
        """The rows this rank looks up for every rank [n_read, D] (feature, source rank, sample)."""
        if routing.batch_size != features.stride():
            raise ValueError(f"a routing of {routing.batch_size} samples for a batch of {features.stride()}")
        return self.lookup(routing.read).view(-1, self.dim)

    def _embeddings(self, features: KeyedJaggedTensor,
                    routing: Optional[Routing]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if routing is None:
            embedded = self.collection(features).wait()
            return torch.cat([embedded[name].values() for name in self.feature_names]), None
        rows = self._looked_up_for_ranks(features, routing)
        # Sent (source rank, feature, sample), received (holding rank, feature, sample).
        mine = _RowsAllToAll.apply(rows, routing.as_received, routing.as_read, routing.received, routing.sent,
                                   self.group)
        # In the holding ranks' order: ``flat`` restores the batch's, the tower's graphs gather by it.
        return mine, routing.restore


def _row_wise_blocks(tables: List[nn.Module], world_size: int) -> Optional[List[int]]:
    """Rows per rank of each sharded table when rank r holds rows [r * block, (r + 1) * block) of
    every table (TorchRec's row-wise blocks of ceil(rows / W)), else None. From the tables' global
    metadata, so every rank decides alike."""
    blocks = [-(-table.num_embeddings // world_size) for table in tables]
    for table, block in zip(tables, blocks):
        offsets = sorted(shard.shard_offsets[0] for shard in table.global_metadata.shards_metadata)
        if offsets != [r * block for r in range(len(offsets))]:
            return None
    return blocks


def direct_lookup_of(collection: nn.Module, routed: bool = False, ids_per_sample: Optional[int] = None,
                     slack: float = PEER_SLACK, unique_ids: bool = False
                     ) -> Tuple[Optional[DirectLookup], Optional[RowWiseRouter], str]:
    """A ``DirectLookup`` for a sharded collection where its distributions are identities, with
    ``routed`` a ``RoutedLookup`` and the ``RowWiseRouter`` its batches need where every table is
    row-wise over 2+ ranks; else None; with the reason either way (for the run's log). Collective
    when it makes a router (a gloo group of its own): every rank must call it. ``ids_per_sample``,
    ``slack``, ``unique_ids``: the router's (with ``ids_per_sample`` it lays out fixed exchanges)."""
    if not isinstance(collection, ShardedEmbeddingCollection):
        return None, None, f"the collection is a {type(collection).__name__}, not a ShardedEmbeddingCollection"
    world_size = collection._env.world_size
    sharding_types = list(collection._sharding_type_to_sharding)
    one_rank = world_size == 1 and sharding_types == [ShardingType.TABLE_WISE.value]
    row_wise = routed and sharding_types == [ShardingType.ROW_WISE.value]
    if not (one_rank or row_wise) or len(collection._lookups) != 1:
        return None, None, f"{world_size} ranks, sharding types {sharding_types}"
    if collection._use_index_dedup or collection._need_indices:
        return None, None, "the collection deduplicates indices or returns them"
    lookup = collection._lookups[0]
    pairs = [(name, table) for config in lookup.grouped_configs for table in config.embedding_tables
             for name in table.feature_names]
    dims = {table.embedding_dim for _, table in pairs}
    if len(dims) != 1:
        return None, None, f"tables of several widths {sorted(dims)}"
    names, tables, dim = [name for name, _ in pairs], [table for _, table in pairs], dims.pop()
    if one_rank:
        return DirectLookup(lookup, names, dim), None, "one rank, table-wise: the lookup called directly"
    blocks = _row_wise_blocks(tables, world_size)
    if blocks is None:
        return None, None, "row-wise shards of uneven blocks"
    group = collection._env.process_group
    router = RowWiseRouter(names, blocks, dist.new_group(ranks=dist.get_process_group_ranks(group), backend="gloo"),
                           ids_per_sample, slack, unique_ids)
    return (RoutedLookup(lookup, names, dim, collection, group), router,
            f"{world_size} ranks, row-wise: the ids routed by the data path, the rows' all-to-all ours")


def use_direct_lookup(model: nn.Module, setting: str, pipeline: str,
                      exchange_slack: Optional[float] = None, unique_ids: bool = False
                      ) -> Tuple[str, Optional[RowWiseRouter]]:
    """Give every ``SparseArch`` of the DMP-sharded ``model`` a ``DirectLookup`` (or ``RoutedLookup``)
    where ``setting`` (``train.sparse_lookup``) and the stepper (``train.pipeline``) allow it and it
    applies; returns how the lookups run (for the run's log) and the router the training batches
    need (None: no routing). ``exchange_slack``: the router also lays the rows' all-to-all out in
    fixed shapes for the step's CUDA graphs (``train.exchange_in_graphs`` with "graphs"), with this
    room (``train.exchange_slack``); None: it does not. ``unique_ids``: the router sends each id once
    per feature (``train.route_unique_ids``).

    TorchRec's pipeline (``sparse_dist``) keeps the collection's forward: it traces the model to find
    the sharded modules it runs the input distribution of ahead. Routing needs one ``SparseArch``
    (a batch carries one routing).
    """
    _check_known(setting)
    if setting == "distributed":
        return "TorchRec's forward (train.sparse_lookup: distributed)", None
    if pipeline != "plain":
        return f"TorchRec's forward (train.pipeline {pipeline!r} runs its input distribution ahead)", None
    archs = [m for m in model.modules() if isinstance(m, SparseArch)]
    routed = setting == "routed" and len(archs) == 1
    reasons, router = [], None
    slack = PEER_SLACK if exchange_slack is None else exchange_slack
    for arch in archs:
        ids_per_sample = None if exchange_slack is None else arch.row_layout.capacity(1)
        arch.lookup, arch_router, reason = direct_lookup_of(arch.tables, routed, ids_per_sample, slack, unique_ids)
        router = router or arch_router
        reasons.append(reason if arch.lookup is not None else f"TorchRec's forward ({reason})")
    return "; ".join(reasons), router
