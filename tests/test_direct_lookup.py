"""train.sparse_lookup: on one rank, the sharded collection's lookup called directly
(``train/direct_lookup.py``) against TorchRec's forward, its reference.

- lookup by lookup: every feature's embeddings and lengths equal to TorchRec's, on random batches of
  two methods (top-K and whole-history features), also for features given in another key order;
  features the collection does not have are refused;
- step by step: a model trained with it and one trained through TorchRec's forward, from the same
  weights, give the same losses and end with the same tables and dense weights;
- where it is not used: ``distributed``, TorchRec's pipeline, unknown settings (2 ranks:
  tests/test_sharded.py checks that no sparse arch got one).

On CPU (gloo) and, where there is one, a CUDA GPU (NCCL, fused Adam).
"""

import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed._shard.sharded_tensor import ShardedTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_data import VOCAB, random_block, random_scl  # noqa: E402
from test_dense_sync import _dist_env  # noqa: E402

from muse_torchrec.config import ConfigError, load_config  # noqa: E402
from muse_torchrec.data.batch import BatchBuilder, sequence_features  # noqa: E402
from muse_torchrec.model.methods import build_model, get_method  # noqa: E402
from muse_torchrec.model.muse import SparseArch  # noqa: E402
from muse_torchrec.train import direct_lookup  # noqa: E402
from muse_torchrec.train.distributed import _free_port  # noqa: E402

STEPS, BATCH, K, RECENT, MAX_HISTORY = 4, 24, 6, 5, 40
METHODS = ("muse", "sim_soft")
SPARSE_OPTIMIZER = {"cpu": "rowwise_adagrad", "cuda": "adam"}


def _config(method: str, device: str, sparse_lookup: str, pipeline: str = "plain", extra: Sequence[str] = ()):
    # ``extra`` may name another sparse optimizer, not another lookup.
    return load_config(None, [f"train.sparse_optimizer={SPARSE_OPTIMIZER[device]}", *extra,
        f"model.method={method}", f"train.sparse_lookup={sparse_lookup}", f"train.pipeline={pipeline}",
        f"model.k={K}", f"data.recent={RECENT}", f"data.max_history={MAX_HISTORY}", "train.sparse_lr=0.1",
        f"train.batch_size={BATCH}", "model.mlp=[32, 16]",
    ])


def _batches(method: str, seed: int):
    rng = np.random.default_rng(seed)
    builder = BatchBuilder(*random_scl(rng), gsu=get_method(method).gsu, k=K, recent=RECENT,
                           max_history=MAX_HISTORY, pad_to=BATCH)
    return [builder(random_block(rng, num_users=8, max_len=60)) for _ in range(STEPS)]


def _sharded(method: str, device: str, sparse_lookup: str, ctx, pipeline: str = "plain", extra: Sequence[str] = (),
             several: bool = False):
    """``several``: the tables sharded as on several ranks (``shard_model(shard_as_on_several_ranks)``)."""
    from muse_torchrec.train.sharded import load_unsharded_state, shard_model

    cfg = _config(method, device, sparse_lookup, pipeline, extra)
    features = sequence_features(get_method(method).gsu)
    torch.manual_seed(0)
    start = build_model(cfg.model, VOCAB, features, RECENT, MAX_HISTORY, device=torch.device("cpu")).state_dict()
    sharded = shard_model(build_model(cfg.model, VOCAB, features, RECENT, MAX_HISTORY), cfg, ctx,
                          shard_as_on_several_ranks=several)
    load_unsharded_state(sharded.model, start)
    return sharded, next(m for m in sharded.model.modules() if isinstance(m, SparseArch))


def _lookups_equal(method: str, device: str, ctx) -> dict:
    """Per batch, whether every feature's embeddings and lengths equal TorchRec's (as given, and with
    the keys reversed), and the refusal of a batch missing a feature."""
    _, arch = _sharded(method, device, "direct", ctx)
    assert isinstance(arch.lookup, direct_lookup.DirectLookup)
    equal = []
    with torch.no_grad():
        for batch in _batches(method, seed=1):
            batch = batch.to(ctx.device)
            features = batch.sparse_features
            keys = features.keys()
            reference = arch.tables(features).wait()
            for given in (features, features.permute(list(reversed(range(len(keys)))))):
                ours = arch.lookup(given)
                equal.append(sorted(ours) == sorted(keys) and all(
                    torch.equal(ours[k].values(), reference[k].values())
                    and torch.equal(ours[k].lengths(), reference[k].lengths()) for k in keys))
            equal.append(bool(ours[keys[0]].values().shape[0]))  # the batches are not empty
            # The padding from the lookup's flat rows (tests/test_row_layout.py) as from its features.
            (want, want_side), (got, got_side) = arch(batch), arch.padded(
                *arch.rows(batch), batch.topk_scores, batch.recent_scores)
            equal.append(torch.equal(got_side, want_side) and all(torch.equal(getattr(got, f), getattr(want, f))
                                                                  for f in ("target", "topk", "recent")))
        try:
            arch.lookup(features.permute(list(range(len(keys) - 1))))
            refused = ""
        except ValueError as error:
            refused = str(error)
    return {"equal": equal, "refused": refused}


def _trained(method: str, device: str, sparse_lookup: str, ctx, extra: Sequence[str] = (), several: bool = False) -> dict:
    """``STEPS`` plain steps from the same weights; batches routed where the lookup needs it."""
    from muse_torchrec.model.muse import loss_step_replays
    from muse_torchrec.train.step import make_stepper

    sharded, arch = _sharded(method, device, sparse_lookup, ctx, extra=extra, several=several)
    assert (arch.lookup is not None) == (sparse_lookup != "distributed"), sharded.lookups
    stepper = make_stepper("plain", sharded.model, sharded.optimizer, ctx.device)
    router = sharded.router
    batches = iter([b if router is None else replace(b, routing=router(b.sparse_features))
                    for b in _batches(method, seed=2)])
    losses = [float(stepper.progress(batches)[0]) for _ in range(STEPS)]
    state = {k: (v.local_shards()[0].tensor if isinstance(v, ShardedTensor) else v).detach().cpu().clone()
             for k, v in sharded.model.state_dict().items()}
    # How often each of the loss step's graphs replayed (with train.compile_mode "graphs").
    return {"losses": losses, "state": state, "lookups": sharded.lookups,
            "replays": loss_step_replays(sharded.model)}


def _worker(rank: int, device: str, tmp: str, port: str) -> None:
    _dist_env(0, 1, port)
    from muse_torchrec.train.distributed import init_distributed, shutdown

    ctx = init_distributed(device)
    assert ctx.device.type == device
    out = {}
    for method in METHODS:
        out[method] = {"lookup": _lookups_equal(method, device, ctx),
                       **{setting: _trained(method, device, setting, ctx) for setting in ("direct", "distributed")}}
    _, arch = _sharded("muse", device, "direct", ctx, pipeline="sparse_dist")
    out["pipeline_lookup"] = arch.lookup
    torch.save(out, Path(tmp, "out.pt"))
    shutdown()


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
])
def test_direct_lookup_computes_as_torchrec(tmp_path, device):
    mp.spawn(_worker, args=(device, str(tmp_path), str(_free_port())), nprocs=1, join=True)
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    for method in METHODS:
        runs = out[method]
        assert all(runs["lookup"]["equal"]), (method, runs["lookup"]["equal"])
        assert "are not the embedding collection's features" in runs["lookup"]["refused"], method
        direct, distributed = runs["direct"], runs["distributed"]
        assert direct["lookups"] == "one rank, table-wise: the lookup called directly"
        assert distributed["lookups"] == "TorchRec's forward (train.sparse_lookup: distributed)"
        assert direct["losses"][-1] != direct["losses"][0], method
        assert direct["losses"] == distributed["losses"], method
        assert sorted(direct["state"]) == sorted(distributed["state"])
        for key, value in distributed["state"].items():
            torch.testing.assert_close(direct["state"][key], value, rtol=0, atol=0, msg=f"{method}: {key}")
    assert out["pipeline_lookup"] is None


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="train.sparse_lookup: unknown 'fast'"):
        direct_lookup.check_sparse_lookup("fast", "device")
    description, router = direct_lookup.use_direct_lookup(torch.nn.Linear(2, 2), "distributed", "plain")
    assert description.startswith("TorchRec's") and router is None
    with pytest.raises(ConfigError, match="train.sparse_lookup"):
        direct_lookup.use_direct_lookup(torch.nn.Linear(2, 2), "fast", "plain")


def test_unsharded_collection_keeps_its_forward():
    cfg = _config("muse", "cpu", "direct")
    model = build_model(cfg.model, VOCAB, sequence_features("scl_cosine"), RECENT, MAX_HISTORY, device=torch.device("cpu"))
    assert "not a ShardedEmbeddingCollection" in direct_lookup.use_direct_lookup(model, "direct", "plain")[0]
    assert model.model.sparse_arch.lookup is None
