"""Target attention and semantic-aware target attention (SA-TA), MUSE_SPEC section 6.

Both attend from the target's ID embedding over K behaviors with a padding mask built from
lengths. SA-TA reuses TargetAttention's projections, logits and masked pooling, so with
gamma_id = 1 and gamma_sim = gamma_cross = 0 it is exactly plain target attention.

``mode`` (fixed at construction) selects the paper's equations or the public reference
implementation's variant: SiLU after each of the Q/K/V projections, no 1/sqrt(d) scaling, 1e-7 added
to the attention weights and, in SA-TA, the similarities divided by a learned temperature. The
reference has no padding mask; both modes here keep it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from muse_torchrec.model.gsu import length_mask

ATTENTION_MODES = ("paper", "reference")
_REFERENCE_WEIGHT_EPS = 1e-7
_REFERENCE_TEMPERATURE_INIT = 0.1
# Paper mode gammas start where the reference starts (the paper gives no initialisation); the
# difference between the modes is then only what MUSE_SPEC lists.
_GAMMA_INIT = 1.0


def _check_mode(mode: str) -> None:
    if mode not in ATTENTION_MODES:
        raise ValueError(f"unknown attention mode {mode!r}; expected one of {ATTENTION_MODES}")


def masked_mean(values: Tensor, lengths: Tensor) -> Tensor:
    """Mean over the real positions: B x K x D -> B x D (zeros where the length is 0)."""
    real = length_mask(lengths, values.shape[1]).unsqueeze(-1)
    total = values.masked_fill(~real, 0.0).sum(dim=1)
    return total / lengths.clamp_min(1).unsqueeze(-1).to(total.dtype)


def masked_softmax(logits: Tensor, mask: Tensor, eps: float = 0.0) -> Tensor:
    """Softmax over the True positions of each row, exactly 0 elsewhere: B x K -> B x K.

    ``eps`` is added to the weights of real positions after the softmax (the reference adds 1e-7).
    A row without any real position gets all-zero weights, never NaN (in values or gradients).
    """
    has_any = mask.any(dim=1, keepdim=True)
    # -inf gives masked positions exactly zero weight; rows with nothing real are filled with a
    # finite value instead so that their softmax (discarded below) stays finite.
    logits = logits.masked_fill(~mask, float("-inf")).masked_fill(~has_any, 0.0)
    weights = torch.softmax(logits, dim=1) + eps
    return weights.masked_fill(~mask, 0.0)


class TargetAttention(nn.Module):
    """Attention from a target over K behaviors: ``softmax(alpha)^T (E W_v)``.

    ``alpha = (E W_k)(e_a W_q)^T * scale`` with padded positions masked out.

    Args:
        query_dim: Dq, width of the target embedding e_a.
        key_dim: D, width of each behavior embedding.
        attention_dim: d, width of the projections and of the output (default D).
        mode: ``"paper"`` or ``"reference"`` (see the module docstring).
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        attention_dim: Optional[int] = None,
        mode: str = "paper",
    ) -> None:
        super().__init__()
        _check_mode(mode)
        dim = key_dim if attention_dim is None else attention_dim
        self.query = nn.Linear(query_dim, dim, bias=False)
        self.key = nn.Linear(key_dim, dim, bias=False)
        self.value = nn.Linear(key_dim, dim, bias=False)
        reference = mode == "reference"
        self.activation: nn.Module = nn.SiLU() if reference else nn.Identity()
        self.logit_scale = 1.0 if reference else 1.0 / math.sqrt(dim)
        self.weight_eps = _REFERENCE_WEIGHT_EPS if reference else 0.0
        self.mode = mode
        self.output_dim: int = dim

    def logits(self, target: Tensor, behaviors: Tensor) -> Tensor:
        """alpha_ID: target B x Dq, behaviors B x K x D -> B x K (unmasked)."""
        query = self.activation(self.query(target))  # B x d
        keys = self.activation(self.key(behaviors))  # B x K x d
        return torch.bmm(keys, query.unsqueeze(-1)).squeeze(-1) * self.logit_scale

    def pool(self, logits: Tensor, behaviors: Tensor, lengths: Tensor) -> Tensor:
        """Masked-softmax-weighted sum of the projected values: B x K, B x K x D, B -> B x d."""
        values = self.activation(self.value(behaviors))  # B x K x d
        weights = masked_softmax(logits, length_mask(lengths, logits.shape[1]), self.weight_eps)
        return torch.bmm(weights.unsqueeze(1), values).squeeze(1)

    def forward(self, target: Tensor, behaviors: Tensor, lengths: Tensor) -> Tensor:
        """
        Args:
            target: B x Dq target embedding.
            behaviors: B x K x D behavior embeddings.
            lengths: B long, positions ``>= lengths[b]`` are padding.

        Returns:
            B x output_dim (zeros for rows of length 0).
        """
        return self.pool(self.logits(target, behaviors), behaviors, lengths)


class InverseTemperature(nn.Module):
    """``x / t`` with a learned temperature t (reference SA-TA): B x K -> B x K."""

    def __init__(self, init: float = _REFERENCE_TEMPERATURE_INIT) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(init))

    def forward(self, x: Tensor) -> Tensor:
        return x / self.temperature


class SemanticAwareTargetAttention(nn.Module):
    """SA-TA: target attention whose logits also see the GSU similarities R.

    ``alpha = gamma_id * alpha_ID + gamma_sim * R + gamma_cross * (alpha_ID * R)``, gammas learned
    scalars initialised to 1 in both modes; in reference mode R is first divided by a learned
    temperature (init 0.1) and also enters the cross term that way.

    Args:
        query_dim: Dq, width of the target ID embedding.
        key_dim: D, width of each behavior ID embedding.
        attention_dim: d, width of the projections and of the output (default D).
        mode: ``"paper"`` or ``"reference"``.
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        attention_dim: Optional[int] = None,
        mode: str = "paper",
    ) -> None:
        super().__init__()
        self.id_attention = TargetAttention(query_dim, key_dim, attention_dim, mode)
        self.similarity_scale: nn.Module = (
            InverseTemperature() if mode == "reference" else nn.Identity()
        )
        self.gamma_id = nn.Parameter(torch.tensor(_GAMMA_INIT))
        self.gamma_sim = nn.Parameter(torch.tensor(_GAMMA_INIT))
        self.gamma_cross = nn.Parameter(torch.tensor(_GAMMA_INIT))
        self.mode = mode
        self.output_dim: int = self.id_attention.output_dim

    def logits(self, target: Tensor, behaviors: Tensor, similarity: Tensor) -> Tensor:
        """The fused alpha: target B x Dq, behaviors B x K x D, similarity B x K -> B x K (unmasked)."""
        alpha_id = self.id_attention.logits(target, behaviors)
        relevance = self.similarity_scale(similarity)
        return (
            self.gamma_id * alpha_id
            + self.gamma_sim * relevance
            + self.gamma_cross * (alpha_id * relevance)
        )

    def forward(
        self, target: Tensor, behaviors: Tensor, similarity: Tensor, lengths: Tensor
    ) -> Tensor:
        """
        Args:
            target: B x Dq target ID embedding.
            behaviors: B x K x D behavior ID embeddings.
            similarity: B x K GSU similarity scores R (``TopK.scores``).
            lengths: B long, positions ``>= lengths[b]`` are padding.

        Returns:
            B x output_dim (zeros for rows of length 0).
        """
        alpha = self.logits(target, behaviors, similarity)
        return self.id_attention.pool(alpha, behaviors, lengths)
