"""How the dense part (everything but the sharded embedding tables) stays identical on every rank
(``train.dense_sync``).

- "allreduce" (default): no DDP. ``ReplicatedDense`` moves the dense part to the device and
  broadcasts its parameters and buffers from rank 0 once; ``GradientAverage``, a pre-step hook of the
  dense optimizer, averages its gradients over the ranks in one all-reduce of one flat buffer (with
  ``graphs``, ``GraphedAdam`` sums its graph's own flat gradient buffer through it instead).
- "ddp": TorchRec's default, the dense part wrapped in DistributedDataParallel (gradients
  all-reduced in buckets from hooks on every parameter during the backward).

Why "allreduce" by default: ``train.compile_mode: graphs`` captures the tower's CUDA graphs at the
first step, inside the model's forward, and CUDA refuses that capture inside DDP's forward
("operation would make the legacy stream depend on a capturing blocking stream", seen on an H100
with one NCCL rank, benchmarks/RESULTS.md row 58). With "allreduce" the GPU configs run "graphs"
on 2+ GPUs too: with the multi-rank dense path on one GPU, "allreduce" with "graphs" ran the model
step 1.18-1.23x "ddp" with "reduce-overhead" (rows 59, 61). The dense part is a few MB: one
all-reduce after the backward, not overlapped with it (its cost over 2+ GPUs is not measured
yet). On one rank neither runs
(nothing to average) unless asked for, to time or test the multi-rank path on one GPU.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DataParallelWrapper, DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.types import ShardedModule, ShardingEnv

from muse_torchrec.config import ConfigError

DENSE_SYNCS = ("allreduce", "ddp")


def check_dense_sync(name: str, compile_mode: str) -> None:
    """ConfigError for an unknown ``train.dense_sync``, or "ddp" with ``train.compile_mode: graphs``."""
    if name not in DENSE_SYNCS:
        raise ConfigError(f"train.dense_sync: unknown {name!r}; choose one of {list(DENSE_SYNCS)}")
    if name == "ddp" and compile_mode == "graphs":
        raise ConfigError("train.dense_sync: 'ddp' cannot run train.compile_mode 'graphs' (CUDA refuses to capture "
                          "the tower's graphs inside DDP's forward); use dense_sync 'allreduce' or another compile_mode")


def dense_states(module: nn.Module) -> Iterator[torch.Tensor]:
    """The parameters and buffers of ``module`` outside its sharded modules (each rank's own shards)."""
    if isinstance(module, ShardedModule):
        return
    yield from module.parameters(recurse=False)
    yield from module.buffers(recurse=False)
    for child in module.children():
        yield from dense_states(child)


class ReplicatedDense(DataParallelWrapper):
    """The dense part on the device, rank 0's parameters and buffers broadcast to every rank (as DDP
    does when it wraps a module); its gradients are averaged by ``GradientAverage``."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        # The dense modules were built on the host.
        module = dmp._dmp_wrapped_module.to(device)
        if env.world_size > 1:
            for tensor in dense_states(module):
                dist.broadcast(tensor.data, src=0, group=env.process_group)


class GradientAverage:
    """Optimizer pre-step hook: the gradients of the optimizer's parameters averaged over ``group``'s
    ranks, in place, in one all-reduce of one flat buffer. Every rank runs the same model on its own
    batch, so the same parameters have gradients everywhere (those without keep none)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.average_gradients(optimizer)

    def average_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """The gradients of ``optimizer``'s parameters averaged over the ranks, in place."""
        grads: List[torch.Tensor] = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        if len({g.dtype for g in grads}) != 1:
            raise TypeError(f"GradientAverage: one flat buffer needs one dtype, got {sorted({str(g.dtype) for g in grads})}")
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.sum_over_ranks(flat)
        flat.div_(self.world_size)
        torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)])

    def sum_over_ranks(self, flat: torch.Tensor) -> None:
        """Every rank's ``flat`` summed, in place (``GraphedAdam`` divides in its graph)."""
        dist.all_reduce(flat, group=self.group)


def dense_synchronisation(name: str, synchronised: bool) -> Tuple[DataParallelWrapper, Optional[GradientAverage]]:
    """DMP's wrapper of the dense part for ``train.dense_sync`` ``name`` (checked by ``check_dense_sync``),
    and the hook the dense optimizer needs (None: DDP averages in the backward, or nothing to average).
    ``synchronised``: the job has 2+ ranks, or one is asked to run the multi-rank path."""
    if not synchronised:
        return ReplicatedDense(), None
    if name == "ddp":
        return DefaultDataParallelWrapper(), None
    return ReplicatedDense(), GradientAverage()
