"""Every method trains on tiny data: finite losses, gradients where they belong, the SCL table untouched."""

import math

import numpy as np
import pytest
import torch

import test_sharded as sharded_parity
from muse_torchrec.config import load_config
from muse_torchrec.data.batch import GSU_KINDS, WHOLE_HISTORY_KINDS, BatchBuilder, sequence_features
from muse_torchrec.features import SCL_DIM
from muse_torchrec.model import esu
from muse_torchrec.model.methods import METHODS, build_model, get_method
from muse_torchrec.model.trainable_gsu import HistoryGSU
from random_data import VOCAB, random_block, random_scl

K, RECENT, MAX_HISTORY, STEPS = 6, 5, 40, 3
SPARSE = (".sparse_arch.tables.embeddings.",)


def model_of(method: str):
    cfg = load_config(None, [f"model.method={method}", f"model.k={K}", "model.mlp=[32, 16]"])
    torch.manual_seed(0)
    return build_model(cfg.model, VOCAB, sequence_features(get_method(method).gsu), RECENT, MAX_HISTORY,
                       device=torch.device("cpu"))


def test_registry_is_consistent():
    labels = [m.label for m in METHODS.values()]
    assert len(set(labels)) == len(labels)
    for name, method in METHODS.items():
        assert method.gsu in GSU_KINDS, name
        model = model_of(name).model
        # A model-side GSU exactly when the builder hands over the whole history.
        assert isinstance(model.gsu, HistoryGSU) == (method.gsu in WHOLE_HISTORY_KINDS), name
    with pytest.raises(ValueError, match="unknown method"):
        get_method("nope")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_with_gradients_where_they_belong(method: str):
    rng = np.random.default_rng(0)
    scl, item_scl_row = random_scl(rng)
    scl_before = scl.copy()
    builder = BatchBuilder(scl, item_scl_row, gsu=get_method(method).gsu, k=K, recent=RECENT, max_history=MAX_HISTORY)
    batches = [builder(random_block(rng, num_users=8, max_len=60)) for _ in range(STEPS)]
    model = model_of(method)
    params = dict(model.named_parameters())
    # The frozen SCL table is not in the model: SCL vectors only reach it as int8 batch data. The
    # only SCL-wide weight any method has is the learned projection of the "projection" GSU variant.
    wide = [n for n, p in params.items() if SCL_DIM in p.shape]
    assert wide == (["model.gsu.scorer.residual"] if method == "gsu_projection" else []), wide
    sparse = [p for n, p in params.items() if any(s in n for s in SPARSE)]
    dense = [p for n, p in params.items() if not any(s in n for s in SPARSE)]
    opt_sparse, opt_dense = torch.optim.SGD(sparse, lr=0.5), torch.optim.Adam(dense, lr=0.01)
    losses = []
    for step, batch in enumerate(batches):
        opt_sparse.zero_grad()
        opt_dense.zero_grad()
        loss, _ = model(batch)
        loss.backward()
        losses.append(float(loss.detach()))
        if step == 0:
            for name, p in params.items():
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
                assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"
        opt_sparse.step()
        opt_dense.step()
    assert all(math.isfinite(x) for x in losses) and losses[0] != losses[-1]
    np.testing.assert_array_equal(scl, scl_before)


def test_twin_gsu_and_esu_share_one_attention():
    model = model_of("twin").model
    block = next(b for b in model.tower.blocks if isinstance(b, esu.TopKTargetAttention))
    assert model.gsu.scorer.attention is block.attention
    # Shared parameters are counted once (one optimizer entry, one place in the gradient all-reduce).
    names = [n for n, _ in model.named_parameters() if n.endswith("attention.query.weight")]
    assert len(names) == 2  # RecentTargetAttention's and the shared one


def test_only_parameter_free_gsus_select_before_the_lookup():
    """MUSE and SIM-hard look up top-K + recent ids; the trainable GSUs the whole history."""
    for name, method in METHODS.items():
        features = sequence_features(method.gsu)
        if method.gsu in ("scl_cosine", "category"):
            assert "item_topk" in features and "item_hist" not in features, name
        elif method.gsu in WHOLE_HISTORY_KINDS:
            assert "item_hist" in features and "item_topk" not in features, name


@pytest.mark.parametrize("gsu", GSU_KINDS)
def test_item_and_category_sequences_have_equal_lengths(gsu: str):
    """SparseArch concatenates item and category embeddings before padding: the builder must keep a
    behavior's item and category together in every sequence (not the target, padded separately)."""
    rng = np.random.default_rng(1)
    scl, item_scl_row = random_scl(rng)
    batch = BatchBuilder(scl, item_scl_row, gsu=gsu, k=K, recent=RECENT, max_history=MAX_HISTORY)(
        random_block(rng, num_users=8, max_len=60))
    seq = batch.sparse_features.to_dict()
    for name in ("recent", "topk", "hist"):
        if f"item_{name}" in seq:
            assert torch.equal(seq[f"item_{name}"].lengths(), seq[f"cate_{name}"].lengths()), name


@pytest.mark.parametrize("method", ["twin", "gsu_projection"])
def test_sharded_pipeline_matches_unsharded(tmp_path, method):
    """2 gloo ranks through TrainPipelineSparseDist (its fx tracer must keep the GSU a leaf) give the
    losses and parameters of an unsharded model."""
    sharded_parity.check_against_unsharded(tmp_path, method, "none", "sparse_dist", "allreduce")


def _padded(jt, length):
    """The plain reference: one feature's jagged rows padded to ``length`` ([B, length, D])."""
    return torch.ops.fbgemm.jagged_to_padded_dense(jt.values(), [jt.offsets()], [length], 0.0)


@pytest.mark.parametrize("widths", [[16, 8, 16, 4], [16, 16, 16]])
def test_single_ids_equals_padding_each_feature(widths):
    """The one padding of all single-id features equals padding and narrowing each on its own, and so
    do the gradients that flow back to each feature's values."""
    from torchrec.sparse.jagged_tensor import JaggedTensor

    from muse_torchrec.model.muse import single_id_columns, single_ids

    gen = torch.Generator().manual_seed(3)
    batch, dim = 7, 16
    features = []
    for _ in widths:
        lengths = torch.randint(0, 2, (batch,), generator=gen)
        values = torch.randn(int(lengths.sum()), dim, generator=gen, requires_grad=True)
        features.append(JaggedTensor(values=values, lengths=lengths))
    want = torch.cat([_padded(jt, 1).squeeze(1)[:, :w] for jt, w in zip(features, widths)], dim=1)
    columns = single_id_columns(widths, dim)
    assert (columns is None) == (widths == [dim] * len(widths))
    got = single_ids(features, columns)
    assert got.shape == (batch, sum(widths)) and torch.equal(got, want)
    assert got.eq(0).all(dim=1).logical_not().any() and (features[0].lengths() == 0).any()
    upstream = torch.randn(want.shape, generator=gen)
    want_grads = torch.autograd.grad(want, [jt.values() for jt in features], upstream)
    got_grads = torch.autograd.grad(got, [jt.values() for jt in features], upstream)
    for a, b in zip(want_grads, got_grads):
        assert torch.equal(a, b)


def test_narrow_side_tables_train_only_their_columns():
    """A side table narrower than the collection (the reference's D/2 profile tables) is read and
    trained through its first columns only; the rest never get a gradient."""
    rng = np.random.default_rng(1)
    scl, item_scl_row = random_scl(rng)
    batch = BatchBuilder(scl, item_scl_row, gsu="scl_cosine", k=K, recent=RECENT, max_history=MAX_HISTORY)(
        random_block(rng, num_users=8, max_len=60))
    model = model_of("muse")
    model(batch)[0].backward()
    grad = dict(model.named_parameters())["model.sparse_arch.tables.embeddings.profile_3.weight"].grad
    width = model.model.sparse_arch.side_dims["profile_3"]
    assert width < grad.shape[1]
    assert grad[:, :width].abs().sum() > 0 and grad[:, width:].abs().sum() == 0


def test_side_table_wider_than_the_item_table_is_refused():
    cfg = load_config(None, ["model.embeddings.dims={user: 32}"])
    with pytest.raises(ValueError, match="wider than the item table"):
        build_model(cfg.model, VOCAB, sequence_features("scl_cosine"), RECENT, MAX_HISTORY, device=torch.device("cpu"))
