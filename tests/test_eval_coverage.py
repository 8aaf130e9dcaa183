"""Evaluation scores every test sample exactly once, with 1 and 2 ranks, when the test split's work
units (shards x chunks) do not divide evenly over the ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from muse_torchrec.config import SynthConfig
from muse_torchrec.data.loader import PreparedData
from muse_torchrec.data.prepare import prepare
from muse_torchrec.data.synthetic import synthesize

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coverage")
    synthesize(root / "raw", SynthConfig(train_users=150, test_users=70, num_items=3000, seed=4))
    # Small buckets and chunks: several shards and an odd number of test work units.
    prepare(root / "raw", root / "prepared", max_history=200, bucket_bytes=50_000, chunk_samples=150, progress=False)
    return root / "prepared"


def run_train(prepared: Path, run_dir: Path, nproc: int, workers: int = 0, placement: str = "workers") -> dict:
    overrides = [f"data.prepared_dir={prepared}", f"train.run_dir={run_dir}", "data.synthesize=false",
                 f"data.num_workers={workers}", f"data.gsu_placement={placement}",
                 "train.batch_size=32", "train.eval_batch_size=64", "train.limit_train_batches=2",
                 "model.mlp=[16,8]", "data.max_history=200"]
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(run_dir.parent), "PATH": path}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "muse_torchrec.cli", "train", "--config", str(ROOT / "configs" / "demo_cpu.yaml"),
               "--device", "cpu"]
    for item in overrides:
        command += ["--set", item]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("nproc,workers,placement", [(1, 0, "workers"), (2, 0, "workers"), (2, 2, "workers"),
                                                     (2, 2, "device")])
def test_every_test_sample_scored_once(prepared, tmp_path, nproc, workers, placement):
    """With loader workers, batches reach the training process packed (one buffer each); with the
    GSU on the device, the training process completes them (eval's padding batches included)."""
    data = PreparedData(prepared)
    units = data.work_units("test")
    assert len(data.shards("test")) > 1 and len(units) % 2 == 1, "the case needs an odd number of units"
    metrics = run_train(prepared, tmp_path / f"run{nproc}", nproc, workers, placement)
    assert metrics["world_size"] == nproc
    assert metrics["num_eval_samples"] == data.num_samples("test")


def test_gsu_placements_train_the_same_model(prepared, tmp_path):
    """The device GSU selects what the workers' GSU selects (tests/test_device_gsu.py), so one process
    trains to the same metrics either way (up to float rounding of the GSU scores); inline or ahead
    of the training thread, exactly the same."""
    workers = run_train(prepared, tmp_path / "workers", 1)
    device = run_train(prepared, tmp_path / "device", 1, placement="device")
    for key in ("auc", "gauc", "logloss"):
        assert abs(workers[key] - device[key]) < 1e-4, (key, workers[key], device[key])
    # The device GSU in the training thread computes exactly what its thread ahead computes.
    inline = run_train(prepared, tmp_path / "inline", 1, placement="device_inline")
    assert [inline[key] for key in ("auc", "gauc", "logloss")] == [device[key] for key in ("auc", "gauc", "logloss")]
