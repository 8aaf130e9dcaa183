"""The dense part in DDP on one rank, and ``train.compile_mode: graphs`` (the tower's CUDA graphs and
GraphedAdam) under DDP (GPU).

On two or more GPUs DMP wraps the dense part in DDP, whose reducer hooks the parameters' gradient
accumulators; the graphed tower hands its parameters' gradients back through an autograd function
captured at the first step, inside DDP's forward. One NCCL rank with the dense part wrapped anyway
(``shard_model(ddp_on_one_rank=True)``) checks that path on one GPU: every tower parameter's
gradient goes through DDP's buckets at every step, and training is that of the same model without
DDP (a one-rank all-reduce changes nothing) and, within float tolerance, of the compiled tower
without graphs under DDP. On the CPU (one gloo rank) the eager tower checks the same wiring.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_data import VOCAB, random_block, random_scl  # noqa: E402

from muse_torchrec.config import load_config  # noqa: E402
from muse_torchrec.data.batch import BatchBuilder, sequence_features  # noqa: E402
from muse_torchrec.model.methods import build_model, get_method  # noqa: E402

STEPS, BATCH, K, RECENT, MAX_HISTORY = 5, 24, 6, 5, 40
# device -> {run name: (train.compile_mode, the dense part in DDP)}; the first run is compared with the others.
RUNS = {
    "cuda": {"graphs_ddp": ("graphs", True), "graphs": ("graphs", False), "compiled_ddp": ("default", True)},
    "cpu": {"eager_ddp": ("none", True), "eager": ("none", False)},
}


def _config(compile_mode: str):
    return load_config(None, [
        f"train.compile_mode={compile_mode}", "train.pipeline=plain", f"model.k={K}", f"data.recent={RECENT}",
        f"data.max_history={MAX_HISTORY}", "train.sparse_optimizer=sgd", f"train.batch_size={BATCH}",
        "model.mlp=[32, 16]",
    ])


def _batches():
    rng = np.random.default_rng(0)
    builder = BatchBuilder(*random_scl(rng), gsu="scl_cosine", k=K, recent=RECENT, max_history=MAX_HISTORY,
                           pad_to=BATCH)
    return [builder(random_block(rng, num_users=8, max_len=60)) for _ in range(STEPS)]


def _train(compile_mode: str, ddp: bool, ctx) -> dict:
    """Losses, the dense state after training, and which tower parameters DDP reduced at each step."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from muse_torchrec.model.muse import DenseTower
    from muse_torchrec.train.sharded import load_unsharded_state, shard_model
    from muse_torchrec.train.step import make_stepper

    cfg = _config(compile_mode)
    features = sequence_features(get_method("muse").gsu)
    torch.manual_seed(0)
    start = build_model(cfg.model, VOCAB, features, RECENT, MAX_HISTORY, device=torch.device("cpu")).state_dict()
    sharded = shard_model(build_model(cfg.model, VOCAB, features, RECENT, MAX_HISTORY), cfg, ctx,
                          ddp_on_one_rank=ddp)
    load_unsharded_state(sharded.model, start)
    tower = next(m for m in sharded.model.modules() if isinstance(m, DenseTower))
    tower_names = {id(p): n for n, p in tower.named_parameters()}
    reduced: list = []
    wrappers = [m for m in sharded.model.modules() if isinstance(m, DistributedDataParallel)]
    assert len(wrappers) == int(ddp)
    for wrapper in wrappers:
        def hook(state, bucket):
            reduced[-1].update(tower_names[id(p)] for p in bucket.parameters() if id(p) in tower_names)
            return default_hooks.allreduce_hook(state, bucket)

        wrapper.register_comm_hook(None, hook)
    stepper = make_stepper("plain", sharded.model, sharded.optimizer, ctx.device)
    batches = iter(_batches())
    losses = []
    for _ in range(STEPS):
        reduced.append(set())
        losses.append(float(stepper.progress(batches)[0]))
    if compile_mode == "graphs":
        assert tower.graphs.graphed is not None  # the steps replayed the captured graphs
    dense = {k: v.detach().cpu() for k, v in sharded.model.state_dict().items()
             if isinstance(v, torch.Tensor) and ".sparse_arch.tables." not in k}
    return {"losses": losses, "dense": dense, "reduced": [sorted(r) for r in reduced],
            "tower_params": sorted(tower_names.values())}


def _worker(rank: int, device: str, tmp: str, port: str) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
    from muse_torchrec.train.distributed import init_distributed, shutdown

    ctx = init_distributed(device)
    assert ctx.device.type == device
    torch.save({name: _train(mode, ddp, ctx) for name, (mode, ddp) in RUNS[device].items()}, Path(tmp, "runs.pt"))
    shutdown()


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
])
def test_dense_part_in_ddp_on_one_rank(tmp_path, device):
    """Same (one-rank) training with and without DDP, and every tower gradient through DDP's buckets
    at every step; on the GPU the graphed tower under DDP also follows the compiled tower under DDP."""
    from muse_torchrec.train.distributed import _free_port

    mp.spawn(_worker, args=(device, str(tmp_path), str(_free_port())), nprocs=1, join=True)
    runs = torch.load(tmp_path / "runs.pt")
    (name, first), *others = runs.items()
    tower = first["tower_params"]
    assert tower and first["reduced"] == [tower] * STEPS, f"{name}: DDP did not reduce every tower gradient"
    assert first["losses"][-1] != first["losses"][0]
    for other_name, other in others:
        ddp = RUNS[device][other_name][1]
        assert other["reduced"] == ([tower] * STEPS if ddp else [[]] * STEPS)
        # Without DDP the run is the same computation; another tower function within float tolerance.
        same = RUNS[device][other_name][0] == RUNS[device][name][0]
        rtol, atol = (1e-6, 1e-7) if same else (1e-4, 1e-5)
        assert other["losses"] == pytest.approx(first["losses"], rel=rtol), other_name
        assert other["dense"].keys() == first["dense"].keys()
        for key, value in first["dense"].items():
            torch.testing.assert_close(other["dense"][key], value, rtol=rtol, atol=atol, msg=f"{other_name}: {key}")
