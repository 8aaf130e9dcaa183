"""Which CPUs a rank's loader workers and its training process run on (``data.cpu_affinity``), and
its training thread (``train.step_core``).

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

``train.step_core`` (``StepCore``): from the third training step on, the training thread and
autograd's CUDA device threads share one physical core; the process's other threads, its child
processes, and the threads and processes the training thread starts through ``started_elsewhere``
(the loaders' workers, the data path's threads), keep off it. A CUDA step runs its forward in the training thread
and its backward in autograd's device thread, which take turns every step; on two cores every turn
wakes the other core, and the state both use (the allocator's, the dispatcher's, NCCL's) moves
between their caches (the likely cause; not isolated). On one core the rows' exchange forward and
backward cost the host ~3x less, the model step ran 1.04-1.28x (means over 2-3 pairs a call, not
every pair ahead) and the trainer 1.02-1.15x in four calls, ahead in ten of eleven pairs
(benchmarks/RESULTS.md row 119).
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

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


# Threads pinned by a ``StepCore`` (native thread id) -> the CPUs what they start runs on.
_ELSEWHERE: Dict[int, List[int]] = {}
AUTOGRAD_THREAD_PREFIX = "pt_autograd_"  # torch names autograd's device threads pt_autograd_<device>


def step_core_cpus(allowed: Sequence[int], local_rank: int, local_world_size: int,
                   sysfs: Path = SYSFS_CPUS) -> Tuple[List[int], List[int]]:
    """(the CPUs of rank ``local_rank``'s step core, the CPUs everything else may use) among
    ``allowed``, shared by ``local_world_size`` ranks: rank r takes the r-th physical core from the
    end, and the others keep off every rank's. ConfigError where no core would be left for them."""
    cores = physical_cores(allowed, sysfs)
    if len(cores) <= local_world_size:
        raise ConfigError(f"train.step_core: {len(cores)} physical core(s) for {local_world_size} rank(s) on this "
                          "node; each rank's training thread takes one and the rest of the job needs at least "
                          "one more: set train.step_core=false")
    taken = {cpu for core in cores[len(cores) - local_world_size:] for cpu in core}
    return cores[-1 - local_rank], [cpu for cpu in sorted(allowed) if cpu not in taken]


def _threads(pid: str = "self") -> Dict[int, str]:
    """The threads of process ``pid`` ("self": this one): native id -> name."""
    found = {}
    with contextlib.suppress(FileNotFoundError):  # a process that ended meanwhile
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
                found[int(tid)] = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    return found


def _child_processes() -> List[str]:
    """The ids of this process's child processes (loader workers, the compiler's workers, ...)."""
    children: List[str] = []
    for tid in _threads():
        with contextlib.suppress(FileNotFoundError):
            children.extend(Path(f"/proc/self/task/{tid}/children").read_text().split())
    return children


class StepCore:
    """Context manager for a training loop: ``pin()`` (call it after each step; it acts once, so the
    first steps' compilation and graph captures keep every CPU) puts the calling (training) thread
    and autograd's device threads on ``step``, and moves this process's other threads and its child
    processes' threads off it (to what they had less ``step``, or ``others`` where that leaves
    nothing); what the training thread starts inside ``started_elsewhere()`` from then on runs on
    ``others``. On exit every moved thread gets its CPUs back.

    Args:
        step: the step core's CPUs (``step_core_cpus``).
        others: the CPUs for the rest of the job.
    """

    def __init__(self, step: Sequence[int], others: Sequence[int]) -> None:
        if not step or not others or set(step) & set(others):
            raise ValueError(f"StepCore: the step core's CPUs {list(step)} and the others' {list(others)} must be "
                             "non-empty and apart")
        self.step, self.others = list(step), list(others)
        self._restore: Dict[int, Set[int]] = {}

    def __enter__(self) -> "StepCore":
        return self

    def pin(self) -> None:
        """Pin the threads (once; later calls return at once)."""
        if self._restore:
            return
        me = threading.get_native_id()
        for tid, name in _threads().items():
            self._move(tid, self.step if tid == me or name.startswith(AUTOGRAD_THREAD_PREFIX) else None)
        for child in _child_processes():
            for tid in _threads(child):
                self._move(tid, None)
        _ELSEWHERE[me] = self.others

    def _move(self, tid: int, cpus: Optional[List[int]]) -> None:
        """Thread ``tid`` to ``cpus``; None: off the step core (a narrower placement, e.g. NCCL's
        threads near their GPU, is kept)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):  # ended, or not ours to move
            had = os.sched_getaffinity(tid)
            if cpus is None:
                cpus = sorted(had - set(self.step)) or self.others
            os.sched_setaffinity(tid, cpus)
            self._restore[tid] = had

    def __exit__(self, *exc: object) -> None:
        _ELSEWHERE.pop(threading.get_native_id(), None)
        for tid, cpus in self._restore.items():
            with contextlib.suppress(ProcessLookupError, PermissionError):  # a thread that ended
                os.sched_setaffinity(tid, cpus)
        self._restore.clear()


class _NoStepCore:
    """``StepCore``'s stand-in where ``train.step_core`` is off: nothing moves."""

    def __enter__(self) -> "_NoStepCore":
        return self

    def pin(self) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        pass


@contextlib.contextmanager
def started_elsewhere() -> Iterator[None]:
    """Threads and processes started inside run off the step core: where the calling thread is one a
    ``StepCore`` pinned, it moves to the others' CPUs meanwhile (what it starts inherits them), then
    back; elsewhere nothing changes."""
    me = threading.get_native_id()
    others = _ELSEWHERE.get(me)
    if others is None:
        yield
        return
    pinned = os.sched_getaffinity(0)
    os.sched_setaffinity(0, others)
    try:
        yield
    finally:
        os.sched_setaffinity(0, pinned)


def step_core(enabled: bool, affinity: str, local_rank: int, local_world_size: int,
              device: torch.device) -> Union[StepCore, _NoStepCore]:
    """The ``StepCore`` of ``train.step_core`` (``enabled``) for this rank, among the CPUs the
    training process has (under ``data.cpu_affinity: pinned`` its own share's training cores, so the
    last of them, whatever the rank); one whose ``pin()`` does nothing when not enabled. ConfigError
    off CUDA."""
    if not enabled:
        return _NoStepCore()
    if device.type != "cuda":
        raise ConfigError("train.step_core: on the CPU the backward runs in the training thread itself, and pinning "
                          "it would leave its intra-op threads one core: set train.step_core=false")
    allowed = sorted(os.sched_getaffinity(0))
    if affinity == "pinned":
        local_rank, local_world_size = 0, 1
    step, others = step_core_cpus(allowed, local_rank, local_world_size)
    return StepCore(step, others)
