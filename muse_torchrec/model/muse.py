"""The MUSE model (MUSE_SPEC section 6) and its training wrapper, in the layout of torchrec's DLRM.

- ``SparseArch``: the sharded embedding collection -> padded sequence tensors + side features.
- ``MuseModel``: optional model-side GSU (injected, ``trainable_gsu``) -> ``DenseTower``: ESU blocks
  (injected) + target and user features -> MLP (Dice) -> one click logit.
- ``MuseTrain``: owns the binary cross-entropy loss; returns ``(loss, (loss, logits, labels))``.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch
import torch.nn.functional as nnf
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from muse_torchrec import features as F
from muse_torchrec.data.batch import Batch
from muse_torchrec.data.routing import Routing
from muse_torchrec.model.cuda_graphs import GraphedFunction, GraphedLossStep
from muse_torchrec.model.esu import SequenceInputs
from muse_torchrec.model.mlp import MLP
from muse_torchrec.model.row_layout import RowLayout, padded_slots, row_starts


def single_id_columns(widths: Sequence[int], dim: int) -> Optional[torch.Tensor]:
    """The columns ``single_ids`` keeps of F features' ``dim``-wide embeddings side by side: feature f's
    first ``widths[f]``, as an index into the F * dim columns; None when every width is ``dim``."""
    if all(width == dim for width in widths):
        return None
    return torch.cat([f * dim + torch.arange(width) for f, width in enumerate(widths)])


def single_ids(features: Sequence[JaggedTensor], columns: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Embeddings of F features of at most one id per sample -> [B, C]: the features' D-wide embeddings
    side by side, zeros where a sample has no id (what a sum-pooled bag of 0/1 ids gives), of which
    ``columns`` are kept (``single_id_columns``; None: all, C = F * D).

    One padding, one transposing copy and one gather for all F features (their rows stacked
    feature-major). Why: the step is host-bound, and a slice per feature cost the backward one
    zero-filled tensor of the whole padding per feature (eight of ~0.07 ms each a step on an H100
    host, benchmarks/RESULTS.md row 51).
    """
    values = torch.cat([jt.values() for jt in features])
    lengths = torch.cat([jt.lengths() for jt in features])
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
    dense = torch.ops.fbgemm.jagged_to_padded_dense(values, [offsets], [1], 0.0)  # [F * B, 1, D]
    count, dim = len(features), dense.shape[-1]
    side_by_side = dense.view(count, -1, dim).transpose(0, 1).reshape(-1, count * dim)  # [B, F * D]
    return side_by_side if columns is None else side_by_side.index_select(1, columns)


class Lookup(Protocol):
    """The embedding lookups of a sharded collection without its distributions (train/direct_lookup.py)."""

    def __call__(self, features: KeyedJaggedTensor, routing: Optional[Routing] = None) -> Dict[str, JaggedTensor]:
        """Per feature a JaggedTensor of its embeddings [n_f, D] with its lengths [B]; ``routing``: the
        batch's, where the data path routed its ids over the ranks (data/routing.py)."""

    def looked_up(self, features: KeyedJaggedTensor, routing: Optional[Routing] = None
                  ) -> Tuple[KeyedJaggedTensor, torch.Tensor, Optional[torch.Tensor]]:
        """(``features`` in the order of the lookup, the embeddings of their N values [M, D] in the
        lookup's order (M < N where a routed lookup read repeated ids once), the row of each value [N]
        int64 or None where the rows are the values' own, in their order)."""


class SparseArch(nn.Module):
    """Embedding lookups of a batch.

    Args:
        tables: the EmbeddingCollection of every table (``embeddings.build_collection``; width D).
        sequence_dim: D, the width of the item and category tables.
        side_dims: side feature -> the width read from its table (<= D), in the order the tower reads them.
        sequence_features: the sequence features batches carry (decides which sequences are read;
            fixed at construction because TrainPipelineSparseDist traces ``forward`` with torch.fx).
        k, recent, max_history: padded lengths of top-K, recent and whole-history sequences.
    """

    def __init__(
        self,
        tables: EmbeddingCollection,
        sequence_dim: int,
        side_dims: Dict[str, int],
        sequence_features: Sequence[str],
        k: int,
        recent: int,
        max_history: int,
    ) -> None:
        super().__init__()
        self.tables = tables
        self.side_dims = dict(side_dims)
        self.item_dim = 2 * sequence_dim
        self.k = k
        self.recent = recent
        self.max_history = max_history
        self.reads_topk = "item_topk" in sequence_features
        self.reads_history = "item_hist" in sequence_features
        # The target's item and category and the side features: one id at most per sample each.
        self.single_features = ["item_target", "cate_target", *self.side_dims]
        columns = single_id_columns([sequence_dim, sequence_dim, *self.side_dims.values()], sequence_dim)
        # Not persistent: a constant of the config, moved to the device with the model, not checkpointed.
        self.register_buffer("single_columns", columns, persistent=False)
        # Set once the collection is sharded, where its distributions can be skipped
        # (train/direct_lookup.py); None: the collection's own forward.
        self.lookup: Optional[Lookup] = None
        # ``rows``' features: the collection's (``build_collection``), which batches carry in this order.
        # Slots per sample: the sequences' lengths, 1 for the single-id features.
        widths = {"target": 1, "recent": recent, "topk": k, "hist": max_history}
        slots = {f"{kind}_{part}": width for kind in ("item", "cate") for part, width in widths.items()}
        keys = F.lookup_order([*sequence_features, *self.side_dims])
        self.row_layout = RowLayout.of(keys, {key: slots.get(key, 1) for key in keys})

    @property
    def side_dim(self) -> int:
        return sum(self.side_dims.values())

    def _sequence(self, seq: Dict[str, JaggedTensor], name: str, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Item and category embeddings of a behavior sequence -> ([B, length, 2D], lengths [B]).

        A behavior's item and category are kept or dropped together, so the builder gives
        ``item_<name>`` and ``cate_<name>`` the same lengths: their values are concatenated before
        one padding (the whole-history tensor is the model's largest; this halves its padding work).
        """
        items, cates = seq[f"item_{name}"], seq[f"cate_{name}"]
        values = torch.cat([items.values(), cates.values()], dim=1)
        return torch.ops.fbgemm.jagged_to_padded_dense(values, [items.offsets()], [length], 0.0), items.lengths()

    def forward(self, batch: Batch) -> Tuple[SequenceInputs, torch.Tensor]:
        """Returns (sequence inputs, side features [B, side_dim])."""
        features = batch.sparse_features
        seq = self.tables(features) if self.lookup is None else self.lookup(features, batch.routing)
        # The target's item and category are dropped separately when unknown (id 0): each its own feature.
        singles = single_ids([seq[name] for name in self.single_features], self.single_columns)
        inputs, side = self._inputs(singles, *self._sequence(seq, "recent", self.recent), batch.topk_scores,
                                    batch.recent_scores)
        if self.reads_topk:
            inputs.topk, inputs.topk_lengths = self._sequence(seq, "topk", self.k)
        if self.reads_history:
            inputs.history, inputs.history_lengths = self._sequence(seq, "hist", self.max_history)
        return inputs, side

    def _inputs(self, singles: torch.Tensor, recent: torch.Tensor, recent_lengths: torch.Tensor,
                topk_scores: torch.Tensor, recent_scores: torch.Tensor) -> Tuple[SequenceInputs, torch.Tensor]:
        """(single-id features [B, item_dim + side_dim], the recent sequence, the batch's scores) ->
        (sequence inputs without the top-K and history, side features [B, side_dim])."""
        # Contiguous: the graphed tower compiles its function for contiguous inputs when it captures
        # (model/cuda_graphs.py), and evaluation calls that same function.
        parts = singles.split([self.item_dim, self.side_dim], dim=1)
        target, side = parts[0].contiguous(), parts[1].contiguous()
        inputs = SequenceInputs(
            target=target,
            topk=target.new_zeros(0),
            topk_lengths=recent_lengths.new_zeros(0),
            topk_scores=topk_scores,
            recent=recent,
            recent_lengths=recent_lengths,
            recent_scores=recent_scores,
        )
        return inputs, side

    def rows(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's lookups for ``padded``: (rows [row_layout.capacity(B) + 1, D]: the embeddings of
        every id (or, routed once, of every distinct id), then zero rows; order
        [row_layout.capacity(B) + 1] int64: the row of each id, feature after feature in
        ``row_layout.keys``, then of a zero row for each slot past them; lengths [F * B]).

        The rows come in the order the lookup gives them (a routed lookup's: the holding ranks'), so
        restoring the batch's order is part of ``padded``'s gathers (in the tower's graphs), not a
        gather of every row of its own and its backward each step."""
        features, order = batch.sparse_features, None
        if self.lookup is not None:
            features, values, order = self.lookup.looked_up(features, batch.routing)
        else:
            seq = self.tables(features)
            values = torch.cat([seq[key].values() for key in features.keys()])
        self._check_order(features)
        capacity, ids = self.row_layout.capacity(features.stride()), features.values().numel()
        if ids > capacity:
            raise ValueError(f"{ids} ids in a batch of {features.stride()} samples: more than the "
                             f"{capacity} its features hold ({self.row_layout})")
        rows = values.shape[0]  # fewer than the ids where a routed lookup read repeated ids once
        if order is None:
            order = torch.arange(capacity + 1, device=values.device)
        else:  # every slot past the ids reads the first zero row
            order = nnf.pad(order, (0, capacity + 1 - ids), value=rows)
        return nnf.pad(values, (0, 0, 0, capacity + 1 - rows)), order, features.lengths()

    def _check_order(self, features: KeyedJaggedTensor) -> None:
        if tuple(features.keys()) != self.row_layout.keys:
            raise ValueError(f"sparse features {features.keys()} are not in the collection's order "
                             f"{list(self.row_layout.keys)}")

    def read_rows(self, batch: Batch) -> Tuple[torch.Tensor, ...]:
        """For a routed batch with a fixed exchange (``Routing.fixed``, W ranks, C rows each), what
        ``MuseTrain.loss_from_read_rows`` takes: (the rows this rank looked up for every rank, then
        zero rows [W * C + 1, D]; the fixed exchange's row slots [W * C + 1], send slots [W * C] and
        order [row_layout.capacity(B) + 1] int64; lengths [F * B])."""
        features, read_rows = self.lookup.read_rows(batch.sparse_features, batch.routing)
        self._check_order(features)
        fixed = batch.routing.fixed
        return read_rows, fixed.row_slots, fixed.send_slots, fixed.order, features.lengths()

    def padded(self, rows: torch.Tensor, order: torch.Tensor, lengths: torch.Tensor, topk_scores: torch.Tensor,
               recent_scores: torch.Tensor) -> Tuple[SequenceInputs, torch.Tensor]:
        """What ``forward`` returns, from what ``rows`` returns and the batch's ``topk_scores`` [B, K] and
        ``recent_scores`` [B, R]; every shape fixed by B, so capturable in CUDA graphs. Not the whole
        history."""
        layout = self.row_layout
        starts, lengths = row_starts(lengths, len(layout.keys))
        singles = padded_slots(rows, order, starts, lengths, layout.positions(self.single_features), 1).flatten(1)
        if self.single_columns is not None:
            singles = singles.index_select(1, self.single_columns)
        recent_features = layout.positions(["item_recent", "cate_recent"])
        recent = padded_slots(rows, order, starts, lengths, recent_features, self.recent)
        inputs, side = self._inputs(singles, recent, lengths[recent_features[0]], topk_scores, recent_scores)
        if self.reads_topk:
            topk_features = layout.positions(["item_topk", "cate_topk"])
            inputs.topk = padded_slots(rows, order, starts, lengths, topk_features, self.k)
            inputs.topk_lengths = lengths[topk_features[0]]
        return inputs, side


class DenseTower(nn.Module):
    """Interest blocks + target + side features -> MLP (Dice) -> click logits.

    All of the model's dense math after the lookups, with static shapes for a fixed batch size: the
    part worth compiling (``compile``), as one module that holds no sharded module so that the
    pipeline's fx tracer keeps it a leaf and calls the compiled module.

    Args:
        blocks: ESU / interest modules, each with ``output_dim`` and ``forward(SequenceInputs)``.
        item_dim: width E of the target embedding (item + category).
        side_dim: width of the side features.
        mlp_hidden: widths of the Dice MLP (the paper: 256-128-64).
    """

    def __init__(self, blocks: Sequence[nn.Module], item_dim: int, side_dim: int, mlp_hidden: Sequence[int]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.mlp = MLP(item_dim + side_dim + sum(b.output_dim for b in self.blocks), list(mlp_hidden))
        self.logit = nn.Linear(self.mlp.output_dim, 1)
        # train.compile_mode "graphs" (``compile_tower``): training steps replay CUDA graphs of the
        # compiled ``logits``; evaluation runs the compiled ``logits``.
        self.graphs: Optional[GraphedFunction] = None

    def logits(
        self,
        target: torch.Tensor,
        topk: torch.Tensor,
        topk_lengths: torch.Tensor,
        topk_scores: torch.Tensor,
        recent: torch.Tensor,
        recent_lengths: torch.Tensor,
        recent_scores: torch.Tensor,
        side: torch.Tensor,
    ) -> torch.Tensor:
        """``forward`` over plain tensors (``SequenceInputs``' fields but the history, which the
        blocks do not read) -> click logits [B]."""
        inputs = SequenceInputs(target, topk, topk_lengths, topk_scores, recent, recent_lengths, recent_scores)
        parts: List[torch.Tensor] = [block(inputs) for block in self.blocks]
        tower = torch.cat(parts + [target, side], dim=1)
        return self.logit(self.mlp(tower)).squeeze(1)

    def forward(self, inputs: SequenceInputs, side: torch.Tensor) -> torch.Tensor:
        """(sequence inputs, side features [B, side_dim]) -> click logits [B]."""
        args = (inputs.target, inputs.topk, inputs.topk_lengths, inputs.topk_scores, inputs.recent,
                inputs.recent_lengths, inputs.recent_scores, side)
        return self.logits(*args) if self.graphs is None else self.graphs(*args)


class MuseModel(nn.Module):
    """Sparse lookups -> [model-side GSU] -> dense tower -> click logit.

    Args:
        sparse_arch: the embedding lookups.
        blocks: ESU / interest modules of the tower (see ``DenseTower``).
        mlp_hidden: widths of the Dice MLP (the paper: 256-128-64).
        gsu: for GSUs with trainable parameters, ``forward(SequenceInputs, Batch) -> SequenceInputs``
            that selects the top-K from ``SequenceInputs.history``; None when the batch builder
            already selected it. It must hold no sharded module: the pipeline's fx tracer then keeps
            it a leaf, so its data-dependent shapes are never traced.
    """

    def __init__(
        self,
        sparse_arch: SparseArch,
        blocks: Sequence[nn.Module],
        mlp_hidden: Sequence[int],
        gsu: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.sparse_arch = sparse_arch
        self.gsu = gsu
        self.tower = DenseTower(blocks, sparse_arch.item_dim, sparse_arch.side_dim, mlp_hidden)

    @property
    def pads_in_graphs(self) -> bool:
        """Whether the padding of the lookups can join the tower's graphs: not before a model-side
        GSU (data-dependent shapes), nor with the whole history (``SparseArch.padded`` omits it)."""
        return self.gsu is None and not self.sparse_arch.reads_history

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns click logits [B]."""
        inputs, side = self.sparse_arch(batch)
        if self.gsu is not None:
            inputs = self.gsu(inputs, batch)
        return self.tower(inputs, side)

    def logits_from_rows(self, rows: torch.Tensor, order: torch.Tensor, lengths: torch.Tensor,
                         topk_scores: torch.Tensor, recent_scores: torch.Tensor) -> torch.Tensor:
        """``forward`` from ``SparseArch.rows`` (and the batch's scores) -> click logits [B]: the
        padding and the tower, of static shapes (``pads_in_graphs`` models; ``MuseTrain.loss_from_rows``)."""
        return self.tower(*self.sparse_arch.padded(rows, order, lengths, topk_scores, recent_scores))


# train.compile_mode -> torch.compile's mode (None: its default); "graphs" is handled by ``compile_tower``.
COMPILE_MODES: Dict[str, Optional[str]] = {
    "default": None,
    "reduce-overhead": "reduce-overhead",
    "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs",
}
TOWER_MODES = ["none", *COMPILE_MODES, "graphs"]


def compile_tower(model: nn.Module, mode: str, device: torch.device, pad_in_graphs: bool = True) -> None:
    """Compile the ``DenseTower`` of every ``MuseModel`` of ``model`` in place (``mode`` "none" leaves
    them eager).

    In place, so parameter names, checkpoints and the pipeline's fx tracing are the same as eager.
    ``dynamic=False``: a training run's batches all have one shape. "graphs": ``torch.compile``'s
    default mode, and training steps replay the compiled tower's forward and backward as CUDA graphs
    captured at the first step (``cuda_graphs.GraphedFunction``: less host time per step than
    "reduce-overhead"'s CUDA graph trees); CUDA only. With ``pad_in_graphs``, where the model allows
    (``MuseModel.pads_in_graphs``, held by a ``MuseTrain``), one graph runs from the looked-up rows
    to the loss and back (``MuseTrain.loss_from_rows``, ``cuda_graphs.GraphedLossStep``: the
    forward and the backward in one graph, one autograd node), and for routed batches with a fixed
    exchange one from the rows this rank looked up, their all-to-all inside
    (``MuseTrain.loss_from_read_rows``); False for TorchRec's pipeline, which
    traces the model's forward with torch.fx and cannot trace into the graphs' checks. ``device``:
    where the model will train.
    """
    if mode not in TOWER_MODES:
        raise ValueError(f"train.compile_mode: unknown {mode!r}; choose one of {TOWER_MODES}")
    if mode == "graphs" and device.type != "cuda":
        raise ValueError(f"train.compile_mode: 'graphs' captures CUDA graphs; this run trains on {device.type}")
    if mode == "none":
        return
    models = [m for m in model.modules() if isinstance(m, MuseModel)]
    if not models:
        raise ValueError("compile_tower: the model has no MuseModel")
    # MuseTrains by the MuseModel they hold: the ones whose graphs may start from the rows.
    from_rows = {id(m.model): m for m in model.modules()
                 if isinstance(m, MuseTrain) and pad_in_graphs and m.model.pads_in_graphs}
    for muse in models:
        tower = muse.tower
        if mode != "graphs":
            tower.compile(mode=COMPILE_MODES[mode], dynamic=False)
        elif id(muse) in from_rows:
            train = from_rows[id(muse)]
            loss_from_rows = torch.compile(train.loss_from_rows, dynamic=False)
            train.graphs = GraphedLossStep(tower, loss_from_rows)
            train.exchanged_graphs = GraphedLossStep(tower, partial(train.loss_from_read_rows, loss_from_rows))
        else:
            tower.graphs = GraphedFunction(tower, torch.compile(tower.logits, dynamic=False))


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Click logits, labels and weights [B] -> the weighted mean binary cross-entropy (weight-0 rows
    are evaluation's padding)."""
    per_sample = nnf.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (per_sample * weights).sum() / weights.sum().clamp(min=1.0)


class MuseTrain(nn.Module):
    """Owns the loss (``weighted_loss``)."""

    def __init__(self, model: MuseModel) -> None:
        super().__init__()
        self.model = model
        # train.compile_mode "graphs" with the padding in the graphs (``compile_tower``): training
        # steps replay one CUDA graph of the compiled ``loss_from_rows`` (the padding, the tower and
        # the loss, forward and backward); evaluation runs it compiled. ``exchanged_graphs`` starts
        # one step earlier, at the rows this rank looked up (routed batches with a fixed exchange).
        self.graphs: Optional[GraphedLossStep] = None
        self.exchanged_graphs: Optional[GraphedLossStep] = None

    def replays(self) -> Dict[str, int]:
        """Training steps so far that replayed each loss step graph built: "graphs" (from the rows
        looked up, or exchanged before the step) and "exchanged_graphs" (the rows' exchange inside:
        routed batches with a fixed exchange; one past the fixed exchange's capacity, or a run
        without fixed exchanges, replays "graphs" instead)."""
        built = {"graphs": self.graphs, "exchanged_graphs": self.exchanged_graphs}
        return {name: graphs.replays for name, graphs in built.items() if graphs is not None}

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        scored = (batch.topk_scores, batch.recent_scores, batch.labels, batch.weights)
        if self.graphs is None:
            logits = self.model(batch)
            loss = weighted_loss(logits, batch.labels, batch.weights)
        elif self.exchanged_graphs is not None and batch.routing is not None and batch.routing.fixed is not None:
            loss, logits = self.exchanged_graphs(*self.model.sparse_arch.read_rows(batch), *scored)
        else:
            loss, logits = self.graphs(*self.model.sparse_arch.rows(batch), *scored)
        return loss, (loss.detach(), logits.detach(), batch.labels)

    def loss_from_rows(self, rows: torch.Tensor, order: torch.Tensor, lengths: torch.Tensor,
                       topk_scores: torch.Tensor, recent_scores: torch.Tensor, labels: torch.Tensor,
                       weights: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``forward`` from ``SparseArch.rows``, the batch's scores, labels and weights -> (the loss,
        the click logits [B] without gradient: only the loss is differentiated), of static shapes."""
        logits = self.model.logits_from_rows(rows, order, lengths, topk_scores, recent_scores)
        return weighted_loss(logits, labels, weights), logits.detach()

    def loss_from_read_rows(self, loss_from_rows: Callable[..., Tuple[torch.Tensor, torch.Tensor]],
                            read_rows: torch.Tensor, row_slots: torch.Tensor, send_slots: torch.Tensor,
                            order: torch.Tensor, lengths: torch.Tensor,
                            *scored: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``loss_from_rows`` (this module's, or its compiled form) from ``SparseArch.read_rows``: the
        rows' all-to-all first (``RoutedLookup.exchanged``), in fixed shapes. ``scored``: the batch's
        scores, labels and weights, as ``loss_from_rows`` takes them."""
        rows = self.model.sparse_arch.lookup.exchanged(read_rows, row_slots, send_slots)
        return loss_from_rows(rows, order, lengths, *scored)


def loss_step_replays(model: nn.Module) -> Dict[str, int]:
    """``MuseTrain.replays`` of the ``MuseTrain`` inside ``model`` (e.g. DMP's); {} without one."""
    train = next((m for m in model.modules() if isinstance(m, MuseTrain)), None)
    return {} if train is None else train.replays()
