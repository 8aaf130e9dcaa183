"""train.dense_sync: how the dense part stays identical over ranks.

- over two gloo ranks, ``ReplicatedDense`` gives every rank rank 0's parameters and buffers, and
  ``GradientAverage`` averages the ranks' gradients (parameters without one keep none);
- settings are checked: unknown names, and "ddp" with compile_mode "graphs", whose capture CUDA
  refuses inside DDP's forward (seen on an H100: "operation would make the legacy stream depend on
  a capturing blocking stream");
- one rank synchronised as on several (``shard_model(sync_dense_on_one_rank=True)``) trains exactly as
  one rank unsynchronised, every dense gradient going through the all-reduce (or, for "ddp", every
  tower gradient through DDP's buckets) at every step, with the same model and optimizer state keys
  (checkpoints move between the settings); on a GPU the graphed tower (captured at the
  first step) is checked so, and against the compiled tower without graphs.

Two ranks against one process: tests/test_sharded.py (both settings).
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_data import VOCAB, random_block, random_scl  # noqa: E402

from muse_torchrec.config import ConfigError, load_config  # noqa: E402
from muse_torchrec.data.batch import BatchBuilder, sequence_features  # noqa: E402
from muse_torchrec.model.methods import build_model, get_method  # noqa: E402
from muse_torchrec.train import dense_sync  # noqa: E402
from muse_torchrec.train.distributed import _free_port  # noqa: E402

STEPS, BATCH, K, RECENT, MAX_HISTORY = 5, 24, 6, 5, 40
# device -> {run name: (train.compile_mode, train.dense_sync, synchronised on one rank)}; the first
# run is compared with the others.
RUNS = {
    "cuda": {"graphs_synced": ("graphs", "allreduce", True), "graphs": ("graphs", "allreduce", False),
             "compiled_synced": ("default", "allreduce", True)},
    "cpu": {"eager_synced": ("none", "allreduce", True), "eager": ("none", "allreduce", False),
            "eager_ddp": ("none", "ddp", True)},
}


def _dist_env(rank: int, world: int, port: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")


def _two_rank_worker(rank: int, tmp: str, port: str) -> None:
    from types import SimpleNamespace

    from torchrec.distributed.types import ShardingEnv

    _dist_env(rank, 2, port)
    dist.init_process_group("gloo")
    torch.manual_seed(rank)
    dense = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    dense[1].running_mean.uniform_()
    dense_sync.ReplicatedDense().wrap(SimpleNamespace(_dmp_wrapped_module=dense),
                                      ShardingEnv.from_process_group(dist.group.WORLD), torch.device("cpu"))
    torch.save(dense.state_dict(), Path(tmp, f"dense{rank}.pt"))
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(1))]
    params[0].grad = torch.full((3, 2), float(rank + 1))
    params[1].grad = torch.arange(4.0) * (rank + 1)
    optimizer = torch.optim.SGD(params, lr=0.0)
    dense_sync.GradientAverage()(optimizer, (), {})
    torch.save([p.grad for p in params], Path(tmp, f"grads{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_start_from_rank_0_and_average_gradients(tmp_path):
    mp.spawn(_two_rank_worker, args=(str(tmp_path), str(_free_port())), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"dense{rank}.pt") for rank in range(2)]
    torch.manual_seed(1)
    assert not torch.equal(states[0]["0.weight"], torch.nn.Linear(3, 4).weight)  # rank 1 started elsewhere
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, rtol=0, atol=0, msg=key)
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        torch.testing.assert_close(grads[0], torch.full((3, 2), 1.5))
        torch.testing.assert_close(grads[1], torch.arange(4.0) * 1.5)
        assert grads[2] is None


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="train.dense_sync: unknown 'nccl'"):
        dense_sync.check_dense_sync("nccl", "none")
    with pytest.raises(ConfigError, match="'ddp' cannot run train.compile_mode 'graphs'"):
        dense_sync.check_dense_sync("ddp", "graphs")
    for name in dense_sync.DENSE_SYNCS:
        dense_sync.check_dense_sync(name, "reduce-overhead")
    dense_sync.check_dense_sync("allreduce", "graphs")


def _config(compile_mode: str, sync: str):
    return load_config(None, [
        f"train.compile_mode={compile_mode}", f"train.dense_sync={sync}", "train.pipeline=plain", f"model.k={K}",
        f"data.recent={RECENT}", f"data.max_history={MAX_HISTORY}", "train.sparse_optimizer=sgd",
        f"train.batch_size={BATCH}", "model.mlp=[32, 16]",
    ])


def _batches():
    rng = np.random.default_rng(0)
    builder = BatchBuilder(*random_scl(rng), gsu="scl_cosine", k=K, recent=RECENT, max_history=MAX_HISTORY,
                           pad_to=BATCH)
    return [builder(random_block(rng, num_users=8, max_len=60)) for _ in range(STEPS)]


def _train(compile_mode: str, sync: str, on_one_rank: bool, ctx) -> dict:
    """Losses, the dense state after training, and what was synchronised at each step: the sizes of
    the all-reduces, and the tower parameters DDP's buckets held."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from muse_torchrec.model.muse import DenseTower, MuseTrain
    from muse_torchrec.train.sharded import load_unsharded_state, shard_model
    from muse_torchrec.train.step import make_stepper

    cfg = _config(compile_mode, sync)
    features = sequence_features(get_method("muse").gsu)
    torch.manual_seed(0)
    start = build_model(cfg.model, VOCAB, features, RECENT, MAX_HISTORY, device=torch.device("cpu")).state_dict()
    sharded = shard_model(build_model(cfg.model, VOCAB, features, RECENT, MAX_HISTORY), cfg, ctx,
                          sync_dense_on_one_rank=on_one_rank)
    load_unsharded_state(sharded.model, start)
    tower = next(m for m in sharded.model.modules() if isinstance(m, DenseTower))
    tower_names = {id(p): n for n, p in tower.named_parameters()}
    all_reduced: list = []  # per step, the sizes of the tensors all-reduced, and whether into a CUDA graph
    in_buckets: list = []  # per step, the tower parameters in DDP's buckets
    wrappers = [m for m in sharded.model.modules() if isinstance(m, DistributedDataParallel)]
    assert len(wrappers) == int(sync == "ddp" and on_one_rank)
    for wrapper in wrappers:
        def hook(state, bucket):
            in_buckets[-1].extend(tower_names[id(p)] for p in bucket.parameters() if id(p) in tower_names)
            return default_hooks.allreduce_hook(state, bucket)

        wrapper.register_comm_hook(None, hook)
    all_reduce = dense_sync.dist.all_reduce

    def recorded_all_reduce(tensor, *args, **kwargs):
        all_reduced[-1].append((tensor.numel(), tensor.is_cuda and torch.cuda.is_current_stream_capturing()))
        return all_reduce(tensor, *args, **kwargs)

    dense_sync.dist.all_reduce = recorded_all_reduce
    stepper = make_stepper("plain", sharded.model, sharded.optimizer, ctx.device)
    batches = iter(_batches())
    losses = []
    try:
        for _ in range(STEPS):
            all_reduced.append([])
            in_buckets.append([])
            losses.append(float(stepper.progress(batches)[0]))
    finally:
        dense_sync.dist.all_reduce = all_reduce
    if compile_mode == "graphs":
        train = next(m for m in sharded.model.modules() if isinstance(m, MuseTrain))
        assert train.graphs.replays == STEPS  # every step replayed the captured graph (the padding, the loss)
    dense = {k: v.detach().cpu() for k, v in sharded.model.state_dict().items()
             if isinstance(v, torch.Tensor) and ".sparse_arch.tables." not in k}
    dense_numel = sum(p.numel() for n, p in sharded.model.named_parameters() if ".sparse_arch.tables." not in n)
    # Checkpoints hold these keys: a run resumes under either setting.
    keys = {"model": sorted(sharded.model.state_dict()), "optimizer": sorted(sharded.optimizer.state_dict()["state"])}
    return {"losses": losses, "dense": dense, "all_reduced": all_reduced, "in_buckets": [sorted(b) for b in in_buckets],
            "keys": keys,
            "tower_params": sorted(tower_names.values()), "dense_numel": dense_numel}


def _one_rank_worker(rank: int, device: str, tmp: str, port: str) -> None:
    _dist_env(0, 1, port)
    from muse_torchrec.train.distributed import init_distributed, shutdown

    ctx = init_distributed(device)
    assert ctx.device.type == device
    torch.save({name: _train(*run, ctx) for name, run in RUNS[device].items()}, Path(tmp, "runs.pt"))
    shutdown()


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
])
def test_one_rank_synchronised_trains_as_unsynchronised(tmp_path, device):
    mp.spawn(_one_rank_worker, args=(device, str(tmp_path), str(_free_port())), nprocs=1, join=True)
    runs = torch.load(tmp_path / "runs.pt")
    name, first = next(iter(runs.items()))
    assert first["losses"][-1] != first["losses"][0]
    for run_name, run in runs.items():
        compile_mode, sync, on_one_rank = RUNS[device][run_name]
        if not on_one_rank:
            assert run["all_reduced"] == run["in_buckets"] == [[]] * STEPS, run_name
        elif sync == "allreduce" and compile_mode == "graphs":
            # Every dense gradient in one all-reduce: launched at the first step (no Adam state yet),
            # captured into the dense Adam's graph at the second, which every later step replays.
            n = run["dense_numel"]
            assert run["all_reduced"] == [[(n, False)], [(n, True)]] + [[]] * (STEPS - 2), run_name
            assert run["in_buckets"] == [[]] * STEPS, run_name
        elif sync == "allreduce":  # every dense gradient in one all-reduce a step
            assert run["all_reduced"] == [[(run["dense_numel"], False)]] * STEPS, run_name
            assert run["in_buckets"] == [[]] * STEPS, run_name
        else:  # every tower gradient through DDP's buckets
            assert run["in_buckets"] == [run["tower_params"]] * STEPS, run_name
        if run_name == name:
            continue
        # The same computation when the tower's function is the same; another one within float tolerance.
        rtol, atol = (1e-6, 1e-7) if compile_mode == RUNS[device][name][0] else (1e-4, 1e-5)
        assert run["losses"] == pytest.approx(first["losses"], rel=rtol), run_name
        assert run["keys"] == first["keys"], run_name
        for key, value in first["dense"].items():
            torch.testing.assert_close(run["dense"][key], value, rtol=rtol, atol=atol, msg=f"{run_name}: {key}")
