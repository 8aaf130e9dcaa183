"""data/affinity.py: cores grouped from sysfs, each rank's share, the workers kept off the training
process's cores, clear errors; and loader workers really run where they are told."""

import os

import pytest

from muse_torchrec.config import ConfigError
from muse_torchrec.data.affinity import TRAINING_CORES, loader_worker_cpus, physical_cores
from test_packed import small_prepared


def fake_sysfs(root, siblings):
    """A sysfs CPU tree where CPU c's hyper-thread siblings are ``siblings[c]`` (a sysfs list string)."""
    for cpu, text in siblings.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(text + "\n")
    return root


def test_cores_group_hyper_thread_siblings(tmp_path):
    # 4 cores x 2 threads, siblings numbered c and c + 4 (as on most x86 hosts).
    sysfs = fake_sysfs(tmp_path, {c: f"{c % 4},{c % 4 + 4}" for c in range(8)})
    assert physical_cores(range(8), sysfs) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # Only the CPUs the job may use; a range list; a CPU sysfs does not show is a core of its own.
    sysfs2 = fake_sysfs(tmp_path / "b", {0: "0-1", 1: "0-1", 2: "2-3", 3: "2-3"})
    assert physical_cores([1, 2, 3, 9], sysfs2) == [[1], [2, 3], [9]]


def test_each_rank_gets_its_share_minus_the_training_cores(tmp_path):
    sysfs = fake_sysfs(tmp_path, {c: f"{c % 8},{c % 8 + 8}" for c in range(16)})
    assert loader_worker_cpus("none", 0, 1, range(16), sysfs) is None
    assert TRAINING_CORES == 2
    # One rank: cores 2-7 for the workers, with their siblings.
    assert loader_worker_cpus("split", 0, 1, range(16), sysfs) == [2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]
    # Two ranks: four cores each, the first two of each share left to its training process.
    assert loader_worker_cpus("split", 0, 2, range(16), sysfs) == [2, 10, 3, 11]
    assert loader_worker_cpus("split", 1, 2, range(16), sysfs) == [6, 14, 7, 15]


def test_too_few_cores_or_an_unknown_mode_is_a_config_error(tmp_path):
    sysfs = fake_sysfs(tmp_path, {c: str(c) for c in range(8)})
    with pytest.raises(ConfigError, match="8 physical cores for 3 rank.*give each 2.*data.cpu_affinity=none"):
        loader_worker_cpus("split", 0, 3, range(8), sysfs)
    with pytest.raises(ConfigError, match="data.cpu_affinity: unknown 'pinned'"):
        loader_worker_cpus("pinned", 0, 1, range(8), sysfs)


def _affinity(block):
    return sorted(os.sched_getaffinity(0))


def test_loader_workers_run_on_the_cpus_given(tmp_path):
    from muse_torchrec.data.loader import make_loader

    data, _ = small_prepared(tmp_path)
    before = os.sched_getaffinity(0)
    cpu = max(before)
    seen = list(make_loader(data, "train", 32, _affinity, num_workers=2, worker_cpus=[cpu]))
    assert len(seen) > 2 and all(s == [cpu] for s in seen)
    assert os.sched_getaffinity(0) == before  # the training process keeps its own
