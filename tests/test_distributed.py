"""Process-group lifetime: a completed block waits for every rank before the group goes; a failed one does not."""

from typing import List

import pytest
import torch.distributed as dist

import tiny_run
from muse_torchrec.train.distributed import distributed


def record_calls(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    """The barrier and destroy calls made on the real 1-rank group, in order."""
    calls: List[str] = []
    real_barrier, real_destroy = dist.barrier, dist.destroy_process_group

    def barrier(*args, **kwargs):
        calls.append("barrier")
        return real_barrier(*args, **kwargs)

    def destroy(*args, **kwargs):
        calls.append("destroy")
        return real_destroy(*args, **kwargs)

    monkeypatch.setattr(dist, "barrier", barrier)
    monkeypatch.setattr(dist, "destroy_process_group", destroy)
    return calls


def test_a_completed_block_waits_for_every_rank_then_destroys_the_group(monkeypatch):
    tiny_run.use_one_rank(monkeypatch)
    calls = record_calls(monkeypatch)
    with distributed("cpu") as ctx:
        assert dist.is_initialized() and ctx.world_size == 1
    assert calls == ["barrier", "destroy"]
    assert not dist.is_initialized()


def test_a_failed_block_destroys_the_group_without_waiting_and_raises(monkeypatch):
    tiny_run.use_one_rank(monkeypatch)
    calls = record_calls(monkeypatch)
    with pytest.raises(RuntimeError, match="rank failed"):
        with distributed("cpu"):
            raise RuntimeError("rank failed")
    assert calls == ["destroy"]
    assert not dist.is_initialized()
