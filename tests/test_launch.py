"""torchx components: they validate, describe their arguments, and a 2-process local run trains."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torchx.specs import AppDef
from torchx.specs.file_linter import validate

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ROOT / "launch" / "muse.py"
sys.path.insert(0, str(ROOT / "launch"))
import muse as components  # noqa: E402


def job_env(tmp_path: Path) -> dict:
    """torchx's local scheduler runs `torchrun` from PATH: the one next to this interpreter."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), "PATH": path}


@pytest.mark.parametrize("name", ["train", "plan"])
def test_components_pass_the_torchx_linter(name):
    errors = validate(str(COMPONENTS), name)
    assert errors == [], errors


def test_train_component_builds_a_ddp_app():
    app = components.train(config="configs/taobao_mm_full.yaml", nnodes=2, nproc_per_node=8, gpu=8,
                           overrides="train.batch_size=512;model.k=20", max_restarts=3)
    assert isinstance(app, AppDef)
    role = app.roles[0]
    assert role.num_replicas == 2 and role.resource.gpu == 8 and role.max_retries == 3
    args = " ".join(role.args)
    assert "--nproc_per_node 8" in args or "--nproc-per-node 8" in args or "--nproc_per_node=8" in args
    assert "muse_torchrec.cli train --config configs/taobao_mm_full.yaml" in args
    assert "--set train.batch_size=512 --set model.k=20" in args
    assert role.env["OMP_NUM_THREADS"] == "1"


def test_train_component_rejects_bad_arguments():
    with pytest.raises(ValueError, match="GPUs per node"):
        components.train(nproc_per_node=8, gpu=4)
    with pytest.raises(ValueError, match="key.path=value"):
        components.train(overrides="model.k")


def test_torchx_run_two_processes_on_tiny_data(tmp_path):
    """The real launcher: torchx local_cwd, 2 gloo ranks, tiny synthetic data, train + eval."""
    overrides = ";".join([
        f"data.raw_dir={tmp_path}/raw", f"data.prepared_dir={tmp_path}/prepared", f"train.run_dir={tmp_path}/run",
        "data.synth.train_users=120", "data.synth.test_users=40", "data.synth.num_items=3000",
        "train.batch_size=64", "train.eval_batch_size=100", "model.mlp=[32,16]",
    ])
    env = job_env(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "torchx.cli.main", "run", "-s", "local_cwd", f"{COMPONENTS}:train",
         "--nnodes", "1", "--nproc_per_node", "2", "--config", "configs/demo_cpu.yaml", "--overrides", overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    meta = json.loads((tmp_path / "prepared" / "meta.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["num_eval_samples"] == meta["splits"]["test"]["samples"]
    assert 0.0 < metrics["auc"] < 1.0 and metrics["train_steps"] > 0


def test_failed_job_exits_non_zero(tmp_path):
    env = job_env(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "torchx.cli.main", "run", "-s", "local_cwd", f"{COMPONENTS}:train",
         "--nproc_per_node", "1", "--config", "configs/demo_cpu.yaml",
         "--overrides", f"data.raw_dir={tmp_path}/none;data.synthesize=false;data.prepared_dir={tmp_path}/p"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
