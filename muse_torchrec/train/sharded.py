"""Wrap a model built on ``meta`` in DistributedModelParallel with fused sparse + dense optimizers.

The sparse optimizer is attached with ``apply_optimizer_in_backward`` *before* planning, so the
planner's memory estimate includes optimizer state and DMP fuses it into the embedding kernels.

Gradient semantics: the dense gradients are averaged over ranks (``train.dense_sync``: one
all-reduce, or DDP) and TorchRec's backward all-to-all divides embedding-row gradients by the world
size (its default gradient division), so every parameter steps on the gradient of the mean of the
per-rank losses, as in one process on the concatenated batch (tests/test_sharded.py checks this
against an unsharded model).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Type

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from muse_torchrec.config import ExperimentConfig, ShardingConfig
from muse_torchrec.data.routing import RowWiseRouter
from muse_torchrec.model.muse import MuseTrain, compile_tower
from muse_torchrec.sharding import GIB, PlanReport, make_sharders, plan_model
from muse_torchrec.train.dense_sync import GradientAverage, check_dense_sync, dense_synchronisation
from muse_torchrec.train.direct_lookup import check_sparse_lookup, use_direct_lookup
from muse_torchrec.train.distributed import DistContext
from muse_torchrec.train.graphed_adam import GraphedAdam

SPARSE_OPTIMIZERS: Dict[str, Type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "rowwise_adagrad": RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}
# fbgemm has no fused Adam kernel for CPU tables.
CPU_SPARSE_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")


def embedding_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Parameters of the embedding collection (the sparse part)."""
    return {name: p for name, p in model.named_parameters() if ".sparse_arch.tables.embeddings." in name}


def attach_sparse_optimizer(model: nn.Module, name: str, lr: float, device_type: str) -> None:
    """Fuse ``name`` into the embedding tables' backward (also tells the planner the state size)."""
    if name not in SPARSE_OPTIMIZERS:
        raise ValueError(f"train.sparse_optimizer: unknown {name!r}; choose one of {sorted(SPARSE_OPTIMIZERS)}")
    if device_type == "cpu" and name not in CPU_SPARSE_OPTIMIZERS:
        raise ValueError(
            f"train.sparse_optimizer={name!r} has no fused CPU kernel in fbgemm; "
            f"on CPU use one of {CPU_SPARSE_OPTIMIZERS} (e.g. --set train.sparse_optimizer=rowwise_adagrad)"
        )
    params = list(embedding_parameters(model).values())
    if not params:
        raise ValueError("model has no embedding parameters to attach the sparse optimizer to")
    apply_optimizer_in_backward(SPARSE_OPTIMIZERS[name], params, {"lr": lr})


def with_device_memory(cfg: ShardingConfig, device: torch.device, reserved_bytes: int = 0) -> ShardingConfig:
    """Give the planner the GPU's real memory, less ``reserved_bytes`` kept for other data (e.g. the
    SCL table of the device GSU), when the config leaves it open (its default is 32 GiB, which sends
    a large table to UVM caching on an 80-141 GiB GPU)."""
    if device.type != "cuda" or cfg.hbm_gb is not None:
        return cfg
    return replace(cfg, hbm_gb=(torch.cuda.get_device_properties(device).total_memory - reserved_bytes) / GIB)


def dense_adam(params: List[nn.Parameter], lr: float, compile_mode: str, device: torch.device,
               average: Optional[GradientAverage] = None) -> torch.optim.Optimizer:
    """The dense parameters' Adam: on GPU the fused (single-kernel) one, which saves launches on a
    host-bound step, and with ``train.compile_mode: graphs`` its step replayed as a CUDA graph too.
    ``average``: the gradients averaged over the ranks before each step (in the graph's own buffer
    with ``graphs``, else by a pre-step hook)."""
    if compile_mode == "graphs" and device.type == "cuda":
        return GraphedAdam(params, average=average, lr=lr)
    optimizer = torch.optim.Adam(params, lr=lr, fused=device.type == "cuda")
    if average is not None:
        optimizer.register_step_pre_hook(average)
    return optimizer


@dataclass
class ShardedModel:
    model: DistributedModelParallel
    optimizer: CombinedOptimizer
    plan: PlanReport
    # How the embedding lookups run (train/direct_lookup.py), for the run's log.
    lookups: str
    # Routes the training batches' ids over the ranks ahead of the step (train.sparse_lookup: routed
    # on 2+ ranks, data/routing.py); None: the lookups distribute them themselves.
    router: Optional[RowWiseRouter] = None


def shard_model(model: nn.Module, cfg: ExperimentConfig, ctx: DistContext, reserved_bytes: int = 0,
                sync_dense_on_one_rank: bool = False, shard_as_on_several_ranks: bool = False) -> ShardedModel:
    """Plan collectively, shard with DMP, compile the dense tower (``train.compile_mode``), and build
    the combined (fused sparse + dense Adam) optimizer. ``reserved_bytes``: device memory the plan
    must leave free (data the training process keeps on the GPU besides the model).
    ``sync_dense_on_one_rank``: synchronise the dense part as ``train.dense_sync`` does on several ranks
    even when the job has one (the trainer does not there), so one GPU can test and time that path.
    ``shard_as_on_several_ranks``: plan the tables as ``sharding.constraints`` say even on one rank
    (the GPU configs: row-wise), so TorchRec's input and output distributions run as on several."""
    check_dense_sync(cfg.train.dense_sync, cfg.train.compile_mode)
    check_sparse_lookup(cfg.train.sparse_lookup, cfg.data.gsu_placement, cfg.train.exchange_slack)
    device_type = ctx.device.type
    compile_tower(model, cfg.train.compile_mode, ctx.device, pad_in_graphs=cfg.train.pipeline == "plain")
    attach_sparse_optimizer(model, cfg.train.sparse_optimizer, cfg.train.sparse_lr, device_type)
    sharders = make_sharders()
    report = plan_model(
        model,
        with_device_memory(cfg.sharding, ctx.device, reserved_bytes),
        world_size=ctx.world_size,
        compute_device=device_type,
        batch_size=cfg.train.batch_size,
        local_world_size=ctx.local_world_size,
        sharders=sharders,
        process_group=torch.distributed.GroupMember.WORLD,
        table_wise_on_one_rank=not shard_as_on_several_ranks,
    )
    wrapper, average = dense_synchronisation(cfg.train.dense_sync, ctx.world_size > 1 or sync_dense_on_one_rank)
    dmp = DistributedModelParallel(module=model, device=ctx.device, plan=report.plan, sharders=sharders,
                                   data_parallel_wrapper=wrapper)

    def dense_optimizer(params: List[nn.Parameter]) -> torch.optim.Optimizer:
        return dense_adam(params, cfg.train.dense_lr, cfg.train.compile_mode, ctx.device, average)

    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())), dense_optimizer)
    fixed_exchange = cfg.train.exchange_in_graphs and any(
        isinstance(m, MuseTrain) and m.exchanged_graphs is not None for m in model.modules())
    lookups, router = use_direct_lookup(dmp, cfg.train.sparse_lookup, cfg.train.pipeline,
                                        cfg.train.exchange_slack if fixed_exchange else None,
                                        cfg.train.route_unique_ids)
    return ShardedModel(model=dmp, optimizer=CombinedOptimizer([dmp.fused_optimizer, dense]), plan=report,
                        lookups=lookups, router=router)


@torch.no_grad()
def load_unsharded_state(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Copy a plain (unsharded, full-size) state dict into a sharded model, each rank its own shards.

    Used to start a sharded run from the same weights as an unsharded one, and to import exported
    weights. Every key of the sharded model must be present with the full shape.
    """
    for key, target in model.state_dict().items():
        if key not in state:
            raise KeyError(f"state has no entry for {key}")
        source = state[key]
        if isinstance(target, ShardedTensor):
            if tuple(source.shape) != tuple(target.size()):
                raise ValueError(f"{key}: shape {tuple(source.shape)} != sharded {tuple(target.size())}")
            for shard in target.local_shards():
                rows, cols = shard.metadata.shard_offsets
                n_rows, n_cols = shard.metadata.shard_sizes
                shard.tensor.copy_(source[rows:rows + n_rows, cols:cols + n_cols])
        else:
            target.copy_(source)
