"""record_each_block: a batch's memory recorded on a stream once per allocation, every allocation."""

import numpy as np
import torch

from muse_torchrec.data.device_gsu import DeferredGsuBuilder
from muse_torchrec.data.packed import pack, unpack
from muse_torchrec.data.streams import record_each_block, tensors_of
from random_data import random_block, random_scl


def _gsu_batch():
    rng = np.random.default_rng(3)
    scl, item_scl_row = random_scl(rng)
    return DeferredGsuBuilder(scl, item_scl_row, recent=5, max_history=40, k=6)(random_block(rng, num_users=7, max_len=60))


def _recorded_storages(monkeypatch, obj):
    recorded = []
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: recorded.append(tensor))
    record_each_block(obj, stream=None)
    return recorded


def test_tensors_of_finds_every_tensor_of_a_nested_batch():
    raw = _gsu_batch()
    kjt = raw.batch.sparse_features
    found = {id(t) for t in tensors_of(raw)}
    expected = [kjt.values(), kjt.lengths(), raw.batch.topk_scores, raw.batch.labels, raw.batch.sample_user,
                raw.hist_items, raw.hist_lengths, raw.topk_slots, raw.user_rank]
    assert all(id(t) in found for t in expected)
    plain_fields = sum(isinstance(v, torch.Tensor) for v in vars(raw).values())
    batch_fields = sum(isinstance(v, torch.Tensor) for v in vars(raw.batch).values())
    assert len(found) == plain_fields + batch_fields + 2  # + the KJT's values and lengths


def test_a_packed_batch_is_recorded_once_and_separate_tensors_each(monkeypatch):
    rebuilt = unpack(pack(_gsu_batch()))
    assert len(_recorded_storages(monkeypatch, rebuilt)) == 1  # every tensor a view of the one buffer
    separate = _gsu_batch()
    recorded = _recorded_storages(monkeypatch, separate)
    storages = {t.untyped_storage().data_ptr() for t in tensors_of(separate)}
    assert len(recorded) == len(storages) > 10
    assert {t.untyped_storage().data_ptr() for t in recorded} == storages
