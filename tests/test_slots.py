"""Shared-slot handover: batches through worker rings come back equal to the plain ones, slots are
reused only once freed, and misuse gets a clear error."""

import threading
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch

from muse_torchrec.data.device_gsu import DeferredGsuBuilder
from muse_torchrec.data.packed import Packed
from muse_torchrec.data.slots import PageLockedSlots, SlotReceiver, SlotRef, SlotTransform
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
    for ref in SlotReceiver(crossed, torch.device(device)):  # each batch moved as taken, then the worker packs the next
        moved.append(ref.to(torch.device(device), non_blocking=True))
        if device == "cuda":
            # A page-locked slot is freed once its copy is done, seen at the receiver's next batch:
            # done copies keep the worker on its slots (the deferral itself is tested below).
            torch.cuda.synchronize()
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locking needs a GPU")
def test_a_page_locked_slot_is_freed_only_once_its_copy_is_done():
    """The copy is held up behind a long kernel: the slot stays held until it is done, and the moved
    batch is the one the slot held, even though the worker refills the slot at once after."""
    batches = _batches(3)
    transform = SlotTransform(lambda b: b, slots=1)
    first = _cross(transform(batches[0]))
    device = torch.device("cuda")
    receiver = iter(SlotReceiver([first, _cross(transform(batches[1]))], device))
    ref = next(receiver)
    buffer = ref.buffer
    assert ref.page_locked is not None and buffer.is_pinned()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time ahead of the copy
    moved = ref.to(device, non_blocking=True)
    assert first.flags[0] == 1 and len(ref.page_locked.copying) == 1
    ref.page_locked.free_copied()
    assert first.flags[0] == 1  # the copy is still waiting behind the kernel
    torch.cuda.synchronize()
    ref.page_locked.free_copied()
    assert first.flags[0] == 0
    refill = transform(batches[2])  # the worker reuses the freed slot
    assert isinstance(refill, SlotRef) and refill.slot == 0
    assert_same(batches[0], moved.to(torch.device("cpu")))
    assert isinstance(next(receiver), Packed)  # the second batch came while the one slot was held
    assert next(receiver, None) is None and not buffer.is_pinned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locking needs a GPU")
def test_the_pass_end_waits_for_copies_frees_slots_and_unlocks():
    batches = _batches(2)
    transform = SlotTransform(lambda b: b, slots=2)
    crossed = [_cross(transform(b)) for b in batches]
    device = torch.device("cuda")
    moved, buffers = [], []
    for ref in SlotReceiver(crossed, device):
        buffers.append(ref.buffer)
        torch.cuda._sleep(200_000_000)
        moved.append(ref.to(device, non_blocking=True))
    assert crossed[0].flags.tolist() == [0, 0]
    assert not any(b.is_pinned() for b in buffers)
    for a, b in zip(batches, moved):
        assert_same(a, b.to(torch.device("cpu")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locking needs a GPU")
def test_a_refused_page_lock_warns_and_leaves_cuda_working():
    """CUDA refuses to lock a buffer twice: a warning, the slot then copies from pageable memory, and
    the refusal does not surface as an error in a later CUDA call."""
    page_locked = PageLockedSlots(torch.device("cuda"))
    buffer = torch.zeros(1 << 20, dtype=torch.uint8).share_memory_()
    assert page_locked.lock(buffer)
    with pytest.warns(UserWarning, match="cuMemHostRegister. failed"):
        assert not page_locked.lock(buffer)
    assert not page_locked.lock(torch.zeros(16, dtype=torch.uint8))  # no further tries this pass
    assert (torch.ones(4, device="cuda") + 1).sum().item() == 8
    page_locked.release()
    assert not buffer.is_pinned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locking needs a GPU")
def test_a_thread_new_to_cuda_page_locks_a_slot():
    """The GSU thread may meet its first slot before any CUDA call of its own."""
    page_locked = PageLockedSlots(torch.device("cuda"))
    buffer = torch.zeros(1 << 20, dtype=torch.uint8).share_memory_()
    results = []
    thread = threading.Thread(target=lambda: results.append(page_locked.lock(buffer)))
    thread.start()
    thread.join()
    assert results == [True] and buffer.is_pinned()
    page_locked.release()
    assert not buffer.is_pinned()
