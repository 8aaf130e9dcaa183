"""Sharding: sharders, planner topology and constraints, plan inspection with per-rank memory.

Works without GPUs: a plan for N CUDA ranks is computed on a laptop from a model built on the
``meta`` device (no memory is allocated for the tables).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError, ShardingOption
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType

from muse_torchrec import features as F
from muse_torchrec.config import ShardingConfig

GIB = 1024**3


class CpuSafeEmbeddingCollectionSharder(EmbeddingCollectionSharder):
    """On CPU, data-parallel EmbeddingCollection is wrong (the dense CPU kernel sum-pools): drop it."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu":
            types = [t for t in types if t != ShardingType.DATA_PARALLEL.value]
        return types


def make_sharders(fused_params: Optional[Dict[str, object]] = None) -> List[ModuleSharder[nn.Module]]:
    return [CpuSafeEmbeddingCollectionSharder(fused_params=fused_params)]


def make_constraints(cfg: ShardingConfig, world_size: int,
                     table_wise_on_one_rank: bool = True) -> Dict[str, ParameterConstraints]:
    """Per-table planner constraints from the config (tables not listed are unconstrained).

    With one rank every table is table-wise, whatever the config asks (unless
    ``table_wise_on_one_rank`` is False: benchmarks time one rank sharded as several are): the rank
    holds whole tables either way, and row-wise sharding there only adds a bucketization and
    permutes to every step (table-wise measured 1.24-1.28x samples/s on one H100,
    benchmarks/RESULTS.md row 17).
    """
    constraints = {
        table: ParameterConstraints(
            sharding_types=list(c.sharding_types) or None,
            compute_kernels=list(c.compute_kernels) or None,
        )
        for table, c in cfg.constraints.items()
    }
    if world_size == 1 and table_wise_on_one_rank:
        for table in F.TABLES:
            kernels = constraints[table.name].compute_kernels if table.name in constraints else None
            constraints[table.name] = ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value],
                                                           compute_kernels=kernels)
    return constraints


def make_topology(
    world_size: int,
    compute_device: str,
    local_world_size: Optional[int] = None,
    hbm_gb: Optional[float] = None,
    ddr_gb: Optional[float] = None,
) -> Topology:
    """Topology of ``world_size`` ranks, ``local_world_size`` per node; capacities in GiB or the defaults."""
    kwargs = {}
    if hbm_gb is not None:
        kwargs["hbm_cap"] = int(hbm_gb * GIB)
    if ddr_gb is not None:
        kwargs["ddr_cap"] = int(ddr_gb * GIB)
    return Topology(
        world_size=world_size,
        compute_device=compute_device,
        local_world_size=local_world_size or world_size,
        **kwargs,
    )


@dataclass
class PlannedShard:
    table: str
    sharding_type: str
    compute_kernel: str
    rank: int
    rows: int
    cols: int
    hbm_bytes: int
    ddr_bytes: int


@dataclass
class PlanReport:
    """A plan and the planner's storage estimate of every shard (weights + optimizer state + buffers)."""

    plan: ShardingPlan
    shards: List[PlannedShard]
    world_size: int

    def per_rank_bytes(self) -> Dict[int, Dict[str, int]]:
        out = {r: {"hbm": 0, "ddr": 0} for r in range(self.world_size)}
        for s in self.shards:
            out[s.rank]["hbm"] += s.hbm_bytes
            out[s.rank]["ddr"] += s.ddr_bytes
        return out

    def format(self) -> str:
        """Human-readable plan: table -> sharding type, kernel, ranks; then memory per rank."""
        lines = [f"{'table':<16} {'sharding':<14} {'kernel':<20} {'rows x dim':>18}  ranks"]
        by_table: Dict[str, List[PlannedShard]] = {}
        for s in self.shards:
            by_table.setdefault(s.table, []).append(s)
        for table, shards in by_table.items():
            first = shards[0]
            rows = sum(s.rows for s in shards) if first.sharding_type in ("row_wise", "table_row_wise") else first.rows
            ranks = sorted({s.rank for s in shards})
            lines.append(
                f"{table:<16} {first.sharding_type:<14} {first.compute_kernel:<20} "
                f"{rows:>11,} x {first.cols:<4}  {_ranks_text(ranks)}"
            )
        lines.append("")
        lines.append(f"{'rank':<6} {'device mem (GiB)':>17} {'host mem (GiB)':>15}")
        for rank, mem in self.per_rank_bytes().items():
            lines.append(f"{rank:<6} {mem['hbm'] / GIB:>17.2f} {mem['ddr'] / GIB:>15.2f}")
        return "\n".join(lines)


def _ranks_text(ranks: List[int]) -> str:
    if len(ranks) > 3 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def _report(planner: EmbeddingShardingPlanner, plan: ShardingPlan, world_size: int) -> PlanReport:
    # The planner keeps its chosen sharding options (with per-shard storage estimates) in
    # ``_best_plan``; the public ShardingPlan drops the estimates.
    options: List[ShardingOption] = getattr(planner, "_best_plan", None) or []
    shards = [
        PlannedShard(
            table=o.name,
            sharding_type=o.sharding_type,
            compute_kernel=o.compute_kernel,
            rank=int(s.rank),
            rows=int(s.size[0]),
            cols=int(s.size[1]),
            hbm_bytes=int(s.storage.hbm) if s.storage else 0,
            ddr_bytes=int(s.storage.ddr) if s.storage else 0,
        )
        for o in options
        for s in o.shards
    ]
    return PlanReport(plan=plan, shards=shards, world_size=world_size)


def plan_model(
    model: nn.Module,
    cfg: ShardingConfig,
    world_size: int,
    compute_device: str,
    batch_size: int,
    local_world_size: Optional[int] = None,
    sharders: Optional[List[ModuleSharder[nn.Module]]] = None,
    process_group: Optional[dist.ProcessGroup] = None,
    table_wise_on_one_rank: bool = True,
) -> PlanReport:
    """Run the planner on ``model`` (tables on ``meta``); collective when a process group is given.
    ``table_wise_on_one_rank``: see ``make_constraints``."""
    planner = EmbeddingShardingPlanner(
        topology=make_topology(world_size, compute_device, local_world_size, cfg.hbm_gb, cfg.ddr_gb),
        batch_size=batch_size,
        constraints=make_constraints(cfg, world_size, table_wise_on_one_rank),
    )
    sharders = sharders or make_sharders()
    try:
        if process_group is not None:
            plan = planner.collective_plan(model, sharders, process_group)
        else:
            plan = planner.plan(model, sharders)
    except PlannerError as err:
        raise ValueError(f"no sharding plan fits {world_size} {compute_device} ranks: {err}") from err
    return _report(planner, plan, world_size)


def describe_tables(vocab_sizes: Mapping[str, int]) -> str:
    return ", ".join(f"{t}={n:,}" for t, n in vocab_sizes.items())


def device_type(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"
