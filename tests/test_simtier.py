"""SimTier against plain Python loops, both modes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.fx

from muse_torchrec.model.simtier import SimTier


def paper_loop(scores: torch.Tensor, lengths: torch.Tensor, num_tiers: int) -> torch.Tensor:
    """Counts per tier [lo, hi) of [-1, 1] (the last tier closed), real positions only."""
    out = torch.zeros(scores.shape[0], num_tiers)
    for b in range(scores.shape[0]):
        for j in range(int(lengths[b])):
            r = float(scores[b, j])
            for tier in range(num_tiers):
                lo = -1.0 + 2.0 * tier / num_tiers
                hi = -1.0 + 2.0 * (tier + 1) / num_tiers
                if lo <= r < hi or (tier == num_tiers - 1 and r == hi):
                    out[b, tier] += 1
    return out


def reference_loop(
    scores: torch.Tensor, lengths: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """log(1 + count) * w per bin ceil(10 r) + 10 (float32 arithmetic), real positions only."""
    counts = torch.zeros(scores.shape[0], 22)
    for b in range(scores.shape[0]):
        for j in range(int(lengths[b])):
            counts[b, math.ceil(np.float32(10) * np.float32(scores[b, j])) + 10] += 1
    return torch.log1p(counts) * weight


def random_scores(seed: int, rows: int = 40, k: int = 25):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, k, generator=gen) * 2 - 1
    # Edge values and exact (dyadic) tier boundaries.
    scores[0, :7] = torch.tensor([-1.0, 0.0, 1.0, -0.5, 0.5, -0.75, 0.25])
    lengths = torch.randint(0, k + 1, (rows,), generator=gen)
    lengths[0] = k
    lengths[1] = 0
    return scores, lengths


@pytest.mark.parametrize("num_tiers", [20, 8])
def test_paper_mode_matches_loop(num_tiers: int) -> None:
    scores, lengths = random_scores(num_tiers)
    simtier = SimTier("paper", num_tiers)
    assert simtier.output_dim == num_tiers
    out = simtier(scores, lengths)
    assert out.shape == (40, num_tiers) and out.dtype == torch.float32
    assert torch.equal(out, paper_loop(scores, lengths, num_tiers))
    assert torch.equal(out.sum(1), lengths.float())


def test_reference_mode_matches_loop() -> None:
    scores, lengths = random_scores(7)
    simtier = SimTier("reference")
    assert simtier.output_dim == 22
    with torch.no_grad():
        simtier.head.weight.copy_(torch.randn(22, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(
        simtier(scores, lengths), reference_loop(scores, lengths, simtier.head.weight.detach())
    )


def test_edge_values() -> None:
    scores = torch.tensor([[-1.0, 0.0, 1.0]])
    paper = SimTier("paper", 20)(scores, torch.tensor([3]))
    assert paper[0].nonzero().flatten().tolist() == [0, 10, 19]
    reference = SimTier("reference")(scores, torch.tensor([3]))
    assert reference[0].nonzero().flatten().tolist() == [0, 10, 20]
    torch.testing.assert_close(reference[0, [0, 10, 20]], torch.full((3,), math.log(2.0)))


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_padding_not_counted(mode: str) -> None:
    scores, lengths = random_scores(3)
    simtier = SimTier(mode)
    changed = scores.clone()
    padded = torch.arange(scores.shape[1]).unsqueeze(0) >= lengths.unsqueeze(1)
    changed[padded] = torch.where(torch.rand(int(padded.sum())) < 0.5, 0.0, 1.0)
    assert torch.equal(simtier(scores, lengths), simtier(changed, lengths))
    # A row of length 0 is all zeros (the reference would count K zeros in the cosine-0 bin).
    assert torch.equal(simtier(scores, lengths)[1], torch.zeros(simtier.output_dim))


def test_reference_weights_get_gradients_and_trace_matches_eager() -> None:
    scores, lengths = random_scores(4)
    for mode in ("paper", "reference"):
        simtier = SimTier(mode)
        traced = torch.fx.symbolic_trace(simtier)
        assert torch.equal(traced(scores, lengths), simtier(scores, lengths))
    simtier(scores, lengths).sum().backward()
    assert simtier.head.weight.grad is not None and simtier.head.weight.grad.abs().sum() > 0


def test_unknown_mode_rejected() -> None:
    with pytest.raises(ValueError, match="unknown SimTier mode"):
        SimTier("histogram")
