"""Host time a batch of the data path's routing (``data.routing.RowWiseRouter``) over W ranks, by phase.

Why: with ``train.sparse_lookup: routed`` every training batch's ids are sent to the ranks holding
their rows by the data path's thread ahead of the step, over a gloo group of its own. On 2 H200
that took 1.9-2.2 ms a batch with the p90 vocabulary and 4.84 ms with the full one, longer than the
full vocabulary's 3.4 ms model step (benchmarks/RESULTS.md rows 94-95), which would then bound
the step end to end. This runs the router alone on the config's batch shapes and vocabulary, and
splits each routing into its phases: with ``train.route_unique_ids`` each feature's distinct ids
(a sort on the batch's device, and the wait for its count), the bucketisation (on the batch's device, with the copies of
its output to the host and the one wait for them), the exchange of the lengths, the exchange of the
ids, what the received ids become on the device (the ``Routing``) and, as the trainer's router with
``train.exchange_in_graphs`` and "graphs", the rows' all-to-all laid out in fixed shapes
(``Routing.fixed``; ``--set train.exchange_in_graphs=false`` leaves it out). An exchange's time includes
waiting for the other ranks to reach it; ``--barrier`` meets them before every routing, so that the
phases hold less of the ranks' skew.

The router needs no NCCL, so several ranks may share a GPU (rank r takes GPU r mod the GPUs there
are): one H100 can time 2 or 4 ranks' routing.

    torchrun --nproc_per_node 2 benchmarks/bench_routing.py --config configs/taobao_mm_full.yaml --out routing.json

Prints a table on rank 0 and writes every rank's phases as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from typing import Callable, Dict, List, Mapping, Optional

import torch
import torch.distributed as dist

from muse_torchrec import features as F
from muse_torchrec.config import ExperimentConfig, load_config
from muse_torchrec.data.batch import Batch, sequence_features
from muse_torchrec.data.routing import RowWiseRouter
from muse_torchrec.model.methods import build_model, get_method
from muse_torchrec.process import end_process
from bench_train import Shapes, staged_batches

# What each exchange of a routing sends, in the order the router makes them.
EXCHANGES = ("lengths exchange", "ids exchange")
PHASES = ("distinct ids", "bucketise + copy to host", *EXCHANGES, "routing on the device", "fixed exchange layout")


class PhaseTimer:
    """Wall time of the router's phases, summed over the routings timed.

    ``timed(router)`` wraps the router's own steps (``_distinct``, ``_bucketised``, ``_exchange``,
    ``_read``, ``_fixed``) on that instance, so the router runs its code unchanged; ``_exchange`` is
    named by its place in a routing (``EXCHANGES``)."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = defaultdict(float)
        self._exchanges = 0

    def _wrapped(self, call: Callable, name: Callable[[], str]) -> Callable:
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds[name()] += time.perf_counter() - start
        return run

    def _exchange_name(self) -> str:
        name = EXCHANGES[self._exchanges % len(EXCHANGES)]
        self._exchanges += 1
        return name

    def timed(self, router: RowWiseRouter) -> RowWiseRouter:
        router._distinct = self._wrapped(router._distinct, lambda: PHASES[0])
        router._bucketised = self._wrapped(router._bucketised, lambda: PHASES[1])
        router._exchange = self._wrapped(router._exchange, self._exchange_name)
        router._read = self._wrapped(router._read, lambda: PHASES[4])
        router._fixed = self._wrapped(router._fixed, lambda: PHASES[5])
        return router

    def reset(self) -> None:
        self.seconds.clear()
        self._exchanges = 0


def router_for(batch: Batch, vocab: Mapping[str, int], group: dist.ProcessGroup,
               ids_per_sample: Optional[int], slack: float, unique_ids: bool) -> RowWiseRouter:
    """A router for ``batch``'s sparse features over row-wise tables of ``vocab`` rows, in blocks of
    ceil(rows / W) per rank (TorchRec's row-wise shards); ``ids_per_sample``, ``slack``,
    ``unique_ids``: the router's."""
    tables = {**F.SEQUENCE_FEATURES, **F.HISTORY_FEATURES, **F.SIDE_FEATURES}
    names = F.lookup_order(batch.sparse_features.keys())
    world = dist.get_world_size(group)
    return RowWiseRouter(names, [-(-vocab[tables[name]] // world) for name in names], group, ids_per_sample, slack,
                         unique_ids)


def trainers_ids_per_sample(cfg: ExperimentConfig, vocab: Mapping[str, int]) -> Optional[int]:
    """What the trainer's router gets (``direct_lookup.use_direct_lookup``): the model's most ids a
    sample holds where it lays out fixed exchanges, else None."""
    if not (cfg.train.exchange_in_graphs and cfg.train.compile_mode == "graphs"):
        return None
    model = build_model(cfg.model, vocab, sequence_features(get_method(cfg.model.method).gsu), cfg.data.recent,
                        cfg.data.max_history)  # on the meta device: no memory
    return model.model.sparse_arch.row_layout.capacity(1) if model.model.pads_in_graphs else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_routings(router: RowWiseRouter, batches: List[Batch], routings: int, warmup: int, barrier: bool,
                  device: torch.device) -> Dict[str, float]:
    """Milliseconds a routing, in all and by phase (``PHASES``; "other": the rest of the call), over
    ``routings`` routings of ``batches`` cycled, after ``warmup`` more."""
    timer = PhaseTimer()
    timer.timed(router)
    total = 0.0
    for i in range(warmup + routings):
        if i == warmup:
            timer.reset()
            total = 0.0
        if barrier:
            dist.barrier()
        start = time.perf_counter()
        router(batches[i % len(batches)].sparse_features)
        _sync(device)
        total += time.perf_counter() - start
    per_routing = {phase: 1000 * timer.seconds[phase] / routings for phase in PHASES}
    per_routing["other"] = 1000 * total / routings - sum(per_routing.values())
    per_routing["total"] = 1000 * total / routings
    return per_routing


def _device(local_rank: int, requested: str) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def format_table(results: Mapping[str, object]) -> str:
    rows = [f"routing over {results['world_size']} rank(s), {results['config']}, "
            f"{results['ids_per_batch']:,} ids a batch; ms a batch, per rank:"]
    ranks = results["ranks"]
    rows.append(f"{'phase':>26} " + " ".join(f"{'rank ' + str(r):>9}" for r in range(len(ranks))))
    for phase in (*PHASES, "other", "total"):
        rows.append(f"{phase:>26} " + " ".join(f"{rank[phase]:9.3f}" for rank in ranks))
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/taobao_mm_p90.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--routings", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--distinct-batches", type=int, default=8, help="batches built, then cycled")
    parser.add_argument("--samples-per-user", type=int, default=11)
    parser.add_argument("--scl-rows", type=int, default=100_000, help="SCL table rows the batches' GSU reads")
    parser.add_argument("--barrier", action="store_true", help="meet the other ranks before every routing")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    cfg = load_config(args.config, args.set)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        device = _device(int(os.environ.get("LOCAL_RANK", "0")), args.device)
        vocab = dict(cfg.sharding.plan_vocab_sizes) or {t.name: 1000 for t in F.TABLES}
        shapes = Shapes(cfg.train.batch_size, cfg.data.max_history, args.samples_per_user, args.scl_rows)
        batches = staged_batches(cfg, vocab, shapes, args.distinct_batches, seed=1000 + rank, device=device)
        router = router_for(batches[0], vocab, dist.group.WORLD, trainers_ids_per_sample(cfg, vocab),
                            cfg.train.exchange_slack, cfg.train.route_unique_ids)
        mine = time_routings(router, batches, args.routings, args.warmup, args.barrier, device)
        ranks: List[Dict[str, float]] = [{} for _ in range(world)]
        dist.all_gather_object(ranks, mine)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        results = {"config": args.config, "overrides": args.set, "world_size": world, "device": str(device),
                   "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "batch_size": cfg.train.batch_size, "history": cfg.data.max_history, "barrier": args.barrier,
                   "routings": args.routings, "ids_per_batch": batches[0].sparse_features.values().numel(),
                   "ids_per_sample": router.ids_per_sample, "ranks": ranks}
        print(format_table(results))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
    end_process(0)
