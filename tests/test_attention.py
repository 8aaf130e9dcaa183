"""Target attention, SA-TA and masked pooling against per-row loops."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.fx
import torch.nn.functional as F

from muse_torchrec.model.attention import (
    SemanticAwareTargetAttention,
    TargetAttention,
    masked_mean,
)

ROWS, K, QUERY_DIM, KEY_DIM = 12, 9, 6, 10


def inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(ROWS, QUERY_DIM, generator=gen)
    behaviors = torch.randn(ROWS, K, KEY_DIM, generator=gen)
    similarity = torch.rand(ROWS, K, generator=gen) * 2 - 1
    lengths = torch.randint(0, K + 1, (ROWS,), generator=gen)
    lengths[0] = 0
    lengths[1] = K
    return target, behaviors, similarity, lengths


def loop_attention(
    attn: TargetAttention,
    target: torch.Tensor,
    behaviors: torch.Tensor,
    lengths: torch.Tensor,
    sata: Optional[SemanticAwareTargetAttention] = None,
    similarity: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One row and one position at a time, straight from MUSE_SPEC section 6."""
    reference = attn.mode == "reference"
    act = F.silu if reference else (lambda x: x)
    w_q, w_k, w_v = attn.query.weight, attn.key.weight, attn.value.weight
    out = torch.zeros(target.shape[0], w_v.shape[0])
    for b in range(target.shape[0]):
        n = int(lengths[b])
        if n == 0:
            continue
        q = act(w_q @ target[b])
        logits = []
        for i in range(n):
            a = torch.dot(act(w_k @ behaviors[b, i]), q)
            if not reference:
                a = a / w_q.shape[0] ** 0.5
            if sata is not None:
                r = similarity[b, i]
                if reference:
                    r = r / sata.similarity_scale.temperature
                a = sata.gamma_id * a + sata.gamma_sim * r + sata.gamma_cross * a * r
            logits.append(a)
        weights = torch.softmax(torch.stack(logits), dim=0) + (1e-7 if reference else 0.0)
        for i in range(n):
            out[b] += weights[i] * act(w_v @ behaviors[b, i])
    return out


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_target_attention_matches_loop(mode: str) -> None:
    target, behaviors, _, lengths = inputs(0)
    attn = TargetAttention(QUERY_DIM, KEY_DIM, attention_dim=7, mode=mode)
    assert attn.output_dim == 7
    out = attn(target, behaviors, lengths)
    assert out.shape == (ROWS, 7)
    torch.testing.assert_close(out, loop_attention(attn, target, behaviors, lengths))


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_sata_matches_loop(mode: str) -> None:
    target, behaviors, similarity, lengths = inputs(1)
    sata = SemanticAwareTargetAttention(QUERY_DIM, KEY_DIM, mode=mode)
    assert sata.output_dim == KEY_DIM
    with torch.no_grad():
        sata.gamma_id.fill_(0.7)
        sata.gamma_sim.fill_(-1.3)
        sata.gamma_cross.fill_(2.1)
    torch.testing.assert_close(
        sata(target, behaviors, similarity, lengths),
        loop_attention(sata.id_attention, target, behaviors, lengths, sata, similarity),
    )


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_sata_without_similarity_terms_is_target_attention(mode: str) -> None:
    target, behaviors, similarity, lengths = inputs(2)
    sata = SemanticAwareTargetAttention(QUERY_DIM, KEY_DIM, mode=mode)
    with torch.no_grad():
        sata.gamma_sim.zero_()
        sata.gamma_cross.zero_()
    plain = TargetAttention(QUERY_DIM, KEY_DIM, mode=mode)
    plain.load_state_dict(sata.id_attention.state_dict())
    sata_out = sata(target, behaviors, similarity, lengths)
    assert torch.equal(sata_out, plain(target, behaviors, lengths))


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_padding_gets_zero_weight(mode: str) -> None:
    target, behaviors, similarity, lengths = inputs(3)
    padded = (torch.arange(K).unsqueeze(0) >= lengths.unsqueeze(1)).unsqueeze(-1)
    other_behaviors = torch.where(padded, torch.randn_like(behaviors) * 100, behaviors)
    other_similarity = torch.where(padded.squeeze(-1), torch.ones_like(similarity), similarity)
    attn = TargetAttention(QUERY_DIM, KEY_DIM, mode=mode)
    sata = SemanticAwareTargetAttention(QUERY_DIM, KEY_DIM, mode=mode)
    assert torch.equal(attn(target, behaviors, lengths), attn(target, other_behaviors, lengths))
    assert torch.equal(
        sata(target, behaviors, similarity, lengths),
        sata(target, other_behaviors, other_similarity, lengths),
    )
    assert torch.equal(masked_mean(behaviors, lengths), masked_mean(other_behaviors, lengths))


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_empty_rows_give_finite_zeros_and_gradients(mode: str) -> None:
    target, behaviors, similarity, _ = inputs(4)
    lengths = torch.zeros(ROWS, dtype=torch.long)
    lengths[5] = 3
    behaviors.requires_grad_(True)
    sata = SemanticAwareTargetAttention(QUERY_DIM, KEY_DIM, mode=mode)
    out = sata(target, behaviors, similarity, lengths)
    assert torch.isfinite(out).all()
    assert torch.equal(out[lengths == 0], torch.zeros(ROWS - 1, KEY_DIM))
    out.sum().backward()
    for grad in [behaviors.grad, sata.gamma_id.grad, sata.id_attention.key.weight.grad]:
        assert grad is not None and torch.isfinite(grad).all()


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_gradients_reach_gammas_and_temperature(mode: str) -> None:
    target, behaviors, similarity, lengths = inputs(5)
    sata = SemanticAwareTargetAttention(QUERY_DIM, KEY_DIM, mode=mode)
    gammas = [sata.gamma_id, sata.gamma_sim, sata.gamma_cross]
    assert [float(g.detach()) for g in gammas] == [1.0, 1.0, 1.0]
    learned = list(gammas)
    if mode == "reference":
        assert float(sata.similarity_scale.temperature.detach()) == pytest.approx(0.1)
        learned.append(sata.similarity_scale.temperature)
    sata(target, behaviors, similarity, lengths).pow(2).sum().backward()
    for param in learned:
        assert param.grad is not None and float(param.grad.abs()) > 0


def test_reference_mode_differs_from_paper() -> None:
    target, behaviors, similarity, lengths = inputs(6)
    paper = SemanticAwareTargetAttention(QUERY_DIM, KEY_DIM, mode="paper")
    reference = SemanticAwareTargetAttention(QUERY_DIM, KEY_DIM, mode="reference")
    reference.id_attention.load_state_dict(paper.id_attention.state_dict())
    a = paper(target, behaviors, similarity, lengths)
    b = reference(target, behaviors, similarity, lengths)
    assert torch.isfinite(b).all()
    assert not torch.allclose(a[lengths > 0], b[lengths > 0])


def test_masked_mean_matches_loop() -> None:
    _, behaviors, _, lengths = inputs(7)
    out = masked_mean(behaviors, lengths)
    for b in range(ROWS):
        n = int(lengths[b])
        want = behaviors[b, :n].mean(0) if n else torch.zeros(KEY_DIM)
        torch.testing.assert_close(out[b], want)


def test_modules_trace_like_eager() -> None:
    target, behaviors, similarity, lengths = inputs(8)
    attn = TargetAttention(QUERY_DIM, KEY_DIM)
    sata = SemanticAwareTargetAttention(QUERY_DIM, KEY_DIM, mode="reference")
    assert torch.equal(
        torch.fx.symbolic_trace(attn)(target, behaviors, lengths), attn(target, behaviors, lengths)
    )
    assert torch.equal(
        torch.fx.symbolic_trace(sata)(target, behaviors, similarity, lengths),
        sata(target, behaviors, similarity, lengths),
    )


def test_unknown_mode_rejected() -> None:
    with pytest.raises(ValueError, match="unknown attention mode"):
        SemanticAwareTargetAttention(QUERY_DIM, KEY_DIM, mode="twin")
