"""The padding of the lookups in static shapes (``SparseArch.rows`` + ``SparseArch.padded``, what
``compile_tower``'s "graphs" captures with the tower) against ``SparseArch.forward``'s
jagged-to-padded conversion, its reference: equal tensors and equal table gradients on random
batches of several methods, whatever lookup runs; batches it cannot place are refused. On a CUDA
GPU, a model trained with the padding in the graphs follows one whose graphs hold the tower only."""

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_data import VOCAB, random_block, random_scl  # noqa: E402

from muse_torchrec.config import load_config  # noqa: E402
from muse_torchrec.data.batch import BatchBuilder, sequence_features  # noqa: E402
from muse_torchrec.model.methods import build_model, get_method  # noqa: E402
from muse_torchrec.model.muse import MuseModel, compile_tower  # noqa: E402
from muse_torchrec.model.row_layout import RowLayout, padded_slots, row_starts  # noqa: E402

BATCH, K, RECENT, MAX_HISTORY = 24, 6, 5, 40
FIELDS = ("target", "topk", "topk_lengths", "recent", "recent_lengths")


def _model(method: str, device: torch.device = torch.device("cpu"), seed: int = 0, dims: str = ""):
    overrides = [f"model.method={method}", f"model.k={K}", f"data.recent={RECENT}", "model.mlp=[16]"]
    cfg = load_config(None, overrides + ([f"model.embeddings.dims={dims}"] if dims else []))
    torch.manual_seed(seed)
    features = sequence_features(get_method(method).gsu)
    return build_model(cfg.model, VOCAB, features, RECENT, MAX_HISTORY, device=device).to(device)


def _batch(method: str, seed: int, device: torch.device = torch.device("cpu")):
    rng = np.random.default_rng(seed)
    builder = BatchBuilder(*random_scl(rng), gsu=get_method(method).gsu, k=K, recent=RECENT,
                           max_history=MAX_HISTORY, pad_to=BATCH)
    return builder(random_block(rng, num_users=8, max_len=60)).to(device)


def _outputs(arch, batch, padded: bool):
    """The arch's tensors for the tower, by ``padded(rows(...))`` or by ``forward``."""
    if not padded:
        return arch(batch)
    return arch.padded(*arch.rows(batch), batch.topk_scores, batch.recent_scores)


def _table_grads(arch, inputs, side, seed: int):
    """Gradients of every table from a random linear function of the tensors the tower reads."""
    tensors = [getattr(inputs, f) for f in FIELDS if getattr(inputs, f).is_floating_point()] + [side]
    g = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=g)).sum() for t in tensors)
    return torch.autograd.grad(loss, list(arch.tables.parameters()))


@pytest.mark.parametrize("method", ["muse", "din", "sim_hard", "sim_soft"])
@pytest.mark.parametrize("seed", [1, 2])
def test_padded_rows_equal_the_jagged_to_padded_conversion(method, seed):
    arch = _model(method).model.sparse_arch
    assert arch.single_columns is not None  # narrower side tables (the default): the column selection runs
    _check_equal(arch, method, seed)


def test_padded_rows_equal_the_conversion_with_every_table_as_wide():
    arch = _model("muse", dims="{}").model.sparse_arch
    assert arch.single_columns is None
    _check_equal(arch, "muse", 5)


def _check_equal(arch, method: str, seed: int) -> None:
    batch = _batch(method, seed)
    (want, want_side), (got, got_side) = (_outputs(arch, batch, padded) for padded in (False, True))
    assert torch.equal(got_side, want_side)
    for name in FIELDS:
        a, b = getattr(want, name), getattr(got, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert want.recent_lengths.min() < RECENT and want.recent_lengths.max() > 0  # padding and ids both met
    want_grads = _table_grads(arch, want, want_side, seed)
    got_grads = _table_grads(arch, got, got_side, seed)
    assert any(bool(g.abs().sum() > 0) for g in want_grads)
    for a, b in zip(want_grads, got_grads):
        assert torch.equal(a, b)


def test_rows_are_padded_with_zeros_to_the_capacity():
    arch = _model("muse").model.sparse_arch
    batch = _batch("muse", 3)
    rows, order, lengths = arch.rows(batch)
    ids = batch.sparse_features.values().numel()
    assert rows.shape == (arch.row_layout.capacity(BATCH) + 1, 16)
    assert torch.equal(order, torch.arange(rows.shape[0]))  # a lookup of this rank alone: in the ids' order
    assert ids < rows.shape[0] - 1 and not rows[ids:].any() and rows[:ids].abs().sum(dim=1).min() > 0
    assert torch.equal(lengths, batch.sparse_features.lengths())


def test_padded_slots_gathers_each_samples_ids():
    """Two features of 3 samples (lengths 2, 0, 3), each id's row its own number: slot j of sample b
    reads row start(b) + j below the length, the zero row beyond."""
    lengths = torch.tensor([2, 0, 3, 2, 0, 3], dtype=torch.int32)
    rows = torch.cat([torch.arange(1.0, 11.0).unsqueeze(1), torch.zeros(1, 1)])  # [11, 1], row 10 zero
    starts, per_feature = row_starts(lengths, 2)
    assert starts.tolist() == [[0, 2, 2], [5, 7, 7]]
    got = padded_slots(rows, torch.arange(11), starts, per_feature, [0, 1], 4)
    assert got.tolist() == [[[1, 6], [2, 7], [0, 0], [0, 0]],
                            [[0, 0], [0, 0], [0, 0], [0, 0]],
                            [[3, 8], [4, 9], [5, 10], [0, 0]]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_padded_slots_read_rows_in_any_order_through_their_order(seed):
    """Rows in a random order with the row of each id (as a routed lookup gives them, the zero rows
    anywhere) gather what the rows in the ids' order gather, and their gradients are those rows'
    gradients in that order."""
    g = torch.Generator().manual_seed(seed)
    features, samples, width, dim = 3, 7, 4, 5
    lengths = torch.randint(0, width + 1, (features * samples,), generator=g, dtype=torch.int32)
    ids = int(lengths.sum())
    in_order = torch.cat([torch.randn(ids, dim, generator=g), torch.zeros(3, dim)]).requires_grad_()
    placed = torch.randperm(ids + 3, generator=g)  # where each row of ``in_order`` lies in ``shuffled``
    shuffled = torch.empty_like(in_order).index_copy(0, placed, in_order.detach()).requires_grad_()
    starts, per_feature = row_starts(lengths, features)
    want = padded_slots(in_order, torch.arange(ids + 3), starts, per_feature, [0, 2], width)
    got = padded_slots(shuffled, placed, starts, per_feature, [0, 2], width)
    assert torch.equal(got, want) and got.abs().sum() > 0
    weights = torch.randn(want.shape, generator=g)
    (want_grad,), (got_grad,) = (torch.autograd.grad((out * weights).sum(), rows)
                                 for out, rows in ((want, in_order), (got, shuffled)))
    assert torch.equal(got_grad[placed], want_grad) and want_grad.abs().sum() > 0


def test_layout_counts_every_features_slots():
    layout = _model("muse").model.sparse_arch.row_layout
    assert dict(zip(layout.keys, layout.slots)) == {
        "item_target": 1, "item_topk": K, "item_recent": RECENT, "cate_target": 1, "cate_topk": K,
        "cate_recent": RECENT, **{name: 1 for name in ("user", "profile_1", "profile_2", "profile_3", "profile_4",
                                                        "profile_5", "item_city", "item_province")}}
    assert layout.capacity(10) == 10 * (2 * (1 + K + RECENT) + 8)
    assert RowLayout.of(["b", "a"], {"a": 3, "b": 1}).slots == (1, 3)


def test_rows_refuse_batches_they_cannot_place():
    arch = _model("muse").model.sparse_arch
    batch = _batch("muse", 4)
    features = batch.sparse_features
    keys = features.keys()
    with pytest.raises(ValueError, match="not in the collection's order"):
        arch.rows(replace(batch, sparse_features=features.permute(list(reversed(range(len(keys)))))))
    # One id more than its slots for every sample of every feature: more rows than the capacity.
    lengths = torch.tensor([slots + 1 for slots in arch.row_layout.slots], dtype=torch.int32).repeat_interleave(BATCH)
    crowded = KeyedJaggedTensor(keys=keys, values=torch.ones(int(lengths.sum()), dtype=torch.int64), lengths=lengths)
    with pytest.raises(ValueError, match=f"more than the {arch.row_layout.capacity(BATCH)} its features hold"):
        arch.rows(replace(batch, sparse_features=crowded))


def test_models_with_a_model_side_gsu_keep_the_padding_outside():
    assert _model("muse").model.pads_in_graphs and _model("din").model.pads_in_graphs
    assert not _model("sim_soft").model.pads_in_graphs  # the whole history, a GSU with parameters


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["muse", "din"])
def test_padding_in_the_graphs_trains_as_the_tower_graphs(method):
    """Six SGD steps over every parameter (tables included) on random batches: the losses,
    parameters and eval logits of a model whose graphs start from the looked-up rows follow those of
    one whose graphs hold the tower only (the padding outside, eager). SGD: Adam would turn the
    compiled kernels' rounding differences on near-zero gradients into whole steps."""
    cuda = torch.device("cuda")
    models = {}
    for pad_in_graphs in (False, True):
        model = _model(method, cuda)
        compile_tower(model, "graphs", cuda, pad_in_graphs=pad_in_graphs)
        models[pad_in_graphs] = model
    muse = {p: next(m for m in model.modules() if isinstance(m, MuseModel)) for p, model in models.items()}
    optimizers = {p: torch.optim.SGD(model.parameters(), lr=0.1) for p, model in models.items()}
    for step in range(6):
        batch = _batch(method, 10 + step, cuda)
        losses = {}
        for p, model in models.items():
            optimizers[p].zero_grad()
            loss = model(batch)[0]
            loss.backward()
            optimizers[p].step()
            losses[p] = loss.detach()
        torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)
    # From the rows: the MuseTrain's graph (the padding, the tower, the loss, forward and backward);
    # else the tower's own.
    assert models[True].graphs.graph is not None and muse[True].tower.graphs is None
    assert models[False].graphs is None and muse[False].tower.graphs.graphed is not None
    for (name, a), b in zip(models[False].state_dict().items(), models[True].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        for model in models.values():
            model.eval()
        batch = _batch(method, 30, cuda)
        torch.testing.assert_close(models[True](batch)[1][1], models[False](batch)[1][1], rtol=1e-5, atol=1e-6)
