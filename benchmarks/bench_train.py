"""Training throughput of sharded MUSE against a replicated baseline, measured side by side.

Modes (one process per GPU; launch with torchrun for several GPUs):
- ``model``: batches pre-built and pre-staged on the device, cycled: the model step alone
  (DistributedModelParallel stepped as the trainer steps it, ``train.step``; ``--pipelines``
  compares TorchRec's pipelines).
- ``e2e``: the real data path: prepared shards on local disk -> loader workers (host GSU, KJTs)
  -> the model step. The shards are written by this script (``--work``) with the
  realistic vocabulary sizes of the config; they are generated, never carried.
- ``shadow``: the data path of ``e2e`` runs beside the model step, one batch drawn (and dropped)
  per step, while the step trains on ``model``'s pre-staged batches: what the data path's
  presence (workers, the GSU thread) costs the step, without its hand-over.
- ``baseline`` (with ``--baseline``): the same model with plain unsharded embedding tables copied on
  every GPU and DDP over everything, dense Adam on the tables (how the reference implementation
  trains), on the same pre-staged batches.

Reports samples/s per GPU, peak GPU memory per rank and the planner's estimate for that rank. The
sharded runs freeze Python's garbage collector after the warm-up, as the trainer does after its
first step (``--gc-modes auto frozen`` compares).

    torchrun --nproc_per_node 1 benchmarks/bench_train.py --config configs/taobao_mm_p90.yaml --modes model e2e --baseline --out bench.json
    python benchmarks/bench_train.py --device cpu --config configs/demo_cpu.yaml --steps 5 --warmup 2   # smoke test
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import cycle, islice, product
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.train_pipeline import TrainPipelineBase

from muse_torchrec import features as F
from muse_torchrec.config import ExperimentConfig, apply_overrides, load_config
from muse_torchrec.data.affinity import cpu_list, step_core
from muse_torchrec.data.batch import Batch, BatchBuilder, sequence_features
from muse_torchrec.data.block import SampleBlock
from muse_torchrec.data.device_gsu import DeferredGsuBuilder, DeviceGsu
from muse_torchrec.data.feeder import ProcessFeeder
from muse_torchrec.model.methods import build_model, get_method
from muse_torchrec.model.muse import loss_step_replays
from muse_torchrec.process import end_process
from muse_torchrec.train.distributed import DistContext, init_distributed, shutdown
from muse_torchrec.data.loader import PreparedData, count_batches, make_loader
from muse_torchrec.data.packed import PackingTransform
from muse_torchrec.data.routing import RowWiseRouter
from muse_torchrec.data.slots import SlotReceiver, SlotTransform
from muse_torchrec.train.sharded import embedding_parameters, shard_model
from muse_torchrec.train.step import STEPPERS, make_stepper
from busy import busy_work, parse_busy
from cuda_sched import sync_mode, use_blocking_sync
from thread_cpu import ThreadUse, UseByThread
from make_prepared import make_prepared, zipf_rows

GIB = 1024**3


@dataclass
class Shapes:
    """Batch shapes of the benchmark (MUSE_SPEC: 1,000-long histories, ~11 samples per user)."""

    batch_size: int
    history: int
    samples_per_user: int
    num_scl_rows: int


def random_block(rng: np.random.Generator, vocab: Mapping[str, int], shapes: Shapes) -> SampleBlock:
    """One block of ``batch_size`` samples over batch_size / samples_per_user users with full histories."""
    num_users = -(-shapes.batch_size // shapes.samples_per_user)
    sample_user = np.minimum(np.arange(shapes.batch_size) // shapes.samples_per_user, num_users - 1)
    n = num_users * shapes.history
    return SampleBlock(
        labels=(rng.random(shapes.batch_size) < 0.137).astype(np.float32),
        user_key=sample_user.astype(np.int64),
        sample_user=sample_user.astype(np.int64),
        target={t: zipf_rows(rng, vocab[t], shapes.batch_size) for t in ("item", "cate", "item_city", "item_province")},
        user_features={t: zipf_rows(rng, vocab[t], num_users) for t in F.USER_FEATURES},
        hist_offsets=np.arange(num_users + 1, dtype=np.int64) * shapes.history,
        hist_items=zipf_rows(rng, vocab["item"], n),
        hist_cates=zipf_rows(rng, vocab["cate"], n),
    )


def random_scl(rng: np.random.Generator, num_items: int, num_rows: int) -> tuple:
    """A random int8 SCL table of ``num_rows`` vectors and an item -> SCL row map covering every item."""
    scl = rng.integers(-127, 128, size=(num_rows + 1, F.SCL_DIM), dtype=np.int8)
    scl[0] = 0
    item_scl_row = (np.arange(num_items, dtype=np.int64) % num_rows + 1).astype(np.int32)
    item_scl_row[0] = 0
    return scl, item_scl_row


def staged_batches(cfg: ExperimentConfig, vocab: Mapping[str, int], shapes: Shapes, count: int,
                   seed: int, device: torch.device) -> List[Batch]:
    rng = np.random.default_rng(seed)
    scl, item_scl_row = random_scl(rng, vocab["item"], shapes.num_scl_rows)
    builder = BatchBuilder(scl, item_scl_row, gsu=get_method(cfg.model.method).gsu, k=cfg.model.k,
                           recent=cfg.data.recent, max_history=shapes.history)
    return [builder(random_block(rng, vocab, shapes)).to(device) for _ in range(count)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timing(NamedTuple):
    """Seconds of the timed steps: wall clock, CPU time of this process's threads (the training
    thread, the autograd engine's, a GSU thread; not the loader workers'), the training thread's
    wall time inside drawing its batches (``batch_wait``: a data path that cannot keep up shows
    here, contention for the host elsewhere), and each thread's use of the host by thread name
    (``by_thread``, ``thread_cpu.UseByThread``: over the first ``clocked`` timed steps, all but the
    last ``THREADS_AHEAD``). A spinning wait for the GPU counts as CPU time: ``--cuda-sync blocking``
    makes waits sleep. In model mode the training and autograd threads take turns, so with blocking
    sync wall - CPU is about the time spent waiting."""

    wall: float
    cpu: float
    batch_wait: float
    by_thread: Dict[str, ThreadUse]
    clocked: int

    def per_step(self, steps: int, batch_size: int) -> Dict[str, object]:
        def a_step(field: str, scale: float) -> Dict[str, float]:
            return {name: scale * getattr(use, field) / self.clocked for name, use in self.by_thread.items()}

        return {"samples_per_s_per_gpu": steps * batch_size / self.wall, "step_ms": 1000 * self.wall / steps,
                "cpu_ms": 1000 * self.cpu / steps, "batch_wait_ms": 1000 * self.batch_wait / steps,
                "cpu_ms_by_thread": a_step("cpu", 1000), "runnable_ms_by_thread": a_step("runnable", 1000),
                "sleeps_by_thread": a_step("sleeps", 1), "preemptions_by_thread": a_step("preemptions", 1)}


class WaitClock:
    """``items`` drawn one by one, the time spent inside each draw (by ``clock``, in seconds) summed
    in ``seconds``."""

    def __init__(self, items: Iterator, clock: Callable[[], float] = time.perf_counter) -> None:
        self.items, self.clock, self.seconds = items, clock, 0.0

    def __iter__(self) -> "WaitClock":
        return self

    def __next__(self):
        start = self.clock()
        try:
            return next(self.items)
        finally:
            self.seconds += self.clock() - start


# The data path's threads run ahead of the steps and end as they make the last batch, a few steps
# before the last (two queues of 2 batches, one in each thread's hands): the CPU by thread is taken
# over the timed steps but the last this many, while they still run.
THREADS_AHEAD = 8


def timed_steps(step, batches: Iterator[Batch], warmup: int, steps: int, device: torch.device,
                freeze_gc: bool = False, after_warmup: Callable[[], None] = lambda: None) -> Timing:
    """Time ``steps`` calls of ``step(batches)`` after ``warmup`` calls and ``after_warmup()``;
    ``freeze_gc``: move every object alive after the warm-up out of the garbage collector's reach
    (``gc.freeze``) while timing."""
    batches = WaitClock(batches)
    for _ in range(warmup):
        step(batches)
    after_warmup()
    _sync(device)
    if freeze_gc:
        gc.collect()
        gc.freeze()
    dist.barrier()
    by_thread, thread_uses = UseByThread(), {}
    clocked = steps - THREADS_AHEAD if steps > 2 * THREADS_AHEAD else steps
    by_thread.start()
    start, start_cpu, batches.seconds = time.perf_counter(), time.process_time(), 0.0
    for done in range(1, steps + 1):
        step(batches)
        if done == clocked:
            thread_uses = by_thread.stop()
    _sync(device)
    timing = Timing(wall=time.perf_counter() - start, cpu=time.process_time() - start_cpu,
                    batch_wait=batches.seconds, by_thread=thread_uses, clocked=clocked)
    if freeze_gc:
        gc.unfreeze()
    return timing


def _reset_peak(device: torch.device) -> None:
    gc.collect()  # free the previous run's model before measuring this one's peak
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def profile_table(step, batches: Iterator[Batch], steps: int, device: torch.device,
                  trace: Optional[Path] = None) -> str:
    """torch.profiler tables of ``steps`` steps: where the host's time goes (the pipeline's stage
    ranges and ops, by total CPU time) and where the device's goes (by CUDA time); ``trace``: also
    the timeline of every thread and stream there (Chrome's trace format, gzipped for a ".gz" name),
    which shows what the op totals cannot: where a thread waits, and for what."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step(batches)
        _sync(device)
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    events = prof.key_averages()
    tables = [f"host, by CPU time over {steps} steps:\n"
              + events.table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=60)]
    if device.type == "cuda":
        tables.append(f"device, by CUDA time over {steps} steps:\n"
                      + events.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    return "\n".join(tables)


def python_profile(step, batches: Iterator[Batch], steps: int, device: torch.device,
                   trace: Optional[Path] = None) -> str:
    """cProfile of ``steps`` steps in the calling thread (the autograd engine's thread is not seen:
    a backward shows as the time the training thread waits in it): by own time, then cumulative.
    ``trace``: refused (cProfile keeps no timeline)."""
    if trace is not None:
        raise ValueError("a trace needs torch.profiler (--profiler torch)")
    def run() -> None:
        for _ in range(steps):
            step(batches)
        _sync(device)

    profiler = cProfile.Profile()
    profiler.runcall(run)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(45)
    return f"cProfile over {steps} steps (calling thread), by own time then cumulative:\n{text.getvalue()}"


PROFILERS = {"torch": profile_table, "python": python_profile}


# --pipelines: the trainer's steppers (``train.step``: "plain", "sparse_dist"), or TorchRec's base
# pipeline (next batch copied ahead, input distribution inside the forward).
PIPELINES = sorted([*STEPPERS, "base"])


def step_function(pipeline: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
    """``step(batches)`` of the named pipeline (``PIPELINES``)."""
    if pipeline == "base":
        return TrainPipelineBase(model, optimizer, device).progress
    return make_stepper(pipeline, model, optimizer, device).progress


# A data path made once the model is sharded, given the router its batches need (None: no routing).
RoutedPath = Callable[[Optional[RowWiseRouter]], Iterable[Batch]]


def bench_sharded(cfg: ExperimentConfig, vocab: Mapping[str, int], batches: Union[Iterable[Batch], RoutedPath],
                  ctx: DistContext,
                  warmup: int, steps: int, profile_steps: int = 0, freeze_gc: bool = False,
                  profiler: str = "torch", pipeline: Optional[str] = None,
                  sync_dense_on_one_rank: bool = False, shard_as_on_several_ranks: bool = False,
                  trace: Optional[Path] = None) -> Dict[str, object]:
    """Samples/s of DMP under ``pipeline`` (``PIPELINES``; None: the config's ``train.pipeline``, as the
    trainer) over ``batches`` (cycled if a list: pre-staged batches, routed first where the trainer's data
    path would route them, ``train.sparse_lookup: routed``; a ``RoutedPath``: called with the router);
    ``profile_steps`` more steps under ``profiler`` ("torch": torch.profiler's op tables, "python": cProfile),
    and as many routings of the staged batches where they are routed; ``trace``: where the profiled
    steps' timeline goes (``profile_table``);
    ``sync_dense_on_one_rank``, ``shard_as_on_several_ranks``: the dense part synchronised, the tables
    sharded as on several ranks (``shard_model``)."""
    _reset_peak(ctx.device)
    model = build_model(cfg.model, vocab, sequence_features(get_method(cfg.model.method).gsu),
                        cfg.data.recent, cfg.data.max_history)
    sharded = shard_model(model, cfg, ctx, sync_dense_on_one_rank=sync_dense_on_one_rank,
                          shard_as_on_several_ranks=shard_as_on_several_ranks)
    step = step_function(pipeline or cfg.train.pipeline, sharded.model, sharded.optimizer, ctx.device)
    route_ms, routing_profile = None, None
    if isinstance(batches, list):
        router = sharded.router
        if router is not None:
            batches, route_ms = routed(router, batches, ctx.device)
            if profile_steps:
                routing_profile = PROFILERS[profiler](lambda it: router(next(it).sparse_features), cycle(batches),
                                                      profile_steps, ctx.device)
        batches = cycle(batches)
    elif callable(batches):
        batches = batches(sharded.router)
    elif sharded.router is not None:
        raise ValueError("bench_train: routed lookups need their batches routed: give a list or a RoutedPath")
    batch_iter = iter(batches)
    with step_core(cfg.train.step_core, cfg.data.cpu_affinity, ctx.local_rank, ctx.local_world_size,
                   ctx.device) as core:
        timing = timed_steps(step, batch_iter, warmup, steps, ctx.device, freeze_gc, after_warmup=core.pin)
        peak_gib = _peak_gib(ctx.device)  # of the timed steps, before any profiled ones
        profile = PROFILERS[profiler](step, batch_iter, profile_steps, ctx.device, trace) if profile_steps else None
    planned = sharded.plan.per_rank_bytes()[ctx.rank]
    result = {
        **timing.per_step(steps, cfg.train.batch_size),
        "route_ms": route_ms,
        "lookups": sharded.lookups,
        # Warm-up, timed and profiled steps: a routed batch past the fixed exchange's capacity
        # replays "graphs" (its exchange launched) instead of "exchanged_graphs".
        "graph_replays": loss_step_replays(sharded.model),
        "peak_gib": peak_gib,
        "planned_gib": (planned["hbm"] if ctx.device.type == "cuda" else planned["ddr"]) / GIB,
        "plan": sharded.plan.format(),
    }
    if profile is not None:
        result["profile"] = profile
    if routing_profile is not None:
        result["routing_profile"] = routing_profile
    del step, sharded, model
    return result


def routed(router: RowWiseRouter, batches: List[Batch], device: torch.device) -> Tuple[List[Batch], float]:
    """``batches`` with their routings (what the trainer's data path adds in its thread ahead), and
    the milliseconds routing took per batch (after one batch's warm-up; in the data path's thread in
    the trainer, not in the step)."""
    first = [replace(batches[0], routing=router(batches[0].sparse_features))]
    _sync(device)
    start = time.perf_counter()
    rest = [replace(b, routing=router(b.sparse_features)) for b in batches[1:]]
    _sync(device)
    return first + rest, 1000 * (time.perf_counter() - start) / max(len(rest), 1)


def e2e_batches(cfg: ExperimentConfig, work: Path, ctx: DistContext, num_workers: int, needed: int,
                device_gsu: bool, handover: str = "slots", gsu_thread: bool = False,
                graphed_gsu: bool = True, router: Optional[RowWiseRouter] = None) -> Iterable[Batch]:
    """Ready batches from prepared shards on local disk through the real loader: the GSU in the loader
    workers (host), or on the training device after the workers built the rest (``device_gsu``; in
    the training thread, or ahead of it in a background thread with ``gsu_thread``);
    ``handover``: how the workers hand each batch over: in their rings of shared slots ("slots",
    ``data.slots``, as the trainer: on a GPU page-locked by the receiver; "pageable_slots": not), as
    one new buffer ("packed", ``data.packed``), or as is ("unpacked");
    ``graphed_gsu``: the device GSU replays batches of the configured size as one CUDA graph (as the trainer);
    ``router``: the thread ahead routes the first ``needed`` batches (as the trainer an epoch's)."""
    if router is not None and not (device_gsu and gsu_thread):
        raise ValueError("bench_train: routed batches come from the device GSU's thread ahead "
                         "(--gsu-places device_ahead)")
    data = PreparedData(work)
    available = count_batches(data, "train", cfg.train.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                              num_workers=max(num_workers, 1), drop_last=True)
    if available < needed:
        raise ValueError(f"{work} holds {available} batches for rank {ctx.rank}, the run needs {needed}")
    gsu = get_method(cfg.model.method).gsu
    if device_gsu:
        builder = DeferredGsuBuilder(data.scl_vectors(), data.item_scl_row(), recent=cfg.data.recent,
                                     max_history=cfg.data.max_history, k=cfg.model.k, kind=gsu)
    else:
        builder = BatchBuilder(data.scl_vectors(), data.item_scl_row(), gsu=gsu, k=cfg.model.k,
                               recent=cfg.data.recent, max_history=cfg.data.max_history)
    transform = {"slots": SlotTransform, "pageable_slots": SlotTransform, "packed": PackingTransform,
                 "unpacked": lambda b: b}[handover](builder)
    loader = make_loader(data, "train", cfg.train.batch_size, transform, rank=ctx.rank, world_size=ctx.world_size,
                         num_workers=num_workers, seed=cfg.data.seed, shuffle=True, drop_last=True,
                         # Slots go to the GPU straight from shared memory (as in the trainer, which
                         # page-locks them in place); pinning copies would add the DataLoader's pinning thread.
                         pin_memory=ctx.device.type == "cuda" and not handover.endswith("slots"))
    if handover.endswith("slots"):
        loader = SlotReceiver(loader, ctx.device if handover == "slots" else None)
    if not device_gsu:
        return loader
    device = DeviceGsu(data.scl_vectors(), data.item_scl_row(), ctx.device, k=cfg.model.k, kind=gsu,
                       graph_shape=(cfg.train.batch_size, cfg.data.max_history) if graphed_gsu else None)
    if router is not None:
        return device.ahead(islice(loader, needed), router=router)
    return device.ahead(loader) if gsu_thread else device.over(loader)


# --gsu-places -> the suffix of a run's name.
GSU_PLACES = {"host": "", "device": "_device_gsu", "device_ahead": "_device_gsu_ahead",
              "device_process": "_device_gsu_process"}


@contextmanager
def gil_switch_interval(ms: Optional[float]) -> Iterator[None]:
    """Python's GIL switch interval at ``ms`` milliseconds inside (None: as it is), restored after.

    Why a knob: the training thread shares the GIL with the data path's thread beside it, and a
    thread waiting for the GIL asks its holder to let go only after a whole interval without a
    switch (CPython's ``take_gil``), 5 ms by default, longer than a training step. Shorter intervals
    measured slower end to end on one H100 (benchmarks/RESULTS.md row 107)."""
    before = sys.getswitchinterval()
    if ms is not None:
        sys.setswitchinterval(ms / 1000)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def paced_beside(staged: List[Batch], data_path: Iterable[Batch]) -> Iterator[Batch]:
    """``staged`` cycled, one batch of ``data_path`` drawn and dropped before each (``shadow`` mode):
    the data path runs beside the model step at its pace without feeding it; ends with the data path."""
    for batch, _ in zip(cycle(staged), data_path):
        yield batch


def bench_loader(batches: Iterable[Batch], batch_size: int, device: torch.device, warmup: int,
                 steps: int, profile_steps: int = 0) -> Dict[str, object]:
    """Samples/s of the data path alone (``e2e_batches``, each batch moved to the device as the
    pipeline moves it, no model): the most an e2e run with this data path could reach. The profile
    is always cProfile's (the data path's host time is Python's)."""

    def step(it: Iterator[Batch]) -> None:
        next(it).to(device, non_blocking=True)

    batch_iter = iter(batches)
    result: Dict[str, object] = {**timed_steps(step, batch_iter, warmup, steps, device).per_step(steps, batch_size)}
    if profile_steps:
        result["profile"] = python_profile(step, batch_iter, profile_steps, device)
    return result


def bench_replicated(cfg: ExperimentConfig, vocab: Mapping[str, int], batches: List[Batch], ctx: DistContext,
                     warmup: int, steps: int) -> Dict[str, object]:
    """The reference implementation's way: full tables on every GPU, DDP, dense Adam on everything."""
    _reset_peak(ctx.device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, vocab, sequence_features(get_method(cfg.model.method).gsu),
                        cfg.data.recent, cfg.data.max_history, device=ctx.device).to(ctx.device)
    tables = set(embedding_parameters(model).values())
    optimizer = torch.optim.Adam([
        {"params": [p for p in model.parameters() if p in tables], "lr": cfg.train.sparse_lr},
        {"params": [p for p in model.parameters() if p not in tables], "lr": cfg.train.dense_lr},
    ])
    ddp = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    def step(it: Iterator[Batch]) -> None:
        loss, _ = ddp(next(it))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    result = {
        **timed_steps(step, cycle(batches), warmup, steps, ctx.device).per_step(steps, cfg.train.batch_size),
        "peak_gib": _peak_gib(ctx.device),
    }
    del ddp, model, optimizer
    return result


def unique_name(name: str, taken: Mapping[str, object]) -> str:
    """``name``, or ``name:i`` with the first i >= 1 not in ``taken`` (a repeated run)."""
    unique, run = name, 1
    while unique in taken:
        unique, run = f"{name}:{run}", run + 1
    return unique


def trace_path(trace_dir: Optional[str], run: str, rank: int) -> Optional[Path]:
    """Where rank ``rank``'s timeline of ``run`` goes under ``--trace-dir`` (None: no trace); the
    run's name with its ":" as "_" (file names that copy anywhere)."""
    if trace_dir is None:
        return None
    Path(trace_dir).mkdir(parents=True, exist_ok=True)
    return Path(trace_dir) / f"{run.replace(':', '_')}.rank{rank}.json.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/taobao_mm_p90.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--modes", nargs="+", default=["model"], choices=["model", "e2e", "loader", "shadow"],
                        help="loader: e2e's data path alone, without the model step; shadow: the data path "
                             "beside the model step, not feeding it")
    parser.add_argument("--baseline", action="store_true", help="also run the replicated baseline")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--distinct-batches", type=int, default=8, help="pre-staged batches cycled in model mode")
    parser.add_argument("--samples-per-user", type=int, default=11)
    parser.add_argument("--scl-rows", type=int, default=1_000_000, help="SCL table rows for pre-staged batches")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--work", default="/tmp/muse_bench_prepared", help="prepared shards for e2e mode")
    parser.add_argument("--e2e-samples", type=int, default=400_000, help="train samples written for e2e mode")
    parser.add_argument("--workers", type=int, default=8, help="loader worker processes per rank (e2e)")
    parser.add_argument("--gsu-places", nargs="+", default=["device"], choices=sorted(GSU_PLACES),
                        help="e2e: run the GSU in the loader workers (host) and/or on the GPU in the training "
                             "thread (device), in a background thread (device_ahead), or with the whole data "
                             "path in a process of its own handing device batches over (device_process)")
    parser.add_argument("--packing", nargs="+", default=["slots"],
                        choices=["slots", "pageable_slots", "packed", "unpacked"],
                        help="e2e: batches from the workers through their shared slots (as the trainer), "
                             "the slots not page-locked, as one new buffer each, and/or as is; repeat "
                             "an entry to alternate")
    parser.add_argument("--gsu-graphs", nargs="+", default=["graphed"], choices=["graphed", "eager"],
                        help="e2e with the GSU on the device: its selection as one CUDA graph (as the trainer) "
                             "and/or eager")
    parser.add_argument("--sharing", nargs="+", default=[None], choices=["file_descriptor", "file_system"],
                        help="e2e/loader: torch.multiprocessing sharing strategies to run, each in turn "
                             "(how worker batches reach the training process; default: torch's)")
    parser.add_argument("--gc-modes", nargs="+", default=["frozen"], choices=["auto", "frozen"],
                        help="model mode: Python's garbage collector with everything alive after the warm-up "
                             "frozen (gc.freeze) while timing, as the trainer does after its first step "
                             "(frozen; e2e always), and/or as is (auto)")
    parser.add_argument("--pipelines", nargs="+", default=None, choices=PIPELINES,
                        help="model and e2e modes: one run per entry, in order (repeat one to alternate): the "
                             "plain step, TorchRec's TrainPipelineSparseDist or TrainPipelineBase "
                             "(default: the config's train.pipeline, as the trainer)")
    parser.add_argument("--profile-steps", type=int, default=0, help="profile this many extra steps of each run")
    parser.add_argument("--trace-dir", default=None, metavar="DIR",
                        help="with --profile-steps and the torch profiler: each run's profiled steps as a "
                             "timeline per rank, DIR/RUN.rankR.json.gz (Chrome's trace format, e.g. Perfetto)")
    parser.add_argument("--profiler", default="torch", choices=sorted(PROFILERS),
                        help="model/e2e profiles: torch.profiler's op tables or cProfile's Python functions "
                             "(loader mode: always cProfile)")
    parser.add_argument("--variant", action="append", default=None, metavar="KEY=VALUE;...",
                        help="model mode: one run per --variant (config overrides, ';'-separated), named v0, v1...")
    parser.add_argument("--compile-modes", nargs="+", default=None, metavar="MODE",
                        help="model mode: one run per train.compile_mode (default: the config's; repeat one to alternate)")
    parser.add_argument("--cuda-sync", default="auto", choices=["auto", "blocking"],
                        help="how host threads wait for the GPU: CUDA's default (spins on hosts with spare cores: "
                             "the wait counts as CPU time) or blocking (they sleep: a wait no longer counts)")
    parser.add_argument("--busy-procs", nargs="+", type=parse_busy, default=[(0, "gather")], metavar="N[:KIND]",
                        help="model mode: one run per entry with N busy processes beside it doing KIND of work "
                             "(busy.py: gather, the default, or spin), or N threads in the training process "
                             "(ops or replay); repeat entries to alternate")
    parser.add_argument("--busy-cpus", default=None, metavar="LIST",
                        help="the CPUs the busy processes run on, as sysfs writes them (e.g. 4-15)")
    parser.add_argument("--gil-switch-ms", nargs="+", type=float, default=[None], metavar="MS",
                        help="loader, e2e and shadow modes: one run per entry with Python's GIL switch interval "
                             "(sys.setswitchinterval) at MS milliseconds (default: Python's, 5 ms); repeat "
                             "entries to alternate")
    parser.add_argument("--sync-dense-on-one-rank", action="store_true",
                        help="model, e2e and shadow modes: the dense part synchronised as train.dense_sync does "
                             "on two or more GPUs (the trainer does not on one), to time that path on one GPU")
    parser.add_argument("--shard-as-on-several-ranks", action="store_true",
                        help="model, e2e and shadow modes: the tables planned as sharding.constraints say for "
                             "two or more GPUs (the GPU configs: row-wise; one rank is otherwise always "
                             "table-wise), so TorchRec's input and output distributions run as there; with "
                             "--sync-dense-on-one-rank, one rank's whole multi-rank step, less the communication "
                             "and the waiting for other ranks")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    busy_cpus = cpu_list(args.busy_cpus) if args.busy_cpus else None

    cfg = load_config(args.config, args.set)
    if args.cuda_sync == "blocking":
        if args.device == "cpu":
            parser.error("--cuda-sync blocking needs a GPU (--device auto or cuda)")
        use_blocking_sync(int(os.environ.get("LOCAL_RANK", "0")))
    ctx = init_distributed(args.device)
    if args.cuda_sync == "blocking" and sync_mode(ctx.device.index) != "blocking":
        raise RuntimeError(f"--cuda-sync blocking did not take: device {ctx.device} waits by {sync_mode(ctx.device.index)}")
    vocab = dict(cfg.sharding.plan_vocab_sizes) or {t.name: 1000 for t in F.TABLES}
    shapes = Shapes(cfg.train.batch_size, cfg.data.max_history, args.samples_per_user, args.scl_rows)
    results: Dict[str, object] = {
        "config": args.config, "overrides": args.set, "world_size": ctx.world_size,
        "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
        "batch_size_per_gpu": cfg.train.batch_size, "history": cfg.data.max_history,
        "k": cfg.model.k, "vocab_sizes": vocab, "sparse_optimizer": cfg.train.sparse_optimizer,
        "cuda_sync": args.cuda_sync, "sync_dense_on_one_rank": args.sync_dense_on_one_rank,
        "shard_as_on_several_ranks": args.shard_as_on_several_ranks,
    }
    batches = staged_batches(cfg, vocab, shapes, args.distinct_batches, seed=1000 + ctx.rank, device=ctx.device)
    if "model" in args.modes:
        for variant, overrides in enumerate(args.variant or [""]):
            variant_cfg = apply_overrides(cfg, [o for o in overrides.split(";") if o])
            modes = args.compile_modes or [variant_cfg.train.compile_mode]
            runs = product(enumerate(modes), args.gc_modes, enumerate(args.pipelines or [None]), args.busy_procs)
            for (mode_run, mode), gc_mode, (run, pipeline), busy_entry in runs:
                mode_cfg = replace(variant_cfg, train=replace(variant_cfg.train, compile_mode=mode))
                name = "model" + ("" if args.compile_modes is None else f":{mode}") + (f":v{variant}" if args.variant else "")
                name += "" if len(set(modes)) == len(modes) else f":{mode_run}"
                name += "" if len(args.gc_modes) == 1 else f":gc_{gc_mode}"
                name += "" if args.pipelines is None else f":{pipeline}:{run}"
                busy, busy_kind = busy_entry
                name += "" if args.busy_procs == [(0, "gather")] else f":busy{busy}" + (f"_{busy_kind}" if busy else "")
                name = unique_name(name, results)
                with busy_work(busy, busy_cpus, busy_kind):
                    results[name] = bench_sharded(mode_cfg, vocab, batches, ctx, args.warmup, args.steps,
                                                  args.profile_steps, freeze_gc=gc_mode == "frozen",
                                                  profiler=args.profiler, pipeline=pipeline,
                                                  sync_dense_on_one_rank=args.sync_dense_on_one_rank,
                                                  shard_as_on_several_ranks=args.shard_as_on_several_ranks,
                                                  trace=trace_path(args.trace_dir, name, ctx.rank))
                results[name].update(compile_mode=mode, overrides=overrides, busy_procs=busy, busy_kind=busy_kind)
    data_modes = [m for m in ("loader", "e2e", "shadow") if m in args.modes]
    if data_modes:
        work = Path(args.work)
        if ctx.is_main and not (work / "meta.json").exists():
            results["e2e_data"] = make_prepared(work, vocab, args.e2e_samples, args.samples_per_user,
                                                cfg.data.max_history, args.scl_rows, shards=16, chunk_users=256, seed=0)
        dist.barrier()
    for mode in data_modes:
        runs = [(place, packed, graph, sharing, pipe, switch) for place in args.gsu_places for packed in args.packing
                for graph in (args.gsu_graphs if place != "host" else ["graphed"]) for sharing in args.sharing
                for pipe in enumerate(args.pipelines if mode == "e2e" and args.pipelines else [None])
                for switch in args.gil_switch_ms]
        for place, packed, graph, sharing, (run, pipeline), switch in runs:
            name = mode + GSU_PLACES[place]
            name += ("" if packed == "slots" else f":{packed}") + ("" if graph == "graphed" else ":eager")
            name += "" if pipeline is None else f":{pipeline}:{run}"
            name += "" if switch is None else f":gil{switch:g}ms"
            if sharing is not None:
                torch.multiprocessing.set_sharing_strategy(sharing)
                name += f":{sharing}"
            name = unique_name(name, results)
            path = (cfg, work, ctx, args.workers, args.warmup + args.steps + args.profile_steps, place != "host",
                    packed, place == "device_ahead", graph == "graphed")

            def data_path(router: Optional[RowWiseRouter] = None, path=path, place=place) -> Iterable[Batch]:
                if place != "device_process":
                    return e2e_batches(*path, router=router)
                if router is not None:
                    raise ValueError("bench_train: the feeder process cannot route batches (--gsu-places device_ahead)")
                return ProcessFeeder(e2e_batches, path, ctx.device)

            with gil_switch_interval(switch):
                if mode == "loader":
                    results[name] = bench_loader(data_path(), cfg.train.batch_size, ctx.device, args.warmup, args.steps,
                                                 args.profile_steps)
                else:
                    # e2e: the data path made once the model is sharded, with the router its batches need.
                    fed = data_path if mode == "e2e" else paced_beside(batches, data_path())
                    results[name] = bench_sharded(cfg, vocab, fed, ctx, args.warmup, args.steps, args.profile_steps,
                                                  freeze_gc=True, profiler=args.profiler, pipeline=pipeline,
                                                  sync_dense_on_one_rank=args.sync_dense_on_one_rank,
                                                  shard_as_on_several_ranks=args.shard_as_on_several_ranks,
                                                  trace=trace_path(args.trace_dir, name, ctx.rank))
            results[name]["loader_workers"] = args.workers
    if args.baseline:
        results["baseline"] = bench_replicated(cfg, vocab, batches, ctx, args.warmup, args.steps)
    if ctx.is_main:
        print(format_results(results))
        for name, r in results.items():
            if isinstance(r, dict) and "profile" in r:
                print(f"\nprofile of {name}:\n{r['profile']}")
            if isinstance(r, dict) and "routing_profile" in r:
                print(f"\nprofile of {name}'s routing (the data path's, each batch again):\n{r['routing_profile']}")
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
    shutdown()


def format_results(results: Mapping[str, object]) -> str:
    lines = [f"device {results['device']} x {results['world_size']}, batch {results['batch_size_per_gpu']}/GPU, "
             f"history {results['history']}, K {results['k']}, item rows {results['vocab_sizes']['item']:,}", "",
             f"{'run':<34} {'samples/s/GPU':>14} {'step ms':>9} {'CPU ms':>7} {'peak GiB':>9} {'planned GiB':>12}"]
    for name, r in results.items():
        if not isinstance(r, dict) or "samples_per_s_per_gpu" not in r:
            continue
        peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
        planned = "-" if r.get("planned_gib") is None else f"{r['planned_gib']:.2f}"
        lines.append(f"{name:<34} {r['samples_per_s_per_gpu']:>14,.0f} {r['step_ms']:>9.1f} {r['cpu_ms']:>7.1f} "
                     f"{peak:>9} {planned:>12}")
        if r.get("cpu_ms_by_thread"):
            busiest = [name for name, ms in sorted(r["cpu_ms_by_thread"].items(), key=lambda item: -item[1])
                       if ms >= 0.05]
            lines.append(f"{'':<34} CPU ms a step by thread: " + ", ".join(
                f"{name} {r['cpu_ms_by_thread'][name]:.2f}" for name in busiest))
            lines.append(f"{'':<34} sleeps / preemptions / ms ready without a core, a step: " + ", ".join(
                f"{name} {r['sleeps_by_thread'][name]:.1f} / {r['preemptions_by_thread'][name]:.1f} / "
                f"{r['runnable_ms_by_thread'][name]:.2f}" for name in busiest))
        if r.get("batch_wait_ms", 0.0) >= 0.05:
            lines.append(f"{'':<34} waiting for its batches (drawing them): {r['batch_wait_ms']:.2f} ms a step")
        if r.get("route_ms") is not None:
            lines.append(f"{'':<34} routing (the data path's, not in the step): {r['route_ms']:.2f} ms a batch")
        if r.get("graph_replays"):
            replays = ", ".join(f"{name} {count}" for name, count in r["graph_replays"].items())
            lines.append(f"{'':<34} loss step graphs replayed (every step): {replays}")
    base = results.get("baseline")
    for name, r in results.items():
        if isinstance(base, dict) and name.startswith("model") and isinstance(r, dict):
            lines.append(f"sharded ({name}) / replicated: {r['samples_per_s_per_gpu'] / base['samples_per_s_per_gpu']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
    end_process(0)
