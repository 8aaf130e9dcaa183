"""Exact resume (2 gloo ranks): a run killed in the middle of a checkpoint save, mid-epoch, restarts
from the previous checkpoint and ends with the same parameters, metrics and loss log as an
uninterrupted run, bit for bit. And the loader's skip, which puts a resumed epoch where it was."""

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.multiprocessing import ProcessExitedException

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_run  # noqa: E402

from muse_torchrec.data.loader import PreparedData, iter_blocks, make_loader, worker_skips  # noqa: E402
from muse_torchrec.train import checkpoint as ck  # noqa: E402

EPOCHS, SAVE_EVERY = 2, 4  # 9 steps per epoch on 2 ranks: saves at 4, 8, 12, 16 and 18
TIMING = ("train_samples_per_s", "train_samples_per_s_warm", "train_seconds")


def run_config(root: Path, name: str, extra=()):
    return tiny_run.config(root, run=name, extra=[f"train.epochs={EPOCHS}", f"train.checkpoint_every={SAVE_EVERY}",
                                                   *extra])


def full_run(rank: int, root: str, name: str, extra: tuple) -> None:
    """``run()``, resuming if run_dir has a checkpoint."""
    from muse_torchrec.train.distributed import init_distributed, shutdown
    from muse_torchrec.train.trainer import run

    run(run_config(Path(root), name, extra), init_distributed("cpu"))
    shutdown()


def killed_during_second_save(rank: int, root: str, name: str = "resumed", extra: tuple = ()) -> None:
    """Both ranks are killed in the second save (step 8): after the DCP files, before the rename."""
    from muse_torchrec.train.distributed import init_distributed
    from muse_torchrec.train.trainer import run

    real_rank_state, saves = ck._rank_state, []

    def rank_state(model):
        saves.append(1)
        if len(saves) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rank_state(model)

    ck._rank_state = rank_state
    run(run_config(Path(root), name, extra), init_distributed("cpu"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    tiny_run.prepare(root)
    # Checkpoints only at the end, with the plain step. The killed run trains through
    # TrainPipelineSparseDist (the CPU configs' choice), drained at each checkpoint, and its restart
    # resumes with the plain step; "pipelined" checkpoints every SAVE_EVERY steps through the pipeline.
    tiny_run.spawn(full_run, 2, root, str(root), "uninterrupted", ("train.checkpoint_every=null", "train.pipeline=plain"))
    with pytest.raises(ProcessExitedException):
        tiny_run.spawn(killed_during_second_save, 2, root, str(root))
    after_kill = sorted(p.name for p in ck.checkpoints_dir(root / "resumed").iterdir())
    tiny_run.spawn(full_run, 2, root, str(root), "resumed", ("train.pipeline=plain",))
    tiny_run.spawn(full_run, 2, root, str(root), "pipelined", ("train.pipeline=sparse_dist",))
    return root, after_kill


def test_a_kill_during_save_leaves_the_previous_checkpoint(runs):
    root, after_kill = runs
    assert after_kill == ["step_00000004", "step_00000008.partial"]
    with pytest.raises(ck.CheckpointError, match="incomplete"):
        ck.resolve_checkpoint(ck.checkpoints_dir(root / "resumed") / "step_00000008.partial")
    # The restart resumed from step 4, deleted the partial save and kept the last two checkpoints.
    assert sorted(p.name for p in ck.checkpoints_dir(root / "resumed").iterdir()) == ["step_00000016", "step_00000018"]


def _final_checkpoint(root: Path, name: str) -> dict:
    """Everything in a run's final checkpoint: DCP contents as full tensors, rank files, progress."""
    path = ck.latest_checkpoint(ck.checkpoints_dir(root / name))
    dcp_to_torch_save(path, root / f"{name}.pt")
    progress = json.loads((path / ck.STATE_FILE).read_text())["progress"]
    return {"shared": tiny_run.flat(torch.load(root / f"{name}.pt", weights_only=False)),
            "ranks": [tiny_run.flat(ck.read_rank_state(path, r)) for r in range(2)],
            "progress": {k: v for k, v in progress.items() if k != "seconds"}}


def _assert_equal_trees(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        assert torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key], key


def test_resumed_run_equals_the_uninterrupted_run_bit_for_bit(runs):
    root, _ = runs
    a, b = _final_checkpoint(root, "uninterrupted"), _final_checkpoint(root, "resumed")
    # Embedding rows, fused sparse and dense optimizer state, dense weights.
    assert any(k.endswith("momentum1") for k in a["shared"]) and any(k.endswith("exp_avg") for k in a["shared"])
    _assert_equal_trees(a["shared"], b["shared"])
    for rank in range(2):  # BatchNorm statistics and RNG states of each rank
        _assert_equal_trees(a["ranks"][rank], b["ranks"][rank])
    assert a["progress"] == b["progress"] and b["progress"]["step"] == 2 * 9
    metrics_a, metrics_b = (json.loads((root / n / "metrics.json").read_text()) for n in ("uninterrupted", "resumed"))
    assert {k: v for k, v in metrics_a.items() if k not in TIMING} == {k: v for k, v in metrics_b.items() if k not in TIMING}
    logs = [[(r["step"], r["loss"]) for r in map(json.loads, (root / n / "train_log.jsonl").read_text().splitlines())]
            for n in ("uninterrupted", "resumed")]
    assert logs[0] == logs[1] and [s for s, _ in logs[0]] == [2, 4, 6, 8, 10, 12, 14, 16, 18]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> PreparedData:
    root = tmp_path_factory.mktemp("skip")
    return PreparedData(tiny_run.prepare(root).data.prepared_dir)


def _keys(blocks) -> list:
    return [b.user_key.tolist() + b.labels.tolist() for b in blocks]


@pytest.mark.parametrize("skip", [3, 10, 11, 14, 20])
def test_skip_continues_the_full_stream(data, skip):
    # Blocks of 100 over two chunks (1,025 and 307 samples, in shuffled order): skips that end inside
    # the first chunk, inside the second, at the end, and past it.
    args = dict(batch_size=100, seed=5, shuffle=True)
    full = _keys(iter_blocks(data, "train", **args))
    assert len(full) == 14
    assert _keys(iter_blocks(data, "train", skip=skip, **args)) == full[skip:]


def user_keys(block) -> np.ndarray:
    return block.user_key


def test_worker_skips_follow_the_dataloader_turns():
    # Worker blocks 11 and 4: the DataLoader alternates, then takes worker 0 alone.
    assert worker_skips([11, 4], 9) == [5, 4]
    assert worker_skips([11, 4], 3) == [2, 1]
    assert worker_skips([2, 0], 5) == [2, 0]


def test_loader_skip_with_two_workers(data):
    args = dict(batch_size=100, num_workers=2, seed=1, shuffle=True)
    full = [b.tolist() for b in make_loader(data, "train", transform=user_keys, **args)]
    assert [b.tolist() for b in make_loader(data, "train", transform=user_keys, skip=9, **args)] == full[9:]


def test_pipelined_run_with_checkpoints_equals_the_plain_run_bit_for_bit(runs):
    """TrainPipelineSparseDist, drained at every checkpoint step, ends where the plain step ends."""
    root, _ = runs
    a, b = _final_checkpoint(root, "uninterrupted"), _final_checkpoint(root, "pipelined")
    _assert_equal_trees(a["shared"], b["shared"])
    for rank in range(2):
        _assert_equal_trees(a["ranks"][rank], b["ranks"][rank])
    assert a["progress"] == b["progress"]
    assert sorted(p.name for p in ck.checkpoints_dir(root / "pipelined").iterdir()) == ["step_00000016", "step_00000018"]
