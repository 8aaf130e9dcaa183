"""The MUSE model (MUSE_SPEC section 6) and its training wrapper, in the layout of torchrec's DLRM.

- ``SparseArch``: the sharded embedding collection -> padded sequence tensors + side features.
- ``MuseModel``: optional model-side GSU (injected, ``trainable_gsu``) -> ``DenseTower``: ESU blocks
  (injected) + target and user features -> MLP (Dice) -> one click logit.
- ``MuseTrain``: owns the binary cross-entropy loss; returns ``(loss, (loss, logits, labels))``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as nnf
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor

from muse_torchrec.data.batch import Batch
from muse_torchrec.model.cuda_graphs import GraphedFunction
from muse_torchrec.model.esu import SequenceInputs
from muse_torchrec.model.mlp import MLP


def padded(jt: JaggedTensor, length: int) -> torch.Tensor:
    """Jagged embeddings (values [N, D]) -> [B, length, D], zero beyond each row's length."""
    values = jt.values()
    return torch.ops.fbgemm.jagged_to_padded_dense(values, [jt.offsets()], [length], 0.0)


def single_ids(features: Sequence[JaggedTensor], widths: Sequence[int]) -> torch.Tensor:
    """Embeddings of F features of at most one id per sample -> [B, sum(widths)]: feature f's first
    ``widths[f]`` columns, zeros where the sample has no id (what a sum-pooled bag of 0/1 ids gives).

    One padding for all F features (their rows stacked feature-major), not one per feature.
    """
    values = torch.cat([jt.values() for jt in features])
    lengths = torch.cat([jt.lengths() for jt in features])
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
    dense = torch.ops.fbgemm.jagged_to_padded_dense(values, [offsets], [1], 0.0)  # [F * B, 1, D]
    per_feature = dense.view(len(features), -1, dense.shape[-1])
    return torch.cat([per_feature[f, :, :width] for f, width in enumerate(widths)], dim=1)


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
        seq = self.tables(batch.sparse_features)
        # The target's item and category are dropped separately when unknown (id 0): pad each.
        target = torch.cat([padded(seq["item_target"], 1), padded(seq["cate_target"], 1)], dim=-1)
        recent, recent_lengths = self._sequence(seq, "recent", self.recent)
        inputs = SequenceInputs(
            target=target.squeeze(1),
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
        side = single_ids([seq[name] for name in self.side_dims], list(self.side_dims.values()))
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
