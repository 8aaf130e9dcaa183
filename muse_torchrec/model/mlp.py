"""The tower: an MLP with Dice activations (DIN paper), as in MUSE_SPEC section 6."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

# DIN uses a very small epsilon in Dice's normalisation.
_DICE_EPS = 1e-8


class Dice(nn.Module):
    """Dice activation: ``p * x + (1 - p) * alpha * x`` with ``p = sigmoid(BN(x))``.

    BN normalises each unit over the batch without affine parameters (running statistics in eval
    mode, so eval works with a batch of one); ``alpha`` is learned per unit, initialised to 0.

    Args:
        num_units: H, the width of the input.
        eps: added to the variance in the normalisation.
    """

    def __init__(self, num_units: int, eps: float = _DICE_EPS) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(num_units, eps=eps, affine=False)
        self.alpha = nn.Parameter(torch.zeros(num_units))
        self.output_dim: int = num_units

    def forward(self, x: Tensor) -> Tensor:
        """B x H -> B x H."""
        p = torch.sigmoid(self.norm(x))
        return p * x + (1.0 - p) * self.alpha * x


class MLP(nn.Module):
    """``Linear -> Dice`` per hidden layer: B x in_dim -> B x hidden[-1].

    Args:
        in_dim: width of the input.
        hidden: widths of the layers, e.g. (256, 128, 64).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("MLP needs at least one hidden layer")
        widths = [in_dim, *hidden]
        self.layers = nn.Sequential(
            *(
                nn.Sequential(nn.Linear(w_in, w_out), Dice(w_out))
                for w_in, w_out in zip(widths[:-1], widths[1:])
            )
        )
        self.output_dim: int = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        """B x in_dim -> B x output_dim."""
        return self.layers(x)
