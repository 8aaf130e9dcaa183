"""data/affinity.py: cores grouped from sysfs, each rank's share, the workers kept off the training
process's cores, clear errors; loader workers really run where they are told, and a pinned training
process and the threads it starts run on its own cores."""

import os
import subprocess
import sys
import threading

import pytest
import torch

from muse_torchrec.config import ConfigError
from muse_torchrec.data import affinity
from muse_torchrec.data.affinity import (TRAINING_CORES, loader_worker_cpus, physical_cores,
                                         place_training_process, training_cpus)
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
    sysfs = fake_sysfs(tmp_path, {c: f"{c % 16},{c % 16 + 16}" for c in range(32)})
    assert training_cpus("none", 0, 1, range(32), sysfs) is None
    assert loader_worker_cpus("none", 0, 1, range(32), sysfs) is None
    assert TRAINING_CORES == 4
    # One rank: cores 4-15 for the workers, with their siblings.
    assert loader_worker_cpus("pinned", 0, 1, range(32), sysfs) == [c + s for c in range(4, 16) for s in (0, 16)]
    # Two ranks: eight cores each, the first four of each share for its training process.
    assert loader_worker_cpus("pinned", 0, 2, range(32), sysfs) == [4, 20, 5, 21, 6, 22, 7, 23]
    assert loader_worker_cpus("pinned", 1, 2, range(32), sysfs) == [12, 28, 13, 29, 14, 30, 15, 31]
    assert training_cpus("pinned", 0, 1, range(32), sysfs) == [0, 16, 1, 17, 2, 18, 3, 19]
    assert training_cpus("pinned", 1, 2, range(32), sysfs) == [8, 24, 9, 25, 10, 26, 11, 27]


def test_too_few_cores_or_an_unknown_mode_is_a_config_error(tmp_path):
    sysfs = fake_sysfs(tmp_path, {c: str(c) for c in range(8)})
    with pytest.raises(ConfigError, match="8 physical cores for 3 rank.*give each 2.*data.cpu_affinity=none"):
        loader_worker_cpus("pinned", 0, 3, range(8), sysfs)
    with pytest.raises(ConfigError, match="cpu_affinity=pinned: 8 physical cores for 2 rank.*give each 4"):
        training_cpus("pinned", 1, 2, range(8), sysfs)
    with pytest.raises(ConfigError, match="data.cpu_affinity: unknown 'spread'"):
        loader_worker_cpus("spread", 0, 1, range(8), sysfs)


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


@pytest.fixture
def restored_placement():
    cpus, threads = os.sched_getaffinity(0), torch.get_num_threads()
    yield
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(threads)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_pinned_training_process_its_threads_and_its_workers_run_apart(tmp_path, monkeypatch, restored_placement):
    from muse_torchrec.data.loader import make_loader

    # This machine's CPUs as cores of their own, one kept for the training process.
    cpus = sorted(os.sched_getaffinity(0))
    monkeypatch.setattr(affinity, "JOB_CPUS", cpus)
    monkeypatch.setattr(affinity, "SYSFS_CPUS", tmp_path / "no_sysfs")
    monkeypatch.setattr(affinity, "TRAINING_CORES", 1)
    assert place_training_process("none", 0, 1) is None and os.sched_getaffinity(0) == set(cpus)
    assert place_training_process("pinned", 0, 1) == cpus[:1]
    assert os.sched_getaffinity(0) == {cpus[0]} and torch.get_num_threads() == 1
    seen = []
    thread = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
    thread.start()
    thread.join()
    assert seen == [{cpus[0]}]
    # The workers' CPUs are cut from the job's, not from the now pinned process's.
    workers = loader_worker_cpus("pinned", 0, 1)
    assert workers == cpus[1:]
    data, _ = small_prepared(tmp_path)
    batches = list(make_loader(data, "train", 32, _affinity, num_workers=2, worker_cpus=workers))
    assert len(batches) > 2 and all(b == cpus[1:] for b in batches)


def test_each_rank_takes_a_step_core_from_the_end_and_the_rest_keep_off_all_of_them(tmp_path):
    from muse_torchrec.data.affinity import step_core_cpus

    sysfs = fake_sysfs(tmp_path, {c: f"{c % 4},{c % 4 + 4}" for c in range(8)})
    assert step_core_cpus(range(8), 0, 1, sysfs) == ([3, 7], [0, 1, 2, 4, 5, 6])
    assert step_core_cpus(range(8), 0, 2, sysfs) == ([3, 7], [0, 1, 4, 5])
    assert step_core_cpus(range(8), 1, 2, sysfs) == ([2, 6], [0, 1, 4, 5])
    with pytest.raises(ConfigError, match="train.step_core: 4 physical core.*for 4 rank.*train.step_core=false"):
        step_core_cpus(range(8), 0, 4, sysfs)


def test_a_step_core_needs_cpus_of_its_own():
    from muse_torchrec.data.affinity import StepCore

    for step, others in (([], [0]), ([0], []), ([0, 1], [1])):
        with pytest.raises(ValueError, match="must be non-empty and apart"):
            StepCore(step, others)


def _started_thread_affinity():
    seen = []
    thread = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
    thread.start()
    thread.join()
    return seen[0]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_the_step_core_holds_the_training_thread_and_what_it_starts_runs_elsewhere(tmp_path, restored_placement):
    from muse_torchrec.data.affinity import StepCore, started_elsewhere
    from muse_torchrec.data.loader import make_loader

    before = os.sched_getaffinity(0)
    cpus = sorted(before)
    step, others = cpus[-1:], cpus[:-1]
    data, _ = small_prepared(tmp_path)
    stop = threading.Event()
    older = threading.Thread(target=stop.wait)  # a thread of the process started before the pin
    older.start()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a worker started before
    try:
        with started_elsewhere():  # no step core: nothing changes
            assert os.sched_getaffinity(0) == before
        with StepCore(step, others) as core:
            assert os.sched_getaffinity(0) == before  # nothing pinned before pin()
            core.pin()
            core.pin()  # once is enough: a second call changes nothing
            assert os.sched_getaffinity(0) == set(step)
            assert os.sched_getaffinity(older.native_id) == set(others)
            assert os.sched_getaffinity(child.pid) == set(others)
            assert _started_thread_affinity() == set(step)  # a plain start inherits the step core
            with started_elsewhere():
                assert _started_thread_affinity() == set(others)
            assert os.sched_getaffinity(0) == set(step)
            # The loader's workers start off the step core, iterated from the training thread.
            workers = list(make_loader(data, "train", 32, _affinity, num_workers=2))
            assert len(workers) > 2 and all(w == others for w in workers)
            # A thread that is not the pinned one starts what it starts where it runs.
            seen = []
            thread = threading.Thread(target=lambda: seen.append(_started_elsewhere_from_a_thread()))
            thread.start()
            thread.join()
            assert seen == [set(step)]
        assert os.sched_getaffinity(0) == before and os.sched_getaffinity(older.native_id) == before
        assert os.sched_getaffinity(child.pid) == before
    finally:
        stop.set()
        older.join()
        child.kill()
        child.wait()


def _started_elsewhere_from_a_thread():
    from muse_torchrec.data.affinity import started_elsewhere

    with started_elsewhere():
        return os.sched_getaffinity(0)


@pytest.mark.skipif(not torch.cuda.is_available() or len(os.sched_getaffinity(0)) < 2,
                    reason="needs a CUDA GPU (autograd's device thread) and two CPUs")
def test_the_step_core_holds_autograds_device_thread_too(restored_placement):
    from muse_torchrec.data.affinity import AUTOGRAD_THREAD_PREFIX, StepCore, _threads

    cpus = sorted(os.sched_getaffinity(0))
    x = torch.ones(3, device="cuda", requires_grad=True)
    (x * 2).sum().backward()  # autograd's CUDA device thread starts with the first CUDA backward
    autograd = [tid for tid, name in _threads().items() if name.startswith(AUTOGRAD_THREAD_PREFIX)]
    assert autograd
    with StepCore(cpus[-1:], cpus[:-1]) as core:
        core.pin()
        assert all(os.sched_getaffinity(tid) == {cpus[-1]} for tid in autograd)
        x.grad = None
        (x * 3).sum().backward()  # the backward still runs, on the step core
        assert x.grad.tolist() == [3.0, 3.0, 3.0]
    assert all(os.sched_getaffinity(tid) == set(cpus) for tid in autograd)


def test_the_step_core_is_for_cuda_steps_and_off_by_default():
    from muse_torchrec.config import ExperimentConfig
    from muse_torchrec.data.affinity import step_core

    assert ExperimentConfig().train.step_core is False
    before = os.sched_getaffinity(0)
    with step_core(False, "none", 0, 1, torch.device("cpu")) as core:
        core.pin()
        assert os.sched_getaffinity(0) == before
    with pytest.raises(ConfigError, match="train.step_core: on the CPU.*set train.step_core=false"):
        step_core(True, "none", 0, 1, torch.device("cpu"))
