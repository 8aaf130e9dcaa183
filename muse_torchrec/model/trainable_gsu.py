"""Model-side GSUs: top-K searches that need the model's own parameters (MUSE_SPEC section 5).

SIM-soft, TWIN, MISS and the GSU variants of the paper's Table 2 score every behavior of the whole
history with trainable ID embeddings or weights, so they cannot run in the batch builder: batches of
GSU kind "whole_history_scl" (or "whole_history_scl_vectors") carry the whole history, ``SparseArch``
looks it up (``SequenceInputs.history`` [B, L, E], ``history_lengths`` [B]) and a :class:`HistoryGSU`
injected into ``MuseModel`` fills ``topk`` / ``topk_lengths`` / ``topk_scores`` for the ESU blocks.

- Scoring runs without gradient ("without gradient" in the paper; a top-K is not differentiable
  anyway). The selected behaviors' embeddings keep theirs, so the ESU trains the shared tables.
- Selection follows ``gsu.select_topk``'s conventions: padding is never selected, ties go to the
  more recent behavior, behaviors without a score (``Scores.scored`` False) rank after all others.
- ``topk_scores`` (the ESU's R) are the SCL cosines of the selected behaviors, whatever selected
  them, as the builder does for SIM-hard; only the learned projection replaces R with its own cosine
  (that is how its projection trains).

``HistoryGSU`` has data-dependent shapes (``select_topk``): TrainPipelineSparseDist's fx tracer
treats it as a leaf (a child of ``MuseModel`` without sharded modules), so it is never traced.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from muse_torchrec.data.batch import Batch
from muse_torchrec.features import SCL_DIM
from muse_torchrec.model.attention import SemanticAwareTargetAttention, TargetAttention
from muse_torchrec.model.esu import SequenceInputs
from muse_torchrec.model.gsu import (
    TopK,
    gather_selected,
    grouped_cosine,
    length_mask,
    normalize_scl,
    scl_present,
    select_topk,
)


# Smallest norm product of a cosine (zero vectors, e.g. an unknown target, get cosine 0).
_COSINE_EPS = 1e-8


class Scores(NamedTuple):
    """Relevance of every history behavior to the target.

    Attributes:
        values: [B, L] float, higher is more relevant (any scale).
        scored: [B, L] bool, False where a behavior has no similarity (ranked last), or None (all have one).
    """

    values: Tensor
    scored: Optional[Tensor]


def _per_sample(topk: TopK) -> Tensor:
    """[B] 0..B-1: with per-sample tensors, each sample is its own "user" for ``gather_selected``."""
    return torch.arange(topk.indices.shape[0], device=topk.indices.device)


class HistoryScorer(nn.Module):
    """Scores the whole history: ``forward(x, batch) -> Scores``.

    ``similarity`` gives the ESU's R of the selected behaviors: by default their SCL cosines from the
    batch (kind "whole_history_scl").
    """

    def similarity(self, x: SequenceInputs, batch: Batch, topk: TopK) -> Tensor:
        """[B, K] SCL cosines of the selected behaviors (0.0 on padding slots)."""
        return gather_selected(batch.hist_scores, _per_sample(topk), topk)


class SclCosine(HistoryScorer):
    """MUSE's relevance, from the batch: cos(v_a, v_i) of the SCL vectors.

    The builder writes 0.0 where a vector is missing; 0.0 is read as "no similarity" (ranked last,
    as in MUSE's host GSU). An exact zero cosine of two present int8 vectors is as rare as it is
    harmless to rank last.
    """

    def forward(self, x: SequenceInputs, batch: Batch) -> Scores:
        return Scores(batch.hist_scores, batch.hist_scores.ne(0.0))


class IdCosine(HistoryScorer):
    """SIM-soft's relevance: cos([e_item; e_cate]_a, [e_item; e_cate]_i) of the trainable ID embeddings."""

    def forward(self, x: SequenceInputs, batch: Batch) -> Scores:
        # One pass over the [B, L, E] history for the dots and one for the norms
        # (nnf.cosine_similarity broadcasts the target and makes several history-sized temporaries).
        dots = torch.bmm(x.history, x.target.unsqueeze(-1)).squeeze(-1)
        norms = x.history.norm(dim=-1) * x.target.norm(dim=-1, keepdim=True)
        return Scores(dots / norms.clamp_min(_COSINE_EPS), None)


class AttentionLogits(HistoryScorer):
    """TWIN's relevance: the ESU's own target-attention logits alpha_ID (same module, same parameters)."""

    def __init__(self, attention: TargetAttention) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x: SequenceInputs, batch: Batch) -> Scores:
        return Scores(self.attention.logits(x.target, x.history), None)


class SemanticAttentionLogits(HistoryScorer):
    """SCL cosine + ID attention: the ESU's own SA-TA logits ``g1 a_ID + g2 R + g3 a_ID R`` (shared module)."""

    def __init__(self, attention: SemanticAwareTargetAttention) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x: SequenceInputs, batch: Batch) -> Scores:
        return Scores(self.attention.logits(x.target, x.history, batch.hist_scores), None)


class SumOfScores(HistoryScorer):
    """Sum of two relevances (e.g. SCL cosine + ID cosine); a missing SCL vector contributes 0."""

    def __init__(self, first: HistoryScorer, second: HistoryScorer) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, x: SequenceInputs, batch: Batch) -> Scores:
        return Scores(self.first(x, batch).values + self.second(x, batch).values, None)


def ranks(scores: Scores, valid: Tensor) -> Tensor:
    """Rank of every position in ``select_topk``'s order (0 = best): [B, L] long, L for padding."""
    num_rows, max_len = valid.shape
    order = select_topk(scores.values, valid, scores.scored, max_len)
    slot = torch.arange(max_len, device=valid.device).expand(num_rows, max_len)
    # Padding slots of `order` point at position 0 with index 0: give them rank L, and keep the
    # smallest rank written to a position, so a real position 0 keeps its own.
    slot = torch.where(length_mask(order.lengths, max_len), slot, max_len)
    out = torch.full_like(slot, max_len)
    return out.scatter_reduce(1, order.indices, slot, reduce="amin")


class RankUnion(HistoryScorer):
    """MISS: the union of two GSUs' selections, K behaviors in all.

    Rule: a behavior's union rank is its better rank in the two GSUs' orderings; the K behaviors with
    the best union ranks are kept, ties (the r-th choice of one GSU against the r-th of the other)
    going to the more recent behavior. So the r-th choices of both GSUs enter together, r = 0, 1, ...:
    the union of their top-K/2 lists when those are disjoint, of longer lists when they overlap.
    """

    def __init__(self, first: HistoryScorer, second: HistoryScorer) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, x: SequenceInputs, batch: Batch) -> Scores:
        assert x.history is not None and x.history_lengths is not None
        valid = length_mask(x.history_lengths, x.history.shape[1])
        best = torch.minimum(ranks(self.first(x, batch), valid), ranks(self.second(x, batch), valid))
        # Ranks are below 2**24: exact in float32.
        return Scores(-best.float(), None)


class ProjectedSclCosine(HistoryScorer):
    """Learned projection before the cosine: cos(P v_a, P v_i) of the SCL vectors (kind "whole_history_scl_vectors").

    P = I + RESIDUAL_SCALE * W (128 x 128, W zero-initialised), so training starts from MUSE's GSU.
    The selection runs without gradient; R of the selected behaviors is their projected cosine *with*
    gradient, which is how P learns (through SA-TA's logits). A missing vector has no similarity.

    Why the scale: Adam moves every weight by about the learning rate per step whatever the gradient
    size, and P's gradient is weak and noisy (it comes through R only), so a plain 128 x 128 weight
    random-walks away from the identity (measured with `make compare`'s config: GAUC -4.6 % against
    MUSE after one epoch). Scaling W divides P's effective learning rate by the same factor.
    """

    RESIDUAL_SCALE = 0.1

    def __init__(self) -> None:
        super().__init__()
        self.residual = nn.Parameter(torch.zeros(SCL_DIM, SCL_DIM))

    def matrix(self) -> Tensor:
        """P, [128, 128]."""
        return torch.eye(SCL_DIM, device=self.residual.device) + self.RESIDUAL_SCALE * self.residual

    def unit(self, vectors_int8: Tensor) -> Tensor:
        """[..., 128] int8 -> [..., 128] unit projected vectors P v / |P v| (zero for a missing vector)."""
        return nnf.normalize(normalize_scl(vectors_int8) @ self.matrix().T, dim=-1)

    def forward(self, x: SequenceInputs, batch: Batch) -> Scores:
        # Project each user's history once (not once per sample), then score per sample.
        values = grouped_cosine(self.unit(batch.hist_scl), self.unit(batch.target_scl), batch.sample_user)
        present = scl_present(batch.hist_scl)[batch.sample_user] & scl_present(batch.target_scl).unsqueeze(1)
        return Scores(values, present)

    def similarity(self, x: SequenceInputs, batch: Batch, topk: TopK) -> Tensor:
        selected = self.unit(gather_selected(batch.hist_scl, batch.sample_user, topk))  # B x K x 128
        return torch.einsum("bkd,bd->bk", selected, self.unit(batch.target_scl))


class HistoryGSU(nn.Module):
    """Top-K of the whole history by ``scorer``, selected in the model.

    Args:
        scorer: relevance of every behavior (computed without gradient) and R of the selected ones.
        k: number of slots per sample.

    ``forward(x, batch)`` reads ``x.history`` [B, L, E] / ``x.history_lengths`` [B] and returns ``x``
    with ``topk`` [B, K, E] (zeros on padding slots), ``topk_lengths`` [B] and ``topk_scores`` [B, K].
    """

    def __init__(self, scorer: HistoryScorer, k: int) -> None:
        super().__init__()
        self.scorer = scorer
        self.k = k

    def select(self, x: SequenceInputs, batch: Batch) -> TopK:
        """The selection alone (positions into each sample's history, best first)."""
        assert x.history is not None and x.history_lengths is not None, "the batch carries no whole history"
        with torch.no_grad():
            scores = self.scorer(x, batch)
        valid = length_mask(x.history_lengths, x.history.shape[1])
        return select_topk(scores.values, valid, scores.scored, self.k)

    def forward(self, x: SequenceInputs, batch: Batch) -> SequenceInputs:
        topk = self.select(x, batch)
        return dataclasses.replace(
            x,
            topk=gather_selected(x.history, _per_sample(topk), topk),
            topk_lengths=topk.lengths,
            topk_scores=self.scorer.similarity(x, batch, topk),
        )
