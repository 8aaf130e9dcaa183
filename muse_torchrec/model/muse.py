"""The MUSE model (MUSE_SPEC section 6) and its training wrapper, in the layout of torchrec's DLRM.

- ``SparseArch``: the sharded embedding collection -> padded sequence tensors + side features.
- ``MuseModel``: optional model-side GSU (injected, ``trainable_gsu``) -> ``DenseTower``: ESU blocks
  (injected) + target and user features -> MLP (Dice) -> one click logit.
- ``MuseTrain``: owns the binary cross-entropy loss; returns ``(loss, (loss, logits, labels))``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as nnf
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from muse_torchrec.data.batch import Batch
from muse_torchrec.model.cuda_graphs import GraphedFunction
from muse_torchrec.model.esu import SequenceInputs
from muse_torchrec.model.mlp import MLP


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
        self.lookup: Optional[Callable[[KeyedJaggedTensor], Dict[str, JaggedTensor]]] = None

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
        seq = self.tables(features) if self.lookup is None else self.lookup(features)
        # The target's item and category are dropped separately when unknown (id 0): each its own feature.
        singles = single_ids([seq[name] for name in self.single_features], self.single_columns)
        # Contiguous: the graphed tower compiles its function for contiguous inputs when it captures
        # (model/cuda_graphs.py), and evaluation calls that same function.
        parts = singles.split([self.item_dim, self.side_dim], dim=1)
        target, side = parts[0].contiguous(), parts[1].contiguous()
        recent, recent_lengths = self._sequence(seq, "recent", self.recent)
        inputs = SequenceInputs(
            target=target,
            topk=target.new_zeros(0),
            topk_lengths=recent_lengths.new_zeros(0),
            topk_scores=batch.topk_scores,
            recent=recent,
            recent_lengths=recent_lengths,
            recent_scores=batch.recent_scores,
        )
        if self.reads_topk:
            inputs.topk, inputs.topk_lengths = self._sequence(seq, "topk", self.k)
        if self.reads_history:
            inputs.history, inputs.history_lengths = self._sequence(seq, "hist", self.max_history)
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
        if self.graphs is None:
            return self.logits(*args)
        if self.training and torch.is_grad_enabled():
            return self.graphs(*args)
        return self.graphs.fn(*args)


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

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns click logits [B]."""
        inputs, side = self.sparse_arch(batch)
        if self.gsu is not None:
            inputs = self.gsu(inputs, batch)
        return self.tower(inputs, side)


# train.compile_mode -> torch.compile's mode (None: its default); "graphs" is handled by ``compile_tower``.
COMPILE_MODES: Dict[str, Optional[str]] = {
    "default": None,
    "reduce-overhead": "reduce-overhead",
    "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs",
}
TOWER_MODES = ["none", *COMPILE_MODES, "graphs"]


def compile_tower(model: nn.Module, mode: str, device: torch.device) -> None:
    """Compile every ``DenseTower`` of ``model`` in place (``mode`` "none" leaves them eager).

    In place, so parameter names, checkpoints and the pipeline's fx tracing are the same as eager.
    ``dynamic=False``: a training run's batches all have one shape. "graphs": ``torch.compile``'s
    default mode, and training steps replay the compiled tower's forward and backward as CUDA graphs
    captured at the first step (``cuda_graphs.GraphedFunction``: less host time per step than
    "reduce-overhead"'s CUDA graph trees); CUDA only. ``device``: where the model will train.
    """
    if mode not in TOWER_MODES:
        raise ValueError(f"train.compile_mode: unknown {mode!r}; choose one of {TOWER_MODES}")
    if mode == "graphs" and device.type != "cuda":
        raise ValueError(f"train.compile_mode: 'graphs' captures CUDA graphs; this run trains on {device.type}")
    if mode == "none":
        return
    towers = [m for m in model.modules() if isinstance(m, DenseTower)]
    if not towers:
        raise ValueError("compile_tower: the model has no DenseTower")
    for tower in towers:
        if mode == "graphs":
            tower.graphs = GraphedFunction(tower, torch.compile(tower.logits, dynamic=False))
        else:
            tower.compile(mode=COMPILE_MODES[mode], dynamic=False)


class MuseTrain(nn.Module):
    """Owns the loss: weighted binary cross-entropy (weight-0 rows are eval padding)."""

    def __init__(self, model: MuseModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits = self.model(batch)
        per_sample = nnf.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
        loss = (per_sample * batch.weights).sum() / batch.weights.sum().clamp(min=1.0)
        return loss, (loss.detach(), logits.detach(), batch.labels)
