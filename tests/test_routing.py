"""train.sparse_lookup "routed": each id sent to the rank holding its row by the data path
(``data/routing.py``), the rows' all-to-all by ``RoutedLookup`` (``train/direct_lookup.py``), against
TorchRec's forward, its reference, over 2 gloo ranks with every table row-wise:

- lookup by lookup: every feature's embeddings equal TorchRec's on random batches (each rank its
  own), also for features given in another key order, and so does the padding for the tower's
  graphs, which gathers the rows in the holding ranks' order through their order; a batch without
  a routing goes through TorchRec's forward; a routing made for another batch size is refused;
  the router holds its ``cuda_calls`` context (the data path's ``CAPTURE_LOCK``) around its CUDA
  parts only, never while an exchange waits for the other rank;
- the trainer end to end (GSU and routing in the data path's thread ahead, 2 epochs, evaluation),
  killed in a checkpoint save and resumed mid-epoch: the same loss at every log line, the same
  metrics and the same final checkpoint as an uninterrupted run through TorchRec's forward;
- one rank with the tables row-wise as on several (what ``bench_train --shard-as-on-several-ranks``
  times): 4 training steps from the same weights equal TorchRec's forward's, on the CPU and on a GPU
  (there with the tower's CUDA graphs, the rows' all-to-all replayed inside them), bit for bit with
  every id routed, up to the sums' rounding with each id routed once (``train.route_unique_ids``);
- the rows' all-to-all in fixed shapes (what those graphs replay) over 2 gloo ranks: the rows and
  their gradients as the launched all-to-all's, decided alike on both ranks, with every id routed
  or each (feature, id) once;
- one rank as the trainer shards it (table-wise: the GPU configs on one GPU) takes the direct lookup;
- settings: "routed" needs ``data.gsu_placement: device``.
"""

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.multiprocessing import ProcessExitedException

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_run  # noqa: E402
from random_data import VOCAB, random_block, random_scl  # noqa: E402
from test_direct_lookup import METHODS, _sharded, _trained as _trained_steps  # noqa: E402
from test_resume import SAVE_EVERY, killed_during_second_save  # noqa: E402

from muse_torchrec.config import ConfigError, load_config  # noqa: E402
from muse_torchrec.data.batch import BatchBuilder, sequence_features  # noqa: E402
from muse_torchrec.model.methods import build_model  # noqa: E402
from muse_torchrec.model.muse import SparseArch  # noqa: E402
from muse_torchrec.train import checkpoint as ck  # noqa: E402
from muse_torchrec.train import direct_lookup  # noqa: E402

BATCH, K, RECENT, MAX_HISTORY = 24, 6, 5, 40
ROUTED = ("train.sparse_lookup=routed", "data.gsu_placement=device", "train.pipeline=plain", tiny_run.ALL_ROW_WISE)


class _Phases:
    """A ``cuda_calls`` context that records how often it was entered and, per exchange, whether
    it was held."""

    def __init__(self) -> None:
        self.inside, self.entered, self.exchanged = False, 0, []

    def __enter__(self) -> None:
        self.inside, self.entered = True, self.entered + 1

    def __exit__(self, *exc) -> None:
        self.inside = False


def _routed_model():
    """This rank's small MUSE model, every table row-wise over the gloo ranks, routed."""
    from muse_torchrec.train.distributed import init_distributed
    from muse_torchrec.train.sharded import shard_model

    cfg = load_config(None, [*ROUTED, f"model.k={K}", f"data.recent={RECENT}", f"data.max_history={MAX_HISTORY}",
                             f"train.batch_size={BATCH}", "model.mlp=[32, 16]"])
    torch.manual_seed(0)
    return shard_model(build_model(cfg.model, VOCAB, sequence_features("scl_cosine"), RECENT, MAX_HISTORY), cfg,
                       init_distributed("cpu"))


def _lookups(rank: int, tmp: str) -> None:
    from muse_torchrec.train.distributed import shutdown

    sharded = _routed_model()
    arch = next(m for m in sharded.model.modules() if isinstance(m, SparseArch))
    router = sharded.router
    rng = np.random.default_rng(100 + rank)  # each rank its own batches
    builder = BatchBuilder(*random_scl(rng), gsu="scl_cosine", k=K, recent=RECENT, max_history=MAX_HISTORY,
                           pad_to=BATCH)
    equal, sent = [], []
    with torch.no_grad():
        for _ in range(3):
            batch = builder(random_block(rng, num_users=8, max_len=60))
            features = batch.sparse_features
            keys = features.keys()
            reference = arch.tables(features).wait()
            reversed_keys = features.permute(list(reversed(range(len(keys)))))
            for given, routing in ((features, router(features)), (reversed_keys, router(reversed_keys)),
                                   (features, None)):
                ours = arch.lookup(given, routing)
                equal.append(sorted(ours) == sorted(keys) and all(
                    torch.equal(ours[k].values(), reference[k].values()) for k in keys))
                sent.append(None if routing is None else routing.sent)
            # The padding for the tower's graphs from the rows in the holding ranks' order, gathered
            # through their order, as TorchRec's per-feature conversion (tests/test_row_layout.py);
            # unrouted (evaluation) from TorchRec's rows.
            want, want_side = arch(batch)
            for routing in (router(features), None):
                got, got_side = arch.padded(*arch.rows(replace(batch, routing=routing)), batch.topk_scores,
                                            batch.recent_scores)
                equal.append(torch.equal(got_side, want_side) and all(
                    torch.equal(getattr(got, f), getattr(want, f)) for f in ("target", "topk", "recent")))
        # The router holds ``cuda_calls`` around its CUDA parts, never around an exchange (which waits
        # for the other ranks), and routes as without it.
        phases, exchange = _Phases(), router._exchange
        router._exchange = lambda *args: (phases.exchanged.append(phases.inside), exchange(*args))
        held = arch.lookup(features, router(features, cuda_calls=phases))
        equal.append(all(torch.equal(held[k].values(), reference[k].values()) for k in keys))
        router._exchange = exchange
        try:
            arch.lookup(features, replace(router(features), batch_size=BATCH + 1))
            refused = ""
        except ValueError as error:
            refused = str(error)
    torch.save({"equal": equal, "sent": sent, "refused": refused, "lookups": sharded.lookups,
                "phases": (phases.entered, phases.exchanged)},
               Path(tmp, f"lookups{rank}.pt"))
    shutdown()


def test_routed_lookups_equal_torchrecs_over_two_ranks(tmp_path):
    tiny_run.spawn(_lookups, 2, tmp_path, str(tmp_path))
    for rank in range(2):
        out = torch.load(tmp_path / f"lookups{rank}.pt", weights_only=False)
        assert out["lookups"].startswith("2 ranks, row-wise: the ids routed by the data path"), out["lookups"]
        assert all(out["equal"]), out["equal"]
        # Ids went to both ranks (each holds half of every table's rows).
        assert all(min(s) > 0 for s in out["sent"] if s is not None), out["sent"]
        assert "a routing of 25 samples for a batch of 24" in out["refused"], out["refused"]
        assert out["phases"] == (3, [False, False]), out["phases"]


def _fixed_exchanges(rank: int, tmp: str, unique_ids: bool) -> None:
    from muse_torchrec.model.muse import weighted_loss
    from muse_torchrec.train.distributed import shutdown

    sharded = _routed_model()
    train = sharded.model.module
    arch = train.model.sparse_arch
    # On the CPU the trainer lays out no fixed exchange (no graphs); a router that does, as on a GPU.
    _, router = direct_lookup.use_direct_lookup(sharded.model, "routed", "plain", exchange_slack=1.25,
                                                unique_ids=unique_ids)
    rng = np.random.default_rng(200 + rank)
    builder = BatchBuilder(*random_scl(rng), gsu="scl_cosine", k=K, recent=RECENT, max_history=MAX_HISTORY,
                           pad_to=BATCH)
    equal, largest, fixed_routings, sent = [], [], [], []
    for _ in range(3):
        batch = builder(random_block(rng, num_users=8, max_len=60))
        routing = router(batch.sparse_features)
        fixed, ids = routing.fixed, batch.sparse_features.values().numel()
        features = batch.sparse_features
        distinct = {(key, int(i)) for key in features.keys() for i in features[key].values()}
        sent.append((sum(routing.sent), ids, len(distinct)))
        # The launched exchange (the reference) and the fixed one, from the same rows, to the same
        # gradient of every id's row.
        read = torch.randn(sum(routing.received), 4, requires_grad=True)
        grad = torch.randn(ids, 4)
        launched = direct_lookup._RowsAllToAll.apply(read, routing.as_received, routing.as_read, routing.received,
                                                     routing.sent, router.group)[routing.restore]
        (want_grad,) = torch.autograd.grad(launched, read, grad)
        padded = torch.cat([read, read.new_zeros(fixed.send_slots.numel() + 1 - read.shape[0], 4)])
        exchanged = arch.lookup.exchanged(padded, fixed.row_slots, fixed.send_slots)
        (got_grad,) = torch.autograd.grad(exchanged[fixed.order[:ids]], padded, grad)
        equal += [torch.equal(exchanged[fixed.order[:ids]], launched), torch.equal(got_grad[:read.shape[0]], want_grad),
                  not exchanged[fixed.order[ids:]].any(), not exchanged[-1].any()]
        # The model's loss from the rows this rank looked up, the exchange first, as its forward's.
        with torch.no_grad():
            batch = replace(batch, routing=routing)
            want = weighted_loss(train.model(batch), batch.labels, batch.weights)
            got, _ = train.loss_from_read_rows(train.loss_from_rows, *arch.read_rows(batch), batch.topk_scores,
                                               batch.recent_scores, batch.labels, batch.weights)
        equal.append(torch.equal(got, want))
        largest.append(max(*routing.sent, *routing.received))
        fixed_routings.append(routing)
    # C is set by the first batch, alike on every rank, and a batch fits or not alike on every rank:
    # at a C between the two ranks' largest counts, neither lays a fixed exchange out.
    capacity, largest_per_rank = router.fixed_capacity, [None, None]
    dist.all_gather_object(largest_per_rank, max(routing.sent))
    router.fixed_capacity = min(largest_per_rank)
    between = router(batch.sparse_features).fixed
    router.fixed_capacity = max(largest_per_rank)
    fits = router(batch.sparse_features).fixed
    try:
        arch.lookup.read_rows(batch.sparse_features, replace(routing, fixed=None))
        refused = ""
    except ValueError as error:
        refused = str(error)
    torch.save({"equal": equal, "largest": largest, "largest_per_rank": largest_per_rank,
                "between": between is None, "fits": fits is not None, "capacity": capacity,
                "capacities": [routing.fixed.peer_capacity for routing in fixed_routings],
                "ids_per_sample": router.ids_per_sample, "refused": refused, "sent": sent},
               Path(tmp, f"fixed{rank}.pt"))
    shutdown()


@pytest.mark.parametrize("unique_ids", [False, True])
def test_fixed_exchanges_send_the_rows_as_the_launched_one_over_two_ranks(tmp_path, unique_ids):
    """The rows' all-to-all in fixed shapes (what the step's CUDA graph replays): every id's row and
    every looked-up row's gradient equal the launched exchange's, the padding reads zeros, the
    model's loss from the rows looked up equals its forward's; a batch that does not fit on one rank
    is launched on both. With ``unique_ids`` each (feature, id) is sent once."""
    tiny_run.spawn(_fixed_exchanges, 2, tmp_path, str(tmp_path), unique_ids)
    outs = [torch.load(tmp_path / f"fixed{rank}.pt", weights_only=False) for rank in range(2)]
    for out in outs:
        assert all(out["equal"]), out["equal"]
        assert all(sent == (distinct if unique_ids else ids) and distinct < ids
                   for sent, ids, distinct in out["sent"]), out["sent"]
        # The router's fixed_capacity: 1.25 times the first batch's largest count over both ranks.
        assert out["capacities"] == [out["capacity"]] * 3 and out["fits"], out
        assert out["capacity"] < out["ids_per_sample"] * BATCH
        assert "the batch's routing has no fixed exchange" in out["refused"], out["refused"]
    first_largest = max(outs[0]["largest"][0], outs[1]["largest"][0])
    assert outs[0]["capacity"] == outs[1]["capacity"] == math.ceil(1.25 * first_largest), outs
    assert outs[0]["largest_per_rank"][0] != outs[0]["largest_per_rank"][1], outs[0]
    assert outs[0]["between"] and outs[1]["between"], outs


def _trained(rank: int, root: str, name: str, extra: tuple) -> None:
    """A 2-epoch run; writes how many batches this rank's router routed."""
    from muse_torchrec.data.routing import RowWiseRouter
    from muse_torchrec.train.distributed import init_distributed, shutdown
    from muse_torchrec.train.trainer import run

    routed, route = [], RowWiseRouter.__call__
    RowWiseRouter.__call__ = lambda self, features, **kwargs: routed.append(1) or route(self, features, **kwargs)
    cfg = tiny_run.config(Path(root), run=name, extra=["train.epochs=2", *extra])
    run(cfg, init_distributed("cpu"))
    Path(root, f"{name}_routed{rank}").write_text(str(len(routed)))
    shutdown()


def _final_state(root: Path, name: str) -> dict:
    """The run's final checkpoint (tables, optimizer states, dense weights) as full tensors."""
    dcp_to_torch_save(ck.latest_checkpoint(ck.checkpoints_dir(root / name)), root / f"{name}.pt")
    return tiny_run.flat(torch.load(root / f"{name}.pt", weights_only=False))


def test_trainer_routed_equals_torchrecs_forward(tmp_path):
    tiny_run.prepare(tmp_path)
    common = ("data.gsu_placement=device", "train.pipeline=plain", "data.num_workers=1", tiny_run.ALL_ROW_WISE)
    tiny_run.spawn(_trained, 2, tmp_path, str(tmp_path), "distributed",
                   (*common, "train.sparse_lookup=distributed", "train.checkpoint_every=null"))
    # Routed: killed in its second checkpoint save (step 8), resumed from the first (step 4, mid-epoch).
    routed = (*common, "train.sparse_lookup=routed", f"train.checkpoint_every={SAVE_EVERY}")
    with pytest.raises(ProcessExitedException):
        tiny_run.spawn(killed_during_second_save, 2, tmp_path, str(tmp_path), "routed", routed)
    tiny_run.spawn(_trained, 2, tmp_path, str(tmp_path), "routed", routed)
    runs = ("distributed", "routed")
    lines = {name: (tmp_path / name / "train_log.jsonl").read_text().splitlines() for name in runs}
    logs = {name: [(r["step"], r["loss"]) for r in map(json.loads, lines[name])] for name in runs}
    assert logs["routed"] == logs["distributed"] and len(logs["routed"]) == 9, logs
    # After the resume every training batch routed (5 left of the first epoch, 9 of the second),
    # evaluation's through TorchRec's forward.
    assert [int((tmp_path / f"{name}_routed{r}").read_text()) for name in ("distributed", "routed")
            for r in range(2)] == [0, 0, 14, 14]
    timing = ("train_samples_per_s", "train_samples_per_s_warm", "train_seconds")
    metrics = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in runs}
    metrics = {name: {k: v for k, v in values.items() if k not in timing} for name, values in metrics.items()}
    assert metrics["routed"] == metrics["distributed"]
    states = {name: _final_state(tmp_path, name) for name in runs}
    assert sorted(states["routed"]) == sorted(states["distributed"])
    assert any("embeddings.item" in key for key in states["routed"]), sorted(states["routed"])
    for key, value in states["distributed"].items():
        got = states["routed"][key]
        assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, key


def _one_rank(rank: int, device: str, tmp: str) -> None:
    from muse_torchrec.train.distributed import init_distributed, shutdown

    ctx = init_distributed(device)
    # On a GPU with the GPU configs' graphs: the routed rows reach the tower's graphs with their order.
    extra = (*ROUTED, "train.compile_mode=graphs") if device == "cuda" else ROUTED
    # "routed": every id sent, bit for bit as TorchRec's forward; "unique": each id once, against
    # TorchRec's forward with a row-wise optimizer (Adam moves every element by about its learning
    # rate whatever its gradient's size, so the sums' rounding flips elements whose repeats cancel).
    row_wise = (*extra, "train.sparse_optimizer=rowwise_adagrad")
    runs = {"routed": ("routed", (*extra, "train.route_unique_ids=false")), "distributed": ("distributed", extra),
            "unique": ("routed", (*row_wise, "train.route_unique_ids=true")), "row_wise": ("distributed", row_wise)}
    out = {method: {name: _trained_steps(method, device, setting, ctx, extra=given, several=True)
                    for name, (setting, given) in runs.items()} for method in METHODS}
    torch.save(out, Path(tmp, "one_rank.pt"))
    shutdown()


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
])
def test_one_rank_row_wise_routed_trains_as_torchrecs_forward(tmp_path, device):
    tiny_run.spawn(_one_rank, 1, tmp_path, device, str(tmp_path))
    out = torch.load(tmp_path / "one_rank.pt", weights_only=False)
    for method, runs in out.items():
        routed, distributed = runs["routed"], runs["distributed"]
        assert routed["lookups"].startswith("1 ranks, row-wise: the ids routed"), routed["lookups"]
        assert routed["losses"] == distributed["losses"] and routed["losses"][0] != routed["losses"][-1], method
        if device == "cuda" and method == "muse":
            # The rows' all-to-all replayed inside the loss step's graph at every step.
            assert routed["replays"] == {"graphs": 0, "exchanged_graphs": len(routed["losses"])}, routed["replays"]
        for key, value in distributed["state"].items():
            torch.testing.assert_close(routed["state"][key], value, rtol=0, atol=0, msg=f"{method}: {key}")
        # Each id routed once: its repeats' gradients summed before the table's backward, the same
        # training up to the sums' rounding.
        unique, row_wise = runs["unique"], runs["row_wise"]
        assert unique["losses"] == pytest.approx(row_wise["losses"], rel=1e-5), method
        if device == "cuda" and method == "muse":
            assert unique["replays"] == routed["replays"], unique["replays"]
        for key, value in row_wise["state"].items():
            torch.testing.assert_close(unique["state"][key], value, rtol=1e-4, atol=1e-6, msg=f"{method}: {key}")


def _one_rank_table_wise(rank: int, tmp: str) -> None:
    from muse_torchrec.train.distributed import init_distributed, shutdown

    sharded, arch = _sharded("muse", "cpu", "routed", init_distributed("cpu"), extra=ROUTED)
    torch.save({"lookup": type(arch.lookup).__name__, "router": sharded.router, "lookups": sharded.lookups},
               Path(tmp, "table_wise.pt"))
    shutdown()


def test_routed_on_one_gpu_calls_the_lookup_directly(tmp_path):
    """One rank as the trainer shards it (table-wise, what the GPU configs get on one GPU): "routed"
    takes the direct lookup, nothing to route."""
    tiny_run.spawn(_one_rank_table_wise, 1, tmp_path, str(tmp_path))
    out = torch.load(tmp_path / "table_wise.pt", weights_only=False)
    assert out["lookup"] == "DirectLookup" and out["router"] is None, out
    assert out["lookups"].startswith("one rank, table-wise"), out["lookups"]


def test_routed_needs_the_data_paths_thread_ahead():
    with pytest.raises(ConfigError, match="'routed' routes the ids in the data path's thread ahead"):
        direct_lookup.check_sparse_lookup("routed", "workers")
    direct_lookup.check_sparse_lookup("routed", "device")


def test_the_exchange_slack_sets_the_capacity_and_leaves_the_first_batch_room():
    from muse_torchrec.data.routing import RowWiseRouter, peer_capacity

    assert peer_capacity(100, 10_000) == 125 and peer_capacity(100, 10_000, 1.5) == 150
    assert peer_capacity(100, 130, 1.5) == 130  # never more than a whole batch
    direct_lookup.check_sparse_lookup("routed", "device", 1.0)
    for slack in (0.9, float("nan")):
        with pytest.raises(ConfigError, match="train.exchange_slack: .* at least 1"):
            direct_lookup.check_sparse_lookup("routed", "device", slack)
    with pytest.raises(ValueError, match="at least 1"):
        RowWiseRouter(["item"], [4], group=None, slack=0.5)


def test_routing_each_id_once_refuses_tables_past_its_keys(monkeypatch):
    """Each id once keys (feature, id) as feature * 2**40 + id: larger tables would mix features."""
    from muse_torchrec.data import routing

    monkeypatch.setattr(routing.dist, "get_world_size", lambda group: 2)
    routing.RowWiseRouter(["item"], [1 << 39], group=None, unique_ids=True)  # 2**40 rows over 2 ranks
    with pytest.raises(ValueError, match=r"keys ids below 2\*\*40, not tables of 1099511627778 rows"):
        routing.RowWiseRouter(["item"], [(1 << 39) + 1], group=None, unique_ids=True)
    routing.RowWiseRouter(["item"], [1 << 45], group=None)  # every id sent: any size


def test_the_trainer_warns_when_routed_batches_did_not_fit_the_fixed_exchange(caplog):
    from types import SimpleNamespace

    from muse_torchrec.model.muse import MuseTrain
    from muse_torchrec.train.trainer import _log_graph_replays

    train = MuseTrain(torch.nn.Identity())
    train.graphs, train.exchanged_graphs = SimpleNamespace(replays=3), SimpleNamespace(replays=7)
    fixed, launched = SimpleNamespace(ids_per_sample=20, slack=1.25), SimpleNamespace(ids_per_sample=None, slack=1.25)
    for router, warned in ((fixed, True), (launched, False), (None, False)):
        caplog.clear()
        with caplog.at_level("INFO", logger="muse_torchrec"):
            _log_graph_replays(SimpleNamespace(model=train, router=router), 10)
        assert "in this run's 10 training steps: graphs 3, exchanged_graphs 7" in caplog.text
        assert ("3 training steps launched their rows' exchange" in caplog.text) == warned, caplog.text
    train.graphs.replays = 0
    caplog.clear()
    _log_graph_replays(SimpleNamespace(model=train, router=fixed), 7)
    assert "launched" not in caplog.text


def test_direct_lookup_refuses_a_routed_batch():
    from muse_torchrec.data.routing import Routing

    features = BatchBuilder(*random_scl(np.random.default_rng(0)), gsu="scl_cosine", k=K, recent=RECENT,
                            max_history=MAX_HISTORY)(random_block(np.random.default_rng(1), 2, 10)).sparse_features
    lookup = direct_lookup.DirectLookup(torch.nn.Identity(), features.keys(), 8)
    routing = Routing(features, torch.zeros(0), torch.zeros(0), torch.zeros(0), [0], [0], features.stride())
    with pytest.raises(ValueError, match="a batch routed over several ranks"):
        lookup.flat(features, routing)


def test_padded_positions_skip_empty_parts():
    """Rows part after part (parts 0 and 2 from rank 0, 1 and 3 from rank 1), 5 places per rank:
    each row at its rank's places, in order; an empty part takes none."""
    from muse_torchrec.data.routing import _padded_positions

    positions = _padded_positions([2, 0, 3, 1], capacity=5, world_size=2, device=torch.device("cpu"))
    assert positions.tolist() == [0, 1, 0, 1, 2, 5]


def test_padded_positions_equal_a_plain_loop_on_random_parts():
    from muse_torchrec.data.routing import _padded_positions

    rng = np.random.default_rng(3)
    for world_size in (1, 2, 3, 8):
        counts = rng.integers(0, 6, size=2 * world_size).tolist()
        capacity = max(counts) + int(rng.integers(0, 3))
        want = [(part % world_size) * capacity + i for part, count in enumerate(counts) for i in range(count)]
        got = _padded_positions(counts, capacity, world_size, torch.device("cpu"))
        assert got.tolist() == want, (counts, capacity)
