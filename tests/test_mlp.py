"""Dice and the Dice MLP against hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.fx

from muse_torchrec.model.mlp import MLP, Dice


def dice_by_hand(
    x: torch.Tensor, alpha: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float
) -> torch.Tensor:
    p = torch.sigmoid((x - mean) / torch.sqrt(var + eps))
    return p * x + (1 - p) * alpha * x


def test_dice_train_mode_uses_batch_statistics() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=gen) * 3 + 1
    dice = Dice(5)
    assert dice.output_dim == 5
    assert torch.equal(dice.alpha.detach(), torch.zeros(5))
    with torch.no_grad():
        dice.alpha.copy_(torch.randn(5, generator=gen))
    out = dice(x)
    want = dice_by_hand(x, dice.alpha, x.mean(0), x.var(0, unbiased=False), 1e-8)
    torch.testing.assert_close(out, want)


def test_dice_eval_mode_uses_running_statistics_with_batch_of_one() -> None:
    gen = torch.Generator().manual_seed(1)
    dice = Dice(4)
    with torch.no_grad():
        dice.alpha.fill_(0.25)
    for _ in range(5):
        dice(torch.randn(16, 4, generator=gen) * 2 + 3)
    dice.eval()
    x = torch.randn(1, 4, generator=gen)
    want = dice_by_hand(x, dice.alpha, dice.norm.running_mean, dice.norm.running_var, 1e-8)
    torch.testing.assert_close(dice(x), want)
    assert not torch.equal(dice.norm.running_mean, torch.zeros(4))


def test_dice_alpha_learns() -> None:
    dice = Dice(3)
    dice(torch.randn(8, 3)).sum().backward()
    assert dice.alpha.grad is not None and dice.alpha.grad.abs().sum() > 0


def test_mlp_shapes_and_eval_batch_of_one() -> None:
    mlp = MLP(20, (16, 8, 4))
    assert mlp.output_dim == 4
    assert mlp(torch.randn(10, 20)).shape == (10, 4)
    mlp.eval()
    single = torch.randn(1, 20)
    out = mlp(single)
    assert out.shape == (1, 4) and torch.isfinite(out).all()
    # Eval output of a row does not depend on the rest of the batch.
    torch.testing.assert_close(mlp(torch.cat([single, torch.randn(5, 20)]))[:1], out)
    traced = torch.fx.symbolic_trace(mlp)
    assert torch.equal(traced(single), out)


def test_mlp_layers_are_linear_then_dice() -> None:
    mlp = MLP(6, (5, 3))
    x = torch.randn(7, 6)
    h = x
    for layer in mlp.layers:
        linear, dice = layer
        assert isinstance(linear, torch.nn.Linear) and isinstance(dice, Dice)
        h = dice(linear(h))
    # Train-mode BN statistics are per call, so the layer-by-layer pass must see the same batch.
    torch.testing.assert_close(mlp(x), h)


def test_mlp_needs_a_layer() -> None:
    with pytest.raises(ValueError):
        MLP(4, ())
