"""Which CPUs a rank's loader workers and its training process run on (``data.cpu_affinity``).

- ``none`` (the default): wherever the OS places them.
- ``pinned``: the CPUs this job may use are cut into equal shares of whole physical cores, one per
  rank of the node (by local rank); the rank's training process (and every thread it starts later)
  runs on the first ``TRAINING_CORES`` cores of its share, its loader workers on the rest.

Why: on a GPU the training thread is bound by host time. Busy processes beside the model step
alone slowed it 20-29 % where the OS placed them, 2-9 % where they were pinned off the training
thread's cores (benchmarks/RESULTS.md row 53). The trainer's own loader workers are lighter (its
whole process tree, training thread included, averages about two busy cores at 150 k samples/s):
pinned and none do not separate on it (row 54), so ``none`` stays the default; multi-GPU nodes,
with more workers per core, have not been measured.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Set

import torch

from muse_torchrec.config import ConfigError

CPU_AFFINITIES = ("none", "pinned")
# Cores kept for the training process: its training thread, the autograd engine's device thread,
# the device GSU's thread, and one for the rest (the receipt of batches, NCCL, the driver).
TRAINING_CORES = 4
SYSFS_CPUS = Path("/sys/devices/system/cpu")
# The CPUs this job may use, read before ``place_training_process`` can narrow this process's own.
JOB_CPUS = sorted(os.sched_getaffinity(0))


def cpu_list(text: str) -> List[int]:
    """A sysfs CPU list ("0,8", "0-1", "3") -> the CPU numbers."""
    cpus: List[int] = []
    for part in text.strip().split(","):
        low, _, high = part.partition("-")
        cpus.extend(range(int(low), int(high or low) + 1))
    return cpus


def physical_cores(cpus: Sequence[int], sysfs: Path = SYSFS_CPUS) -> List[List[int]]:
    """``cpus`` grouped by physical core (hyper-thread siblings together, from sysfs), ordered by each
    core's first CPU; a CPU whose topology sysfs does not show is a core of its own."""
    wanted = set(cpus)
    cores: List[List[int]] = []
    placed: Set[int] = set()
    for cpu in sorted(wanted):
        if cpu in placed:
            continue
        siblings_file = sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list"
        siblings = cpu_list(siblings_file.read_text()) if siblings_file.exists() else [cpu]
        core = sorted(wanted.intersection(siblings) | {cpu})
        placed.update(core)
        cores.append(core)
    return cores


def check_cpu_affinity(name: str) -> None:
    """ConfigError unless ``name`` is a ``data.cpu_affinity`` (checked before a run builds anything)."""
    if name not in CPU_AFFINITIES:
        raise ConfigError(f"data.cpu_affinity: unknown {name!r}; choose one of {list(CPU_AFFINITIES)}")


def _rank_share(affinity: str, local_rank: int, local_world_size: int, cpus: Optional[Sequence[int]],
                sysfs: Path) -> Optional[List[List[int]]]:
    """Rank ``local_rank``'s share of the physical cores (its training cores first); None under ``none``."""
    check_cpu_affinity(affinity)
    if affinity == "none":
        return None
    cores = physical_cores(JOB_CPUS if cpus is None else cpus, sysfs)
    per_rank = len(cores) // local_world_size
    if per_rank <= TRAINING_CORES:
        raise ConfigError(
            f"data.cpu_affinity={affinity}: {len(cores)} physical cores for {local_world_size} rank(s) on this node "
            f"give each {per_rank}; it keeps {TRAINING_CORES} for the training process and needs at least one "
            "more for its loader workers: use data.cpu_affinity=none")
    return cores[local_rank * per_rank:(local_rank + 1) * per_rank]


def loader_worker_cpus(affinity: str, local_rank: int, local_world_size: int,
                       cpus: Optional[Sequence[int]] = None, sysfs: Path = SYSFS_CPUS) -> Optional[List[int]]:
    """The CPUs rank ``local_rank``'s loader workers may use under ``affinity`` (None: any).

    ``cpus``: the CPUs the job may use (default: ``JOB_CPUS``). ConfigError where a share would leave
    the workers no core.
    """
    share = _rank_share(affinity, local_rank, local_world_size, cpus, sysfs)
    return None if share is None else [cpu for core in share[TRAINING_CORES:] for cpu in core]


def training_cpus(affinity: str, local_rank: int, local_world_size: int,
                  cpus: Optional[Sequence[int]] = None, sysfs: Path = SYSFS_CPUS) -> Optional[List[int]]:
    """The CPUs rank ``local_rank``'s training process is pinned to under ``affinity`` (None: not pinned)."""
    share = _rank_share(affinity, local_rank, local_world_size, cpus, sysfs)
    return None if share is None else [cpu for core in share[:TRAINING_CORES] for cpu in core]


def place_training_process(affinity: str, local_rank: int, local_world_size: int) -> Optional[List[int]]:
    """Pins the calling thread, and so every thread and process it starts later, to
    ``training_cpus`` (loader workers then move to theirs), with as many intra-op threads as CPUs.

    Returns the CPUs (None: left where it was). Call before the loaders start.
    """
    cpus = training_cpus(affinity, local_rank, local_world_size)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(len(cpus))
    return cpus
