"""Which CPUs a rank's loader workers may run on (``data.cpu_affinity``).

- ``none`` (the default): wherever the OS places them.
- ``split``: the CPUs this job may use are cut into equal shares of whole physical cores, one per
  rank of the node (by local rank); the rank's workers run on its share except its first
  ``TRAINING_CORES`` cores, which stay free for the training process (not pinned itself: with the
  workers kept off those cores the OS schedules its threads there).

Why: on a GPU the training thread is bound by host time, and end to end every one of its ops ran
20-40 % slower than in the model step alone on an H100 host with four busy loader workers beside
it (benchmarks/RESULTS.md row 51). Whether sharing cores with the workers is the cause, and so
whether ``split`` helps, has not been measured yet: no config uses it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Set

from muse_torchrec.config import ConfigError

CPU_AFFINITIES = ("none", "split")
# Cores kept free for the training process: its training thread, the autograd engine's thread and
# the device GSU's thread.
TRAINING_CORES = 2
SYSFS_CPUS = Path("/sys/devices/system/cpu")


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


def loader_worker_cpus(affinity: str, local_rank: int, local_world_size: int,
                       cpus: Optional[Sequence[int]] = None, sysfs: Path = SYSFS_CPUS) -> Optional[List[int]]:
    """The CPUs rank ``local_rank``'s loader workers may use under ``affinity`` (None: any).

    ``cpus``: the CPUs the job may use (default: this process's affinity, which the trainer never
    changes). ConfigError where a share would leave the workers no core.
    """
    check_cpu_affinity(affinity)
    if affinity == "none":
        return None
    cores = physical_cores(sorted(os.sched_getaffinity(0)) if cpus is None else cpus, sysfs)
    per_rank = len(cores) // local_world_size
    if per_rank <= TRAINING_CORES:
        raise ConfigError(
            f"data.cpu_affinity=split: {len(cores)} physical cores for {local_world_size} rank(s) on this node "
            f"give each {per_rank}; it keeps {TRAINING_CORES} for the training process and needs at least one "
            "more for its loader workers: use data.cpu_affinity=none")
    share = cores[local_rank * per_rank:(local_rank + 1) * per_rank]
    return [cpu for core in share[TRAINING_CORES:] for cpu in core]
