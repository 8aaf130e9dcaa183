"""Shared-slot handover: batches through worker rings come back equal to the plain ones, slots are
reused only once freed, and misuse gets a clear error."""

from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch

from muse_torchrec.data.device_gsu import DeferredGsuBuilder
from muse_torchrec.data.packed import Packed
from muse_torchrec.data.slots import SlotReceiver, SlotRef, SlotTransform
from random_data import random_block, random_scl
from test_packed import assert_same, small_prepared


def _batches(count, seed=7, num_users=10, samples_per_user=3):
    """``count`` GsuBatches of ``num_users`` users each (random sizes: 1 to ``samples_per_user`` samples per user)."""
    rng = np.random.default_rng(seed)
    scl, item_scl_row = random_scl(rng)
    builder = DeferredGsuBuilder(scl, item_scl_row, recent=5, max_history=40, k=6)
    return [builder(random_block(rng, num_users=num_users, max_len=70, samples_per_user=samples_per_user))
            for _ in range(count)]


def _cross(item):
    """What a DataLoader worker's output becomes in the training process: shared tensors cross as shared."""
    return ForkingPickler.loads(ForkingPickler.dumps(item))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_slots_are_reused_and_batches_stay_equal(device):
    """Each batch moved as taken, its slot refilled at once: batches compared only at the end, so a
    copy that read its slot late would show."""
    batches = _batches(12, samples_per_user=1)
    transform = SlotTransform(lambda b: b, slots=3)
    crossed, buffers_sent = [], 0

    def hand_over(batch):
        nonlocal buffers_sent
        ref = transform(batch)
        buffers_sent += isinstance(ref, SlotRef) and ref.buffer is not None
        crossed.append(_cross(ref))

    for batch in batches[:2]:  # two in flight, as in a DataLoader
        hand_over(batch)
    following = iter(batches[2:])
    moved = []
    for ref in SlotReceiver(crossed):  # each batch moved as taken, then the worker packs the next
        moved.append(ref.to(torch.device(device), non_blocking=True))
        batch = next(following, None)
        if batch is not None:
            hand_over(batch)
    assert len(moved) == len(batches)
    for a, b in zip(batches, moved):
        assert_same(a, b.to(torch.device("cpu")))
    assert all(isinstance(c, SlotRef) for c in crossed)  # no batch needed a buffer of its own
    # Each slot's buffer crossed once (these batches are within 1.25x of each other: no slot grew).
    assert max(c.nbytes for c in crossed) < 1.25 * min(c.nbytes for c in crossed)
    assert buffers_sent == 3


def test_every_slot_held_hands_the_batch_over_in_its_own_buffer():
    batches = _batches(5)
    transform = SlotTransform(lambda b: b, slots=2)
    out = [transform(b) for b in batches]  # nothing moved: every slot stays held
    assert [type(o) for o in out] == [SlotRef, SlotRef, Packed, Packed, Packed]
    received = list(SlotReceiver(out))
    for a, b in zip(batches, received):
        assert_same(a, b.to(torch.device("cpu")))
    # Freed slots are used again, without sending their buffers a second time.
    again = transform(batches[0])
    assert isinstance(again, SlotRef) and again.buffer is None


def test_a_slot_grows_for_a_larger_batch_and_is_sent_again():
    small, large = _batches(1, seed=1, num_users=3)[0], _batches(1, seed=2, num_users=30)[0]
    transform = SlotTransform(lambda b: b, slots=1)
    first = transform(small)
    receiver = iter(SlotReceiver([first]))
    assert_same(small, next(receiver).to(torch.device("cpu")))
    grown = transform(large)
    assert grown.buffer is not None and grown.buffer.numel() >= grown.nbytes > first.nbytes
    assert_same(large, next(iter(SlotReceiver([grown]))).to(torch.device("cpu")))


def test_a_ref_is_moved_once_and_only_after_the_receiver():
    batch = _batches(2)
    transform = SlotTransform(lambda b: b, slots=2)
    first, second = transform(batch[0]), transform(batch[1])
    second.buffer = None  # as it crosses when the consumer already has the slot's buffer
    with pytest.raises(RuntimeError, match="never received"):
        list(SlotReceiver([second]))
    ref = next(iter(SlotReceiver([first])))
    ref.to(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="moved once"):
        ref.to(torch.device("cpu"))


def test_bad_slot_count():
    with pytest.raises(ValueError, match="slots must be >= 1"):
        SlotTransform(lambda b: b, slots=0)


def test_slot_loader_batches_equal_plain_ones(tmp_path):
    """Through real worker processes and two passes: the moved batches equal the plain ones."""
    from muse_torchrec.data.loader import make_loader

    data, builder = small_prepared(tmp_path)
    args = dict(num_workers=2, seed=3, shuffle=True)
    plain = list(make_loader(data, "train", 32, builder, **args))
    slots = SlotReceiver(make_loader(data, "train", 32, SlotTransform(builder, slots=2), **args))
    for _ in range(2):
        moved = [ref.to(torch.device("cpu")) for ref in slots]
        assert len(plain) == len(moved) > 4
        for a, b in zip(plain, moved):
            assert_same(a, b)
