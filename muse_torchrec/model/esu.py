"""ESU building blocks: each reads the looked-up sequences and returns one slice of the tower input.

A method (MUSE, DIN, the ablations...) is a list of blocks, injected into the model: no flags inside
``forward``. Every block derives its own ``output_dim``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from muse_torchrec.model.attention import SemanticAwareTargetAttention, TargetAttention, masked_mean
from muse_torchrec.model.simtier import SimTier


@dataclass
class SequenceInputs:
    """Looked-up embeddings of one batch (item and category embeddings concatenated, width E = 2D).

    Attributes:
        target: [B, E] target item+category embedding (zeros for an unknown target).
        topk: [B, K, E] GSU-selected behaviors, best first; topk_lengths [B]; topk_scores [B, K] SCL cosines.
        recent: [B, R, E] most recent behaviors; recent_lengths [B]; recent_scores [B, R] SCL cosines.
        history: [B, L, E] whole history (only for GSUs with trainable parameters, which fill the
            top-K fields from it, see ``trainable_gsu``), history_lengths [B].
    """

    target: torch.Tensor
    topk: torch.Tensor
    topk_lengths: torch.Tensor
    topk_scores: torch.Tensor
    recent: torch.Tensor
    recent_lengths: torch.Tensor
    recent_scores: torch.Tensor
    history: Optional[torch.Tensor] = None
    history_lengths: Optional[torch.Tensor] = None


class RecentTargetAttention(nn.Module):
    """ID target attention of the target over the recent behaviors (DIN's interest)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attention = TargetAttention(dim, dim)
        self.output_dim = self.attention.output_dim

    def forward(self, x: SequenceInputs) -> torch.Tensor:
        return self.attention(x.target, x.recent, x.recent_lengths)


class TopKTargetAttention(nn.Module):
    """Plain ID target attention over the GSU's top-K (TWIN, MISS, ablation "target attention").

    The attention module is injected so that a GSU can score with the same parameters (TWIN).
    """

    def __init__(self, attention: TargetAttention) -> None:
        super().__init__()
        self.attention = attention
        self.output_dim = self.attention.output_dim

    def forward(self, x: SequenceInputs) -> torch.Tensor:
        return self.attention(x.target, x.topk, x.topk_lengths)


class TopKSemanticAttention(nn.Module):
    """SA-TA over the top-K: ID attention fused with the SCL similarities (MUSE_SPEC section 6).

    The attention module is injected so that a GSU can score with the same parameters.
    """

    def __init__(self, attention: SemanticAwareTargetAttention) -> None:
        super().__init__()
        self.attention = attention
        self.output_dim = self.attention.output_dim

    def forward(self, x: SequenceInputs) -> torch.Tensor:
        return self.attention(x.target, x.topk, x.topk_scores, x.topk_lengths)


class TopKMean(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.output_dim = dim

    def forward(self, x: SequenceInputs) -> torch.Tensor:
        return masked_mean(x.topk, x.topk_lengths)


class RecentMean(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.output_dim = dim

    def forward(self, x: SequenceInputs) -> torch.Tensor:
        return masked_mean(x.recent, x.recent_lengths)


class TopKSimTier(nn.Module):
    """SimTier histogram of the top-K's SCL similarities."""

    def __init__(self, mode: str, num_tiers: int) -> None:
        super().__init__()
        self.simtier = SimTier(mode=mode, num_tiers=num_tiers)
        self.output_dim = self.simtier.output_dim

    def forward(self, x: SequenceInputs) -> torch.Tensor:
        return self.simtier(x.topk_scores, x.topk_lengths)


class RecentSimTier(nn.Module):
    """SimTier histogram of the recent behaviors' SCL similarities."""

    def __init__(self, mode: str, num_tiers: int) -> None:
        super().__init__()
        self.simtier = SimTier(mode=mode, num_tiers=num_tiers)
        self.output_dim = self.simtier.output_dim

    def forward(self, x: SequenceInputs) -> torch.Tensor:
        return self.simtier(x.recent_scores, x.recent_lengths)
