"""pack / unpack: every batch kind crosses as one buffer and comes back equal, as views of it."""

import pickle

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from muse_torchrec.data.batch import GSU_KINDS, BatchBuilder
from muse_torchrec.data.device_gsu import DeferredGsuBuilder
from muse_torchrec.data.packed import Packed, PackingTransform, pack, unpack
from random_data import random_block, random_scl


def assert_same(a, b, path="batch"):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, KeyedJaggedTensor):
        assert a.keys() == b.keys(), path
        for part in ("values", "lengths"):
            assert_same(getattr(a, part)(), getattr(b, part)(), f"{path}.{part}")
        assert (a.weights_or_none() is None) == (b.weights_or_none() is None), path
        assert b._length_per_key == a.length_per_key(), path  # given to the rebuilt KJT, not computed
    elif hasattr(a, "__dataclass_fields__"):
        assert type(a) is type(b), path
        for name in a.__dataclass_fields__:
            assert_same(getattr(a, name), getattr(b, name), f"{path}.{name}")
    else:
        assert a == b, path


def _builders():
    rng = np.random.default_rng(5)
    scl, item_scl_row = random_scl(rng)
    builders = {kind: BatchBuilder(scl, item_scl_row, gsu=kind, k=6, recent=5, max_history=40, pad_to=60)
                for kind in GSU_KINDS}
    builders["deferred"] = DeferredGsuBuilder(scl, item_scl_row, recent=5, max_history=40, k=6)
    return builders, rng


@pytest.mark.parametrize("kind", [*GSU_KINDS, "deferred"])
def test_round_trip_through_a_process_boundary(kind):
    builders, rng = _builders()
    batch = builders[kind](random_block(rng, num_users=15, max_len=70))
    packed = pack(batch)
    crossed = pickle.loads(pickle.dumps(packed))
    assert isinstance(crossed, Packed) and crossed.buffer.dim() == 1 and crossed.buffer.dtype == torch.uint8
    rebuilt = crossed.to(torch.device("cpu"))
    assert_same(batch, rebuilt)
    # Views of the one buffer, each aligned for its dtype.
    storage = crossed.buffer.untyped_storage().data_ptr()
    for tensor in (rebuilt.batch if kind == "deferred" else rebuilt).__dict__.values():
        if isinstance(tensor, torch.Tensor) and tensor.numel():
            assert tensor.untyped_storage().data_ptr() == storage
            assert (tensor.data_ptr() - storage) % tensor.element_size() == 0


def test_odd_dtypes_shapes_and_plain_values():
    from dataclasses import dataclass

    @dataclass
    class Mixed:
        a: torch.Tensor
        b: torch.Tensor
        c: torch.Tensor
        n: int
        none: object

    mixed = Mixed(torch.tensor([True, False, True]), torch.arange(7, dtype=torch.int16).view(7, 1),
                  torch.zeros(0, 128, dtype=torch.int8), 3, None)
    assert_same(mixed, unpack(pack(mixed)))


def small_prepared(tmp_path):
    """A small prepared set under ``tmp_path`` and a MUSE batch builder for it."""
    from muse_torchrec.config import SynthConfig
    from muse_torchrec.data.loader import PreparedData
    from muse_torchrec.data.prepare import prepare
    from muse_torchrec.data.synthetic import synthesize

    synthesize(tmp_path / "raw", SynthConfig(train_users=60, test_users=20, num_items=500, seed=2))
    prepare(tmp_path / "raw", tmp_path / "prepared", max_history=50, progress=False)
    data = PreparedData(tmp_path / "prepared")
    return data, BatchBuilder(data.scl_vectors(), data.item_scl_row(), gsu="scl_cosine", k=6, recent=5, max_history=50)


def test_packed_loader_batches_equal_plain_ones(tmp_path):
    """Through real worker processes: the packed batches, moved, equal the plain ones."""
    from muse_torchrec.data.loader import make_loader

    data, builder = small_prepared(tmp_path)
    args = dict(num_workers=2, seed=3, shuffle=True)
    plain = list(make_loader(data, "train", 64, builder, **args))
    packed = list(make_loader(data, "train", 64, PackingTransform(builder), **args))
    assert len(plain) == len(packed) > 1
    for a, b in zip(plain, packed):
        assert isinstance(b, Packed)
        assert_same(a, b.to(torch.device("cpu")))
