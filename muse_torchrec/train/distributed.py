"""Process-group setup: one code path from 1 CPU process (gloo) to N GPUs over M nodes (NCCL).

Launchers (torchrun, torchx ``dist.ddp``-style components) set RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Without them we start a single-process group, so the
same DMP code runs in a plain ``python`` process and in tests.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistContext:
    """Initialise (or reuse) the default process group; the device comes from LOCAL_RANK, never RANK."""
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    world_size = dist.get_world_size()
    return DistContext(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
        device=dev,
        backend=backend,
    )


def all_reduce_int(value: int, op: dist.ReduceOp, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=op)
    return int(t.item())


def shutdown(wait_for_ranks: bool = True) -> None:
    """Destroy the process group; with ``wait_for_ranks`` (the end of a successful run), after a barrier,
    so that no rank ends (rank 0 may host the store the group met through) while another still works
    in the group. Error paths pass False: a failed rank must not wait for the others.

    The group's gloo threads outlive this (the group has no shutdown of its own), and may still
    release a collective's tensors: processes that used gloo end with ``end_process``, which says why.
    """
    if not dist.is_initialized():
        return
    if wait_for_ranks:
        dist.barrier()
    dist.destroy_process_group()


@contextmanager
def distributed(device: str = "auto") -> Iterator[DistContext]:
    """``init_distributed`` for a block of work; ``shutdown`` after it, waiting for the other ranks
    only when the block completed."""
    ctx = init_distributed(device)
    try:
        yield ctx
    except BaseException:
        shutdown(wait_for_ranks=False)
        raise
    shutdown()
