"""Model-side GSUs (SIM-soft, TWIN, MISS, Table 2 variants) against brute-force references."""

from typing import List

import numpy as np
import pytest
import torch

from muse_torchrec.config import load_config
from muse_torchrec.data.batch import Batch, BatchBuilder, sequence_features
from muse_torchrec.model import esu
from muse_torchrec.model import trainable_gsu as tg
from muse_torchrec.model.methods import build_model, get_method
from random_data import VOCAB, random_block, random_scl
from test_gsu import brute_select

K, RECENT, MAX_HISTORY = 6, 5, 40


def setup(method: str, seed: int = 0):
    """(model, batch, SequenceInputs after the sparse lookup, the block, SCL table, item -> SCL row)."""
    rng = np.random.default_rng(seed)
    scl, item_scl_row = random_scl(rng)
    block = random_block(rng, num_users=10, max_len=60)
    # Repeated items in one history give exact score ties: the more recent one must win.
    block.hist_items[block.hist_offsets[3]: block.hist_offsets[4]] %= 9
    gsu_kind = get_method(method).gsu
    batch = BatchBuilder(scl, item_scl_row, gsu=gsu_kind, k=K, recent=RECENT, max_history=MAX_HISTORY)(block)
    cfg = load_config(None, [f"model.method={method}", f"model.k={K}", "model.mlp=[16]"])
    torch.manual_seed(seed)
    model = build_model(cfg.model, VOCAB, sequence_features(gsu_kind), RECENT, MAX_HISTORY,
                        device=torch.device("cpu")).model
    with torch.no_grad():
        inputs, _ = model.sparse_arch(batch)
    return model, batch, inputs, block, scl, item_scl_row


def unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)


def history_items(block, batch: Batch) -> List[np.ndarray]:
    """Each sample's history item rows as the builder keeps them (last L, id 0 dropped)."""
    out = []
    for b in range(batch.batch_size):
        u = block.sample_user[b]
        items = block.hist_items[block.hist_offsets[u]: block.hist_offsets[u + 1]][-MAX_HISTORY:]
        out.append(items[items != 0])
    return out


def scl_cosines(block, batch, scl, item_scl_row) -> np.ndarray:
    """[B, L] float64 SCL cosine of every kept behavior with the target (0 if a vector is missing)."""
    out = np.zeros((batch.batch_size, MAX_HISTORY))
    for b, items in enumerate(history_items(block, batch)):
        target = unit(scl[item_scl_row[block.target["item"][b]]].astype(np.float64))
        out[b, : len(items)] = unit(scl[item_scl_row[items]].astype(np.float64)) @ target
    return out


def valid(inputs) -> torch.Tensor:
    return torch.arange(MAX_HISTORY) < inputs.history_lengths.unsqueeze(1)


def check_selection(gsu: tg.HistoryGSU, inputs, batch) -> tg.Scores:
    """The GSU selects by select_topk's rules on its own scores (brute force), and gathers correctly."""
    with torch.no_grad():
        scores = gsu.scorer(inputs, batch)
        want = brute_select(scores.values, valid(inputs), scores.scored, K)
        got = gsu(inputs, batch)
    assert torch.equal(gsu.select(inputs, batch).indices, want.indices)
    assert torch.equal(got.topk_lengths, want.lengths)
    for b in range(batch.batch_size):
        n = int(want.lengths[b])
        torch.testing.assert_close(got.topk[b, :n], inputs.history[b, want.indices[b, :n]])
        assert torch.all(got.topk[b, n:] == 0) and torch.all(got.topk_scores[b, n:] == 0)
    return scores


def test_scl_cosine_in_model_equals_the_host_muse_gsu():
    """MISS's SCL part: batch.hist_scores are the SCL cosines, and selecting on them in the model picks
    exactly what MUSE's host GSU picks."""
    _, batch, inputs, block, scl, item_scl_row = setup("miss")
    np.testing.assert_allclose(batch.hist_scores.numpy(), scl_cosines(block, batch, scl, item_scl_row), atol=1e-6)
    gsu = tg.HistoryGSU(tg.SclCosine(), K)
    check_selection(gsu, inputs, batch)
    host = BatchBuilder(scl, item_scl_row, gsu="scl_cosine", k=K, recent=RECENT, max_history=MAX_HISTORY)(block)
    topk = gsu.select(inputs, batch)
    for b, items in enumerate(history_items(block, batch)):
        n = int(topk.lengths[b])
        assert items[topk.indices[b, :n].numpy()].tolist() == host.sparse_features["item_topk"].to_dense()[b].tolist()


def test_id_cosine_is_sim_soft_relevance():
    model, batch, inputs, *_ = setup("sim_soft")
    scores = check_selection(model.gsu, inputs, batch)
    target, history = inputs.target.double().numpy(), inputs.history.double().numpy()
    want = np.einsum("bld,bd->bl", unit(history), unit(target))
    mask = valid(inputs).numpy()
    np.testing.assert_allclose(scores.values.numpy()[mask], want[mask], atol=1e-6)
    assert scores.scored is None
    # R of the selected behaviors are their SCL cosines, as for every GSU but the projection.
    topk = model.gsu.select(inputs, batch)
    with torch.no_grad():
        got = model.gsu(inputs, batch)
    for b in range(batch.batch_size):
        n = int(topk.lengths[b])
        assert torch.equal(got.topk_scores[b, :n], batch.hist_scores[b, topk.indices[b, :n]])


def test_scl_plus_id_cosine():
    model, batch, inputs, block, scl, item_scl_row = setup("gsu_scl_id_cosine")
    scores = check_selection(model.gsu, inputs, batch)
    id_cos = np.einsum("bld,bd->bl", unit(inputs.history.double().numpy()), unit(inputs.target.double().numpy()))
    want = scl_cosines(block, batch, scl, item_scl_row) + id_cos
    mask = valid(inputs).numpy()
    np.testing.assert_allclose(scores.values.numpy()[mask], want[mask], atol=1e-5)


def test_scl_plus_id_attention_is_the_esu_sata_logits():
    model, batch, inputs, *_ = setup("gsu_scl_id_attention")
    sata = next(b for b in model.tower.blocks if isinstance(b, esu.TopKSemanticAttention)).attention
    assert model.gsu.scorer.attention is sata  # the ESU's own parameters
    with torch.no_grad():
        sata.gamma_id.fill_(0.7)
        sata.gamma_sim.fill_(2.0)
        sata.gamma_cross.fill_(-0.5)
    scores = check_selection(model.gsu, inputs, batch)
    att = sata.id_attention
    q = inputs.target @ att.query.weight.T
    k = inputs.history @ att.key.weight.T
    alpha = torch.einsum("bld,bd->bl", k, q) / att.output_dim ** 0.5
    want = 0.7 * alpha + 2.0 * batch.hist_scores - 0.5 * alpha * batch.hist_scores
    mask = valid(inputs)
    torch.testing.assert_close(scores.values[mask], want[mask].detach(), rtol=1e-5, atol=1e-5)


def test_learned_projection_cosine_against_numpy():
    model, batch, inputs, block, scl, item_scl_row = setup("gsu_projection")
    scorer = model.gsu.scorer
    # At initialisation (identity) it is MUSE's cosine.
    with torch.no_grad():
        at_init = model.gsu.scorer(inputs, batch).values
    np.testing.assert_allclose(at_init.numpy(), scl_cosines(block, batch, scl, item_scl_row), atol=1e-5)
    with torch.no_grad():
        scorer.residual.copy_(torch.randn(scorer.residual.shape, generator=torch.Generator().manual_seed(3)))
    scores = check_selection(model.gsu, inputs, batch)
    p = np.eye(128) + scorer.RESIDUAL_SCALE * scorer.residual.detach().double().numpy()
    for b, items in enumerate(history_items(block, batch)):
        target = scl[item_scl_row[block.target["item"][b]]].astype(np.float64)
        vectors = scl[item_scl_row[items]].astype(np.float64)
        want = unit(unit(vectors) @ p.T) @ unit(unit(target) @ p.T)
        np.testing.assert_allclose(scores.values[b, : len(items)].numpy(), want, atol=1e-5)
        present = (item_scl_row[items] != 0) & (item_scl_row[block.target["item"][b]] != 0)
        assert scores.scored[b, : len(items)].numpy().tolist() == present.tolist()
    # R is the projected cosine of the selected behaviors, with gradient to the projection.
    topk = model.gsu.select(inputs, batch)
    out = model.gsu(inputs, batch)
    for b in range(batch.batch_size):
        n = int(topk.lengths[b])
        torch.testing.assert_close(out.topk_scores[b, :n].detach(), scores.values[b, topk.indices[b, :n]])
    out.topk_scores.sum().backward()
    assert scorer.residual.grad is not None and scorer.residual.grad.abs().sum() > 0


def brute_union(first: tg.Scores, second: tg.Scores, mask: torch.Tensor) -> List[List[int]]:
    """MISS's documented rule: best rank in either list, then the more recent behavior."""
    num_rows, max_len = mask.shape
    orders = [brute_select(s.values, mask, s.scored, max_len) for s in (first, second)]
    out = []
    for b in range(num_rows):
        rank = {}
        for order in orders:
            for r, p in enumerate(order.indices[b, : int(order.lengths[b])].tolist()):
                rank[p] = min(rank.get(p, max_len), r)
        out.append(sorted(rank, key=lambda p: (rank[p], -p))[:K])
    return out


def test_miss_selection_is_the_union_rule():
    model, batch, inputs, *_ = setup("miss")
    scorer = model.gsu.scorer
    assert isinstance(scorer, tg.RankUnion)
    with torch.no_grad():
        first, second = scorer.first(inputs, batch), scorer.second(inputs, batch)
    topk = model.gsu.select(inputs, batch)
    want = brute_union(first, second, valid(inputs))
    for b in range(batch.batch_size):
        assert topk.indices[b, : int(topk.lengths[b])].tolist() == want[b]
    # Every selected behavior is in the top-K of at least one of the two GSUs.
    tops = [brute_select(s.values, valid(inputs), s.scored, K) for s in (first, second)]
    for b in range(batch.batch_size):
        either = set(tops[0].indices[b, : int(tops[0].lengths[b])].tolist()) | set(
            tops[1].indices[b, : int(tops[1].lengths[b])].tolist())
        assert set(want[b]) <= either


def test_union_rank_hand_example():
    """Lists [3, 1, 0, 2] and [1, 2, 3, 0] (best first): ranks 0 -> {3, 1}, then 1 -> {2}: K = 3 picks 3, 1, 2."""
    inputs = esu.SequenceInputs(
        target=torch.zeros(1, 2), topk=torch.zeros(0), topk_lengths=torch.zeros(0), topk_scores=torch.zeros(0),
        recent=torch.zeros(0), recent_lengths=torch.zeros(0), recent_scores=torch.zeros(0),
        history=torch.zeros(1, 5, 2), history_lengths=torch.tensor([4]),
    )

    class Fixed(tg.HistoryScorer):
        def __init__(self, values):
            super().__init__()
            self.values = torch.tensor([values])

        def forward(self, x, batch):
            return tg.Scores(self.values, None)

    union = tg.HistoryGSU(tg.RankUnion(Fixed([0.5, 0.8, 0.1, 0.9, 0.0]), Fixed([0.1, 0.9, 0.8, 0.5, 0.0])), k=3)
    topk = union.select(inputs, None)
    assert topk.indices.tolist() == [[3, 1, 2]] and topk.lengths.tolist() == [3]


def test_twin_gsu_scores_are_its_esu_attention_logits():
    model, batch, inputs, *_ = setup("twin")
    block = next(b for b in model.tower.blocks if isinstance(b, esu.TopKTargetAttention))
    assert model.gsu.scorer.attention is block.attention  # same module, same parameters
    scores = check_selection(model.gsu, inputs, batch)
    topk = model.gsu.select(inputs, batch)
    with torch.no_grad():
        selected = model.gsu(inputs, batch)
        esu_logits = block.attention.logits(selected.target, selected.topk)
    for b in range(batch.batch_size):
        n = int(topk.lengths[b])
        torch.testing.assert_close(esu_logits[b, :n], scores.values[b, topk.indices[b, :n]], rtol=1e-5, atol=1e-6)


def test_gradient_reaches_only_the_selected_behaviors():
    """The selection is not differentiated: the history gets gradient at the selected positions only,
    and TWIN's shared attention none through the GSU (it trains through the ESU)."""
    model, batch, inputs, *_ = setup("twin")
    inputs.history = inputs.history.clone().requires_grad_(True)
    out = model.gsu(inputs, batch)
    out.topk.sum().backward()
    topk = model.gsu.select(inputs, batch)
    selected = torch.zeros(inputs.history.shape[:2], dtype=torch.bool)
    for b in range(batch.batch_size):
        selected[b, topk.indices[b, : int(topk.lengths[b])]] = True
    assert torch.equal(inputs.history.grad.ne(0).any(dim=-1), selected)
    assert model.gsu.scorer.attention.query.weight.grad is None


def test_history_scores_placeholder_for_other_kinds():
    rng = np.random.default_rng(0)
    scl, item_scl_row = random_scl(rng)
    batch = BatchBuilder(scl, item_scl_row, gsu="scl_cosine", k=K, recent=RECENT, max_history=MAX_HISTORY)(
        random_block(rng, num_users=4, max_len=20))
    assert batch.hist_scores.shape == (batch.batch_size, 0)
    assert batch.hist_scl.numel() == 0 and batch.target_scl.numel() == 0 and batch.sample_user.numel() == 0


@pytest.mark.parametrize("method", ["sim_soft", "twin", "miss", "gsu_projection", "gsu_scl_id_cosine",
                                    "gsu_scl_id_attention"])
def test_empty_and_short_histories_are_padded(method: str):
    """Samples with fewer than K behaviors get fewer slots; padding is never selected."""
    model, batch, inputs, *_ = setup(method, seed=1)
    with torch.no_grad():
        out = model.gsu(inputs, batch)
    assert torch.equal(out.topk_lengths, inputs.history_lengths.clamp(max=K))
    assert int(inputs.history_lengths.min()) == 0
