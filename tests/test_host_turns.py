"""The training thread's turns at the GIL: the plain step is busy but for its backward, and the data
path's thread ahead starts a batch only when it is not."""

import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from muse_torchrec.data.device_gsu import DeviceGsu, DeferredGsuBuilder
from muse_torchrec.host_turns import TRAINING_TURNS, Turns
from muse_torchrec.train.step import PlainStep
from random_data import random_block, random_scl


def test_its_turn_waits_while_busy_and_not_otherwise():
    turns = Turns()
    assert turns.its_turn(timeout_s=0) and not turns.is_busy()
    waited = []
    with turns.busy():
        waiter = threading.Thread(target=lambda: waited.append((turns.its_turn(timeout_s=30), time.monotonic())))
        waiter.start()
        time.sleep(0.3)
        assert turns.is_busy() and not waited
        left = time.monotonic()
    waiter.join(timeout=30)
    assert waited[0][0] and waited[0][1] >= left


def test_busy_ends_when_its_block_raises_and_a_wait_has_a_bound():
    turns = Turns()
    with pytest.raises(RuntimeError):
        with turns.busy():
            raise RuntimeError("the step failed")
    assert not turns.is_busy()
    with turns.busy():
        assert not turns.its_turn(timeout_s=0.05)


class _Recorded(torch.autograd.Function):
    """The identity; its backward records whether the training thread was busy."""

    @staticmethod
    def forward(ctx, x, seen):
        ctx.seen = seen
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.seen.append(("backward", TRAINING_TURNS.is_busy()))
        return grad, None


class _Model(nn.Module):
    def __init__(self, seen):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))
        self.seen = seen

    def forward(self, batch):
        self.seen.append(("forward", TRAINING_TURNS.is_busy()))
        loss = _Recorded.apply(self.weight * batch, self.seen).sum()
        return loss, (loss.detach(), loss.detach(), loss.detach())


class _Batch:
    def __init__(self, x):
        self.x = x

    def to(self, device, non_blocking=False):
        return self.x.to(device)


def test_plain_step_is_busy_but_for_its_backward():
    seen = []
    model = _Model(seen)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.register_step_pre_hook(lambda *_: seen.append(("optimizer", TRAINING_TURNS.is_busy())))
    PlainStep(model, optimizer, torch.device("cpu")).progress(iter([_Batch(torch.arange(3.0))]))
    assert seen == [("forward", True), ("backward", False), ("optimizer", True)]
    assert not TRAINING_TURNS.is_busy()


def test_gsu_ahead_starts_no_batch_while_the_training_thread_is_busy():
    rng = np.random.default_rng(5)
    scl, item_scl_row = random_scl(rng)
    builder = DeferredGsuBuilder(scl, item_scl_row, recent=5, max_history=40, k=6)
    raws = [builder(random_block(rng, num_users=4, max_len=30)) for _ in range(3)]
    batches = []
    with TRAINING_TURNS.busy():  # as the plain step's forward
        consumer = threading.Thread(
            target=lambda: batches.extend(DeviceGsu(scl, item_scl_row, torch.device("cpu"), k=6).ahead(raws, depth=1)))
        consumer.start()
        time.sleep(0.5)
        assert not batches
    consumer.join(timeout=60)
    assert len(batches) == 3
