"""Checkpoints: every piece of state round-trips (2 gloo ranks, into another sharding plan and into
1 rank), retention, config checks. A kill during a save: tests/test_resume.py."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_run  # noqa: E402

from muse_torchrec.train import checkpoint as ck  # noqa: E402

SAVE_EVERY, STEPS = 3, 6
OTHER_PLAN = "sharding.constraints={item: {sharding_types: [table_wise]}, user: {sharding_types: [table_wise]}}"


def snapshot(sharded) -> dict:
    """This rank's view of everything a checkpoint holds (and the plan that produced it)."""
    model, optim = sharded.model.state_dict(), sharded.optimizer.state_dict()
    return {
        "model": tiny_run.local_state(model), "optim": tiny_run.local_state(optim),
        "sizes": {"model": tiny_run.global_sizes(model), "optim": tiny_run.global_sizes(optim)},
        "torch_rng": torch.get_rng_state(),
        "plan": {s.table: s.sharding_type for s in sharded.plan.shards},
    }


def _setup(root: Path, ctx):
    from muse_torchrec.train.trainer import build_sharded, open_prepared

    cfg = tiny_run.config(root, extra=[f"train.checkpoint_every={SAVE_EVERY}", "train.keep_checkpoints=5",
                                       f"train.limit_train_batches={STEPS}"])
    data = open_prepared(cfg)
    return cfg, data, build_sharded(cfg, data, ctx)


def train_save_reload(rank: int, root: str) -> None:
    """Train with checkpoints (snapshot at each save), then load the last one into another plan."""
    from muse_torchrec.train.distributed import init_distributed, shutdown
    from muse_torchrec.train.trainer import build_sharded, train, vocab_sizes

    root = Path(root)
    ctx = init_distributed("cpu")
    cfg, data, sharded = _setup(root, ctx)

    def save(progress):
        ck.save_checkpoint(ck.checkpoints_dir(cfg.train.run_dir), sharded, progress, cfg, vocab_sizes(data), ctx, 5)
        torch.save(snapshot(sharded), root / f"saved{progress.step}_{rank}.pt")

    train(cfg, data, sharded, ctx, checkpoint=save)
    other = build_sharded(tiny_run.config(root, extra=[OTHER_PLAN]), data, ctx)
    torch.rand(5)  # the RNG moves on; loading must put it back
    info = ck.read_info(ck.latest_checkpoint(ck.checkpoints_dir(cfg.train.run_dir)))
    ck.load_checkpoint(info, other, ctx, with_optimizer=True)
    torch.save(snapshot(other), root / f"loaded_{rank}.pt")
    shutdown()


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    tiny_run.prepare(root)
    tiny_run.spawn(train_save_reload, tiny_run.WORLD, root, str(root))
    return root


def _full(root: Path, pattern: str, world: int) -> dict:
    """Assembled full tensors of ``pattern.format(rank)`` snapshots; plain entries per rank."""
    snaps = [torch.load(root / pattern.format(r), weights_only=False) for r in range(world)]
    sharded = {part: tiny_run.assemble([s[part] for s in snaps], [s["sizes"][part] for s in snaps])
               for part in ("model", "optim")}
    return {"full": tiny_run.flat(sharded), "ranks": [tiny_run.flat({p: s[p] for p in ("model", "optim")}) for s in snaps],
            "rng": [s["torch_rng"] for s in snaps], "plan": snaps[0]["plan"]}


def _assert_same(a: dict, b: dict, keys) -> None:
    for key in keys:
        assert torch.equal(a[key], b[key]), key


def test_every_piece_of_state_round_trips_into_another_plan(two_rank_run):
    saved, loaded = _full(two_rank_run, f"saved{STEPS}_{{}}.pt", 2), _full(two_rank_run, "loaded_{}.pt", 2)
    assert saved["plan"]["item"] == "row_wise" and loaded["plan"]["item"] == "table_wise"
    keys = saved["full"]
    assert set(keys) == set(loaded["full"])
    # Embedding rows, fused row-wise Adagrad state, dense weights, Adam moments and steps, all exact.
    assert any("momentum1" in k for k in keys) and any(k.endswith("exp_avg_sq") for k in keys)
    _assert_same(saved["full"], loaded["full"], keys)
    for rank in range(2):
        dense = [k for k, v in saved["ranks"][rank].items() if isinstance(v, torch.Tensor)]
        _assert_same(saved["ranks"][rank], loaded["ranks"][rank], dense)
        assert torch.equal(saved["rng"][rank], loaded["rng"][rank])
    # BatchNorm statistics are per rank (nothing synchronises them after the start) and come back per rank.
    stats = "model/model.tower.mlp.layers.0.1.norm.running_mean"
    assert not torch.equal(saved["ranks"][0][stats], saved["ranks"][1][stats])
    progress = ck.read_info(ck.latest_checkpoint(ck.checkpoints_dir(two_rank_run / "run"))).progress
    assert (progress.step, progress.epoch, progress.samples) == (STEPS, 1, STEPS * 32 * 2)


def test_two_rank_checkpoint_loads_into_one_rank_and_trains_on(two_rank_run, monkeypatch):
    from muse_torchrec.train.trainer import run

    root = two_rank_run
    with tiny_run.process_group(monkeypatch) as ctx:
        cfg, data, sharded = _setup(root, ctx)
        info = ck.read_info(ck.latest_checkpoint(ck.checkpoints_dir(cfg.train.run_dir)))
        ck.load_checkpoint(info, sharded, ctx, with_optimizer=True)
        torch.save(snapshot(sharded), root / "one_rank.pt")
        # Further training on 1 rank: a run_dir holding the 2-rank checkpoint resumes from it (with the
        # plain step, so through the direct lookup: train/direct_lookup.py).
        shutil.copytree(ck.checkpoints_dir(cfg.train.run_dir), root / "further" / ck.CHECKPOINTS_DIR)
        run(tiny_run.config(root, run="further", extra=[f"train.limit_train_batches={STEPS}", "train.epochs=2",
                                                         "train.pipeline=plain"]), ctx)
    saved, one = _full(root, f"saved{STEPS}_{{}}.pt", 2), _full(root, "one_rank.pt", 1)
    assert set(saved["full"]) == set(one["full"])
    _assert_same(saved["full"], one["full"], saved["full"])
    metrics = json.loads((root / "further" / "metrics.json").read_text())
    assert metrics["world_size"] == 1 and metrics["train_steps"] == 2 * STEPS


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / (f"step_{step:08d}" + ("" if complete else ck.PARTIAL_SUFFIX))
    path.mkdir(parents=True)
    if complete:
        (path / ck.STATE_FILE).write_text("{}")
    return path


def test_latest_ignores_partial_saves_and_retention_keeps_the_newest(tmp_path):
    root = ck.checkpoints_dir(tmp_path)
    for step in (2, 4, 10):
        _fake_checkpoint(root, step)
    _fake_checkpoint(root, 12, complete=False)
    (root / "step_00000011").mkdir()  # no train_state.json: not complete
    assert ck.latest_checkpoint(root).name == "step_00000010"
    assert ck.resolve_checkpoint(tmp_path).name == "step_00000010"
    assert ck.resolve_checkpoint(root / "step_00000004").name == "step_00000004"
    ck.prune(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000010", "step_00000011",
                                                       "step_00000012.partial"]
    with pytest.raises(ck.CheckpointError, match="no complete checkpoint"):
        ck.resolve_checkpoint(tmp_path / "elsewhere")


def test_config_checks_name_the_keys(tmp_path):
    saved = tiny_run.config(tmp_path)
    info = ck.CheckpointInfo(path=tmp_path, progress=ck.TrainProgress(step=3), world_size=2,
                             vocab_sizes={"item": 10}, config=saved)
    # Free to change when resuming: where things live, how often to log and save, the plan, how the
    # lookups are called (the same computation, tests/test_direct_lookup.py).
    ck.check_resume_config(info, tiny_run.config(tmp_path, run="elsewhere", extra=[
        OTHER_PLAN, "train.log_every=7", "train.sparse_lookup=distributed"]))
    with pytest.raises(ck.CheckpointError, match=r"train.dense_lr: 0.001 in the checkpoint, 0.5 now"):
        ck.check_resume_config(info, tiny_run.config(tmp_path, extra=["train.dense_lr=0.5"]))
    # Evaluation only needs the same model.
    ck.check_model_config(info, tiny_run.config(tmp_path, extra=["train.dense_lr=0.5", "data.seed=3"]))
    with pytest.raises(ck.CheckpointError, match=r"model.k: 20 in the checkpoint, 30 now"):
        ck.check_model_config(info, tiny_run.config(tmp_path, extra=["model.k=30"]))
    with pytest.raises(ck.CheckpointError, match=r"item: 10 in the checkpoint, 11 now"):
        ck.check_vocab_sizes(info, {"item": 11}, "the data")
