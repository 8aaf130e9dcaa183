"""Faults and bad inputs, one test per row of the README's table: each is a clear message naming the
file, column and row (or the key), a non-zero exit, and earlier outputs left as they were.

The CLI runs in this process (``cli.main``); training and evaluation use a 1-rank gloo group. The
last test is a real torchx job whose rank 1 is killed with SIGKILL mid-training.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_run  # noqa: E402
from test_launch import COMPONENTS, ROOT, job_env  # noqa: E402

from muse_torchrec import cli  # noqa: E402
from muse_torchrec.train import checkpoint as ck  # noqa: E402

CONFIG = str(ROOT / "configs" / "demo_cpu.yaml")


def sets(root: Path, run: str = "run", extra=()) -> List[str]:
    return [arg for item in tiny_run.overrides(root, run, extra) for arg in ("--set", item)]


def contents(path: Path) -> Dict[str, bytes]:
    """Every file under ``path`` (relative name -> bytes): to show that a failed command changed nothing."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Tiny prepared data and a finished 1-rank run (4 steps) with its checkpoint and metrics."""
    root = tmp_path_factory.mktemp("faults")
    tiny_run.prepare(root)
    with pytest.MonkeyPatch.context() as monkeypatch:
        tiny_run.use_one_rank(monkeypatch)
        assert cli.main(["train", "--config", CONFIG, "--device", "cpu",
                         *sets(root, extra=["train.limit_train_batches=4"])]) == 0
    return root


@pytest.fixture
def dist_env(monkeypatch):
    """For commands that open a 1-rank process group in this process."""
    tiny_run.use_one_rank(monkeypatch)


def fails(argv: List[str], capsys, *fragments: str) -> str:
    """Run the CLI, expect exit 2 and a one-line message holding every fragment; returns it."""
    assert cli.main(argv) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    prefix = f"muse-torchrec {argv[0]}: error:"
    assert prefix in last_line, last_line  # (after any progress-bar residue on that line)
    message = last_line[last_line.index(prefix):]
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ---- raw data: `prepare` refuses it, and writes nothing ----------------------------------------

def _rewrite(path: Path, change: Callable[[pa.Table], pa.Table]) -> None:
    pq.write_table(change(pq.read_table(path)), path)


def _with_nan(table: pa.Table) -> pa.Table:
    prob = table.column("prob").to_numpy().copy()
    prob[3] = float("nan")
    return table.set_column(table.schema.get_field_index("prob"), "prob", pa.array(prob, pa.float32()))


RAW_DAMAGE = {
    "corrupt": ("train_samples.parquet", lambda p: p.write_bytes(b"not parquet" * 100), ["not a readable Parquet file"]),
    "truncated": ("train_user_features.parquet", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
                  ["not a readable Parquet file"]),
    "empty": ("item_features.parquet", lambda p: p.write_bytes(b""), ["not a readable Parquet file"]),
    "missing column": ("test_samples.parquet", lambda p: _rewrite(p, lambda t: t.drop_columns(["205"])),
                       ["column '205'", "required column is missing"]),
    "wrong dtype": ("item_features.parquet", lambda p: _rewrite(p, lambda t: t.set_column(
        1, "206", pc.cast(t.column("206"), pa.string()))), ["column '206'", "type string, expected int64"]),
    "nan in a dense input": ("train_truth.parquet", lambda p: _rewrite(p, _with_nan),
                             ["column 'prob'", "row 3", "probability nan outside [0, 1]"]),
}


@pytest.mark.parametrize("case", sorted(RAW_DAMAGE))
def test_bad_raw_data_is_refused_by_prepare(base, tmp_path, capsys, case):
    name, damage, fragments = RAW_DAMAGE[case]
    raw = tmp_path / "raw"
    shutil.copytree(base / "raw", raw)
    damage(raw / name)
    fails(["prepare", "--raw", str(raw), "--out", str(tmp_path / "prepared")], capsys, name, *fragments)
    assert not (tmp_path / "prepared").exists() and not list(tmp_path.glob(".prepared*"))


# ---- prepared data: the loader refuses it (here in an eval job), naming file, column, row ----------

def _longer_history(table: pa.Table) -> pa.Table:
    """User 2's lists made longer than max_history (200) by repeating them."""
    columns = {}
    for name in ("hist_items", "hist_cates"):
        lists = table.column(name).to_pylist()
        lists[2] = (lists[2] * 300)[:250]
        columns[name] = pa.array(lists, table.schema.field(name).type)
    for name, array in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, array)
    return table


def _set_value(column: str, row: int, value) -> Callable[[pa.Table], pa.Table]:
    def change(table: pa.Table) -> pa.Table:
        values = table.column(column).to_pylist()
        values[row] = value
        index = table.schema.get_field_index(column)
        return table.set_column(index, column, pa.array(values, table.schema.field(column).type))

    return change


SAMPLES, USERS = "test/shard-00000.samples.parquet", "test/shard-00000.users.parquet"
PREPARED_DAMAGE = {
    "id out of range": (SAMPLES, lambda p: _rewrite(p, _set_value("item", 5, 10**6)),
                        ["column 'item'", "row 5", "id 1000000 outside the table's rows"]),
    "list longer than max_history": (USERS, lambda p: _rewrite(p, _longer_history),
                                     ["column 'hist_items'", "row 2", "list of 250 entries, longer than max_history 200"]),
    "nan in a dense input": (SAMPLES, lambda p: _rewrite(p, _set_value("prob", 7, float("nan"))),
                             ["column 'prob'", "row 7", "probability nan outside [0, 1]"]),
    "label not 0/1": (SAMPLES, lambda p: _rewrite(p, _set_value("label", 9, 3)), ["column 'label'", "row 9", "label 3.0"]),
    "missing column": (SAMPLES, lambda p: _rewrite(p, lambda t: t.drop_columns(["cate"])),
                       ["column 'cate'", "required column is missing"]),
    "wrong dtype": (SAMPLES, lambda p: _rewrite(p, lambda t: t.set_column(
        t.schema.get_field_index("item"), "item", pc.cast(t.column("item"), pa.string()))),
        ["column 'item'", "type string, expected an integer type"]),
    "truncated": (USERS, lambda p: p.write_bytes(p.read_bytes()[:1000]), ["row group 0 is unreadable"]),
    "empty file": (SAMPLES, lambda p: p.write_bytes(b""), ["row group 0 is unreadable"]),
}


@pytest.mark.parametrize("case", sorted(PREPARED_DAMAGE))
def test_bad_prepared_data_is_refused_by_the_loader(base, tmp_path, capsys, dist_env, case):
    name, damage, fragments = PREPARED_DAMAGE[case]
    prepared = tmp_path / "prepared"
    shutil.copytree(base / "prepared", prepared)
    damage(prepared / name)
    before = contents(base / "run")
    fails(["eval", "--checkpoint", str(base / "run"), "--device", "cpu", "--set", f"data.prepared_dir={prepared}"],
          capsys, str(prepared / name), *fragments)
    assert contents(base / "run") == before


# ---- configs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, fragments", [
    ("train:\n  batch_sise: 64\n", ["unknown key train.batch_sise"]),
    ("train:\n  batch_size: many\n", ["train.batch_size: expected an integer"]),
    ("", ["the config file is empty"]),
    ("train:\n  checkpoint_every: 0\n", ["train.checkpoint_every"]),
    ("train:\n  pipeline: sparse\n", ["train.pipeline: unknown 'sparse'", "plain", "sparse_dist"]),
    ("data:\n  cpu_affinity: spread\n", ["data.cpu_affinity: unknown 'spread'", "none", "pinned"]),
    ("train:\n  step_core: true\n", ["train.step_core: on the CPU", "set train.step_core=false"]),
])
def test_bad_config_is_refused_before_anything_is_written(base, tmp_path, capsys, dist_env, text, fragments):
    config = tmp_path / "typo.yaml"
    config.write_text(text)
    before = contents(base / "run")
    fails(["train", "--config", str(config), "--device", "cpu", "--set", f"train.run_dir={base / 'run'}",
           "--set", f"data.prepared_dir={base / 'prepared'}"], capsys, *fragments)
    assert contents(base / "run") == before


def test_typo_in_an_override_names_the_key(capsys):
    fails(["train", "--set", "model.kk=3"], capsys, "unknown key model.kk")


def test_config_that_does_not_match_the_prepared_data(base, capsys, dist_env):
    before = contents(base / "run")
    fails(["train", "--config", CONFIG, "--device", "cpu", *sets(base, extra=["data.max_history=100"])], capsys,
          "data.max_history=100", "prepared with max_history=200")
    assert contents(base / "run") == before


# ---- checkpoints ---------------------------------------------------------------------------------

def test_resuming_a_checkpoint_of_another_config(base, capsys, dist_env):
    before = contents(base / "run")
    fails(["train", "--config", CONFIG, "--device", "cpu", *sets(base, extra=["model.k=30"])], capsys,
          "step_00000004", "model.k: 20 in the checkpoint, 30 now")
    assert contents(base / "run") == before


def test_evaluating_a_checkpoint_with_another_model(base, tmp_path, capsys):
    config = tmp_path / "other.yaml"
    config.write_text("model:\n  method: din\n")
    fails(["eval", "--checkpoint", str(base / "run"), "--config", str(config)], capsys,
          "model.method: 'muse' in the checkpoint, 'din' now")


def test_checkpoint_on_other_prepared_data(base, tmp_path, capsys, dist_env):
    other = tiny_run.config(tmp_path, extra=["data.synth.seed=7"])
    from muse_torchrec.cli import ensure_prepared

    ensure_prepared(other)
    fails(["eval", "--checkpoint", str(base / "run"), "--device", "cpu", "--set",
           f"data.prepared_dir={other.data.prepared_dir}"], capsys, "other table sizes", "item:")


def test_damaged_checkpoint(base, tmp_path, capsys, dist_env):
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    data = next(ck.latest_checkpoint(ck.checkpoints_dir(run)).glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    fails(["eval", "--checkpoint", str(run), "--device", "cpu"], capsys, "step_00000004", "cannot be loaded")


def test_no_complete_checkpoint(base, tmp_path, capsys):
    partial = tmp_path / "step_00000009.partial"
    partial.mkdir()
    fails(["eval", "--checkpoint", str(partial)], capsys, "incomplete checkpoint")
    fails(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "out")], capsys, "no complete checkpoint")


def test_fresh_start_refused_where_checkpoints_exist(base, capsys, dist_env):
    before = contents(base / "run")
    fails(["train", "--config", CONFIG, "--device", "cpu", *sets(base, extra=["train.resume=false"])], capsys,
          "train.resume is false")
    assert contents(base / "run") == before


# ---- training --------------------------------------------------------------------------------------

def test_non_finite_loss_stops_the_run_before_a_checkpoint(base, capsys, dist_env):
    fails(["train", "--config", CONFIG, "--device", "cpu", *sets(base, run="nan", extra=[
        "train.sparse_optimizer=sgd", "train.sparse_lr=1e30", "train.dense_lr=1e30", "train.checkpoint_every=1"])],
        capsys, "step 2 (epoch 0): the training loss is nan")
    # Step 1 was finite and saved; the parameters of the NaN step never reach a checkpoint.
    assert [p.name for p in ck.checkpoints_dir(base / "nan").iterdir()] == ["step_00000001"]


# ---- a rank killed under torchx ---------------------------------------------------------------------

def test_train_component_asks_torchrun_for_restarts():
    import muse as components  # launch/muse.py, on sys.path through test_launch

    role = components.train(max_restarts=3).roles[0]
    # torchrun reads PET_<OPTION>; the scheduler retries a lost replica; a fresh store per attempt.
    assert role.env["PET_MAX_RESTARTS"] == "3" and role.max_retries == 3
    assert role.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


def _rank_pid(marker: str, rank: int) -> Optional[int]:
    """The pid of the first-attempt worker process of ``rank`` whose command line holds ``marker``."""
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or marker.encode() not in (proc / "cmdline").read_bytes():
                continue
            env = dict(item.split("=", 1) for item in (proc / "environ").read_bytes().decode().split("\0") if "=" in item)
        except OSError:
            continue
        if env.get("RANK") == str(rank) and env.get("TORCHELASTIC_RESTART_COUNT") == "0":
            return int(proc.name)
    return None


def test_torchx_job_with_a_killed_rank_restarts_from_the_last_checkpoint(tmp_path):
    """rank 1 gets SIGKILL once the first checkpoint exists; torchelastic restarts both ranks
    (--max_restarts 1), they resume from the latest checkpoint and the job finishes."""
    tiny_run.prepare(tmp_path)
    epochs = 3
    overrides = ";".join(tiny_run.overrides(tmp_path, extra=[f"train.epochs={epochs}", "train.checkpoint_every=2"]))
    log = tmp_path / "job.log"  # a file, not a pipe: an undrained pipe would block the job
    job = subprocess.Popen(
        [sys.executable, "-m", "torchx.cli.main", "run", "-s", "local_cwd", f"{COMPONENTS}:train",
         "--nnodes", "1", "--nproc_per_node", "2", "--max_restarts", "1", "--config", CONFIG, "--overrides", overrides],
        cwd=ROOT, env=job_env(tmp_path), stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    checkpoints, deadline, victim = ck.checkpoints_dir(tmp_path / "run"), time.time() + 300, None
    while victim is None and time.time() < deadline and job.poll() is None:
        if ck.latest_checkpoint(checkpoints) is not None:
            victim = _rank_pid(str(tmp_path / "run"), rank=1)
        time.sleep(0.05)
    assert victim is not None, "no checkpoint appeared, or the job ended before rank 1 could be killed"
    os.kill(victim, signal.SIGKILL)
    job.wait(timeout=600)
    output = log.read_text()
    assert job.returncode == 0, output[-4000:]
    assert "resumed from" in output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train_steps"] == epochs * 9
    assert ck.read_info(ck.latest_checkpoint(checkpoints)).step == epochs * 9


def test_training_freezes_what_its_first_step_built():
    """After the first step of a run the trainer freezes every live object out of the garbage
    collector's reach (a full collection's pause on one rank stalls the others); the losses are unchanged."""
    import gc

    import torch

    from muse_torchrec.train.trainer import TrainProgress, _losses

    class TwoSteps:
        left = 2

        def progress(self, batches):
            if not self.left:
                raise StopIteration
            self.left -= 1
            return torch.tensor(0.25 * self.left), None, None

    gc.unfreeze()
    try:
        assert list(_losses(TwoSteps(), iter(()), TrainProgress())) == [0.25, 0.0]
        assert gc.get_freeze_count() == 0  # only the run's first segment freezes
        assert list(_losses(TwoSteps(), iter(()), TrainProgress(), freeze_gc=True)) == [0.25, 0.0]
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


class _LoggedLoss:
    """A loss whose read-back is logged (to see when the trainer waits for a step)."""

    def __init__(self, step: int, value: float, log: List[str]) -> None:
        self.step, self.value, self.log = step, value, log

    def detach(self) -> "_LoggedLoss":
        return self

    def __float__(self) -> float:
        self.log.append(f"read {self.step}")
        return self.value


@pytest.mark.parametrize("values,expected", [([0.5, 0.25, 0.125], None), ([0.5, float("nan"), 0.125], "step 2 ")])
def test_each_loss_is_read_after_the_next_step_is_launched(values, expected):
    """Reading a step's loss makes the host wait for that step: it is read once the next step is launched
    (the last one when the pipeline has drained), and a non-finite loss still stops the run."""
    import gc

    from muse_torchrec.train.trainer import NonFiniteLossError, TrainProgress, _losses

    log: List[str] = []

    class Steps:
        done = 0

        def progress(self, batches):
            if self.done == len(values):
                raise StopIteration
            self.done += 1
            log.append(f"step {self.done}")
            return _LoggedLoss(self.done, values[self.done - 1], log), None, None

    progress = TrainProgress()
    got = []
    try:
        for loss in _losses(Steps(), iter(()), progress):
            got.append(loss)
            progress.record(loss, 1)
    except NonFiniteLossError as err:
        assert expected is not None and expected in str(err)
    finally:
        gc.unfreeze()
    if expected is None:
        assert got == values
        assert log == ["step 1", "step 2", "read 1", "step 3", "read 2", "read 3"]
    else:
        assert got == values[:1] and log == ["step 1", "step 2", "read 1", "step 3", "read 2"]
