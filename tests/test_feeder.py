"""ProcessFeeder (CPU: the same path through shared memory): batches arrive whole and in order; the
feeder's failure, or its death, is raised in the consumer; closing early ends the feeder."""

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from muse_torchrec.data.feeder import ProcessFeeder  # noqa: E402

CPU = torch.device("cpu")


@dataclass
class _Batch:
    ids: KeyedJaggedTensor
    scores: torch.Tensor
    step: int


def _batch(step: int) -> _Batch:
    g = torch.Generator().manual_seed(step)
    lengths = torch.randint(0, 4, (6,), generator=g, dtype=torch.int32)
    values = torch.randint(0, 1000, (int(lengths.sum()),), generator=g)
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=values, lengths=lengths,
                            length_per_key=[int(lengths[:3].sum()), int(lengths[3:].sum())])
    return _Batch(ids=kjt, scores=torch.rand(3, 5, generator=g), step=step)


def numbered(count: int, fail_at: int = -1, die_at: int = -1):
    for step in range(count):
        if step == fail_at:
            raise ValueError(f"bad batch {step}")
        if step == die_at:
            os._exit(3)
        yield _batch(step)


def test_batches_arrive_whole_and_in_order():
    got = list(ProcessFeeder(numbered, (7,), CPU))
    assert [b.step for b in got] == list(range(7))
    for b in got:
        want = _batch(b.step)
        assert b.ids.keys() == want.ids.keys() and b.ids.length_per_key() == want.ids.length_per_key()
        assert torch.equal(b.ids.values(), want.ids.values()) and torch.equal(b.ids.lengths(), want.ids.lengths())
        assert torch.equal(b.scores, want.scores)


def test_a_failure_in_the_feeder_is_raised_here_after_the_batches_before_it():
    seen = []
    with pytest.raises(RuntimeError, match="(?s)the feeder process failed.*ValueError: bad batch 2"):
        for b in ProcessFeeder(numbered, (5, 2), CPU):
            seen.append(b.step)
    assert seen == [0, 1]


def test_a_feeder_that_dies_is_noticed():
    with pytest.raises(RuntimeError, match=r"ended without finishing its batches \(exit code 3\)"):
        list(ProcessFeeder(numbered, (5, -1, 1), CPU))


def test_closing_early_ends_the_feeder():
    feeder = ProcessFeeder(numbered, (1000,), CPU, depth=2)
    batches = iter(feeder)
    assert next(batches).step == 0
    process = feeder.process
    start = time.monotonic()
    batches.close()
    assert feeder.process is None and not process.is_alive() and process.exitcode == 0
    assert time.monotonic() - start < 10
