"""Train then evaluate MUSE (or another method) with DMP, stepped as ``train.pipeline`` says (``step``).

Invariants:
- every rank runs the same number of training steps (the minimum over ranks of their batch counts,
  known from metadata before the first step), otherwise collectives would hang;
- evaluation scores every test sample exactly once for any world size: ranks with fewer batches
  run padding batches (weight 0) so that every rank makes the same number of forward passes;
- a run resumes from the latest checkpoint of its run_dir (``train.resume``) and then ends with the
  same parameters and metrics as an uninterrupted run (bit-identical on CPU with the same world
  size): checkpoints hold the data position, and epoch e's order depends only on (seed, e).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from muse_torchrec.config import ExperimentConfig, save_config
from muse_torchrec.data.affinity import loader_worker_cpus, place_training_process, step_core
from muse_torchrec.data.batch import Batch, BatchBuilder, sequence_features
from muse_torchrec.data.block import SampleBlock
from muse_torchrec.data.integrity import check_prepared_config
from muse_torchrec.data.loader import PreparedData, count_batches, make_loader
from muse_torchrec.data.device_gsu import (DEVICE_GSU_KINDS, GRAPHED_KINDS, DeferredGsuBuilder, DeviceGsu,
                                            GraphedMuseSelection)
from muse_torchrec.data.routing import RowWiseRouter
from muse_torchrec.data.slots import SlotReceiver, SlotTransform
from muse_torchrec.metrics import EvalAccumulator, EvalMetrics
from muse_torchrec.model.methods import build_model, get_method
from muse_torchrec.model.muse import loss_step_replays
from muse_torchrec.train.checkpoint import (
    CheckpointInfo,
    TrainProgress,
    check_checkpoint_settings,
    check_model_config,
    check_vocab_sizes,
    checkpoints_dir,
    load_checkpoint,
    resume_point,
    save_checkpoint,
)
from muse_torchrec.train.dense_sync import check_dense_sync
from muse_torchrec.train.direct_lookup import check_sparse_lookup
from muse_torchrec.train.distributed import DistContext, all_reduce_int
from muse_torchrec.train.sharded import ShardedModel, shard_model
from muse_torchrec.train.step import TrainStepper, check_pipeline, make_stepper

log = logging.getLogger("muse_torchrec")


GSU_PLACEMENTS = ("workers", "device", "device_inline")


@dataclass
class BatchPath:
    """How sample blocks become batches on the training device (``data.gsu_placement``).

    ``transform`` runs in the loader workers; ``gsu`` (placements "device*") then selects the top-K
    on the GPU: ahead of the training thread in a thread of its own (``ahead``), or in the training
    thread as each batch is drawn. ``router`` (training with ``train.sparse_lookup: routed``, placement
    "device"): a second thread ahead then routes each batch's ids over the ranks (``data.routing``).
    """

    transform: Callable[[SampleBlock], object]
    gsu: Optional[DeviceGsu] = None
    ahead: bool = True
    router: Optional[RowWiseRouter] = None

    def finish(self, batches: Iterable[object]) -> Iterable[object]:
        """The loader's output -> batches (``.to(device)`` still applies). With a router, ``batches``
        must be exactly those every rank trains (as many on each)."""
        if self.router is not None and (self.gsu is None or not self.ahead):
            raise ValueError("routed batches come from the device GSU's thread ahead (data.gsu_placement: device)")
        if self.gsu is None:
            return batches
        return self.gsu.ahead(batches, router=self.router) if self.ahead else self.gsu.over(batches)

    def build(self, block: SampleBlock) -> Batch:
        """One block in the training process (e.g. eval's padding batch)."""
        made = self.transform(block)
        return made if self.gsu is None else self.gsu(made)


def _device_gsu_kind(cfg: ExperimentConfig) -> Optional[str]:
    """The GSU kind the device runs (placement "device"), None for "workers"; refuses what cannot run."""
    placement, kind = cfg.data.gsu_placement, get_method(cfg.model.method).gsu
    if placement not in GSU_PLACEMENTS:
        raise ValueError(f"data.gsu_placement: unknown {placement!r}; choose one of {GSU_PLACEMENTS}")
    if placement == "workers":
        return None
    if kind not in DEVICE_GSU_KINDS:
        raise ValueError(f"data.gsu_placement={placement} runs the GSUs {DEVICE_GSU_KINDS}; method "
                         f"{cfg.model.method!r} uses {kind!r}: use data.gsu_placement=workers")
    return kind


def batch_path(cfg: ExperimentConfig, data: PreparedData, device: torch.device, pad_to: Optional[int] = None,
               router: Optional[RowWiseRouter] = None) -> BatchPath:
    """``router``: for training batches (placement "device", checked by ``check_sparse_lookup``)."""
    kind = _device_gsu_kind(cfg)
    if kind is None:
        return BatchPath(make_builder(cfg, data, pad_to))
    deferred = DeferredGsuBuilder(data.scl_vectors(), data.item_scl_row(), recent=cfg.data.recent,
                                  max_history=cfg.data.max_history, pad_to=pad_to, k=cfg.model.k, kind=kind)
    gsu = DeviceGsu(data.scl_vectors(), data.item_scl_row(), device, k=cfg.model.k, kind=kind,
                    graph_shape=(cfg.train.batch_size, cfg.data.max_history))
    return BatchPath(deferred, gsu, ahead=cfg.data.gsu_placement == "device", router=router)


def device_data_bytes(cfg: ExperimentConfig, data: PreparedData) -> int:
    """Bytes the batch path keeps on the training device: the SCL table and item map of the device GSU
    (checks ``data.gsu_placement`` before anything is built)."""
    kind = _device_gsu_kind(cfg)
    if kind is None:
        return 0
    graphed = kind in GRAPHED_KINDS
    workspace = GraphedMuseSelection.workspace_bytes(cfg.train.batch_size, cfg.data.max_history) if graphed else 0
    return data.scl_vectors().nbytes + data.item_scl_row().nbytes + workspace


def make_builder(cfg: ExperimentConfig, data: PreparedData, pad_to: Optional[int] = None) -> BatchBuilder:
    return BatchBuilder(
        scl_vectors=data.scl_vectors(),
        item_scl_row=data.item_scl_row(),
        gsu=get_method(cfg.model.method).gsu,
        k=cfg.model.k,
        recent=cfg.data.recent,
        max_history=cfg.data.max_history,
        pad_to=pad_to,
    )


def open_prepared(cfg: ExperimentConfig) -> PreparedData:
    """The prepared data of ``cfg``, checked to be prepared the way the config says."""
    data = PreparedData(cfg.data.prepared_dir)
    check_prepared_config(data.path, data.meta, cfg.data.max_history, cfg.data.vocab)
    return data


def vocab_sizes(data: PreparedData) -> Dict[str, int]:
    return {name: data.vocab_size(name) for name in data.meta["vocab_sizes"]}


def build_sharded(cfg: ExperimentConfig, data: PreparedData, ctx: DistContext) -> ShardedModel:
    """The method's model on ``meta``, planned and sharded over the process group."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(
        cfg.model,
        vocab_sizes(data),
        sequence_features(get_method(cfg.model.method).gsu),
        recent=cfg.data.recent,
        max_history=cfg.data.max_history,
    )
    return shard_model(model, cfg, ctx, reserved_bytes=device_data_bytes(cfg, data))


@dataclass
class TrainStats:
    """Totals of a run (a resumed run's include the steps before its checkpoint); ``warm_samples`` and
    ``warm_seconds``: those of this process after its first log line, start-up and compilation done."""

    steps: int
    samples: int
    seconds: float
    final_loss: float
    warm_samples: int = 0
    warm_seconds: float = 0.0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def warm_samples_per_s(self) -> Optional[float]:
        """Samples/s after the first log line; None if the run logged only once."""
        return self.warm_samples / self.warm_seconds if self.warm_seconds > 0 else None


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite; the checkpoints written before stay valid."""


def _loader(cfg: ExperimentConfig, data: PreparedData, split: str, ctx: DistContext, path: BatchPath,
            batch_size: int, shuffle: bool, drop_last: bool, seed: int, skip: int = 0,
            limit: Optional[int] = None) -> Iterable[object]:
    """Batches of ``split`` (the first ``limit``); from worker processes they come packed in the
    workers' shared slots (``data.slots``): ``.to(device)`` gives the Batch."""
    workers = cfg.data.num_workers
    loader = make_loader(
        data, split, batch_size, SlotTransform(path.transform) if workers > 0 else path.transform,
        rank=ctx.rank, world_size=ctx.world_size, num_workers=workers,
        seed=seed, shuffle=shuffle, drop_last=drop_last, skip=skip,
        worker_cpus=loader_worker_cpus(cfg.data.cpu_affinity, ctx.local_rank, ctx.local_world_size),
    )
    received = SlotReceiver(loader, ctx.device) if workers > 0 else loader
    return path.finish(received if limit is None else itertools.islice(received, limit))


def steps_per_epoch(cfg: ExperimentConfig, data: PreparedData, ctx: DistContext) -> int:
    """Training steps of one epoch: the same on every rank (the minimum of their full batches)."""
    batch_size = cfg.train.batch_size
    own = count_batches(data, "train", batch_size, rank=ctx.rank, world_size=ctx.world_size,
                        num_workers=max(cfg.data.num_workers, 1), drop_last=True)
    steps = all_reduce_int(own, dist.ReduceOp.MIN, ctx.device)
    if cfg.train.limit_train_batches is not None:
        steps = min(steps, cfg.train.limit_train_batches)
    if steps == 0:
        raise ValueError(
            f"no full training batch of {batch_size} samples on some rank: lower train.batch_size "
            f"or use fewer ranks ({ctx.world_size})"
        )
    return steps


# Called with the progress at a checkpoint step (collective: every rank calls it).
Checkpointer = Callable[[TrainProgress], None]


def train(cfg: ExperimentConfig, data: PreparedData, sharded: ShardedModel, ctx: DistContext,
          progress: Optional[TrainProgress] = None, log_file: Optional[Path] = None,
          checkpoint: Optional[Checkpointer] = None, pin_step_core: Callable[[], None] = lambda: None) -> TrainStats:
    """Train ``cfg.train.epochs`` passes over the train split from ``progress`` (a resumed run's).

    Same number of steps on every rank. Epoch e reads the data in the order of seed
    ``data.seed + e``; a resumed epoch skips the batches already trained. ``checkpoint`` is called
    every ``train.checkpoint_every`` steps and after the last step, with the stepper drained: a
    pipeline (``train.pipeline: sparse_dist``) prefetches batches, and stopping it at the checkpoint
    step keeps the saved data position equal to the trained one (it computes the same as the plain
    step, so draining it changes no number). ``pin_step_core`` is called after every step
    (``StepCore.pin`` under ``train.step_core``).
    """
    progress = progress or TrainProgress()
    per_epoch = steps_per_epoch(cfg, data, ctx)
    total = per_epoch * cfg.train.epochs
    every = cfg.train.checkpoint_every if checkpoint is not None else None
    path = batch_path(cfg, data, ctx.device, router=sharded.router)
    stepper = make_stepper(cfg.train.pipeline, sharded.model, sharded.optimizer, ctx.device)
    sharded.model.train()
    saved_step = progress.step
    start = time.perf_counter() - progress.seconds
    batches: Optional[Iterator[Batch]] = None
    first_segment = True
    last_logged = (progress.samples, progress.seconds)
    first_logged: Optional[Tuple[int, float]] = None
    while progress.epoch < cfg.train.epochs:
        if batches is None:
            # Exactly the epoch's steps: ranks whose share holds more batches leave them (a router
            # would otherwise wait in its exchanges for ranks that have none).
            batches = iter(_loader(cfg, data, "train", ctx, path, cfg.train.batch_size, shuffle=True,
                                   drop_last=True, seed=cfg.data.seed + progress.epoch, skip=progress.epoch_step,
                                   limit=max(per_epoch - progress.epoch_step, 0)))
        # (A checkpoint of another world size may stand past this run's epoch end.)
        segment = max(per_epoch - progress.epoch_step, 0)
        if every is not None:
            segment = min(segment, every - progress.step % every)
        for loss in _losses(stepper, itertools.islice(batches, segment), progress, freeze_gc=first_segment):
            progress.record(loss, cfg.train.batch_size * ctx.world_size)
            pin_step_core()  # acts once, after the first steps: their compilation and captures use every CPU
            progress.seconds = time.perf_counter() - start
            if progress.step % cfg.train.log_every == 0 or progress.step == total:
                _log_window(progress, total, ctx, log_file, last_logged)
                last_logged = (progress.samples, progress.seconds)
                first_logged = first_logged or last_logged
        first_segment = False
        if progress.epoch_step >= per_epoch:
            progress.next_epoch()
            batches = None
        if every is not None and progress.step % every == 0 and progress.step != saved_step:
            checkpoint(progress)
            saved_step = progress.step
    if checkpoint is not None and progress.step != saved_step:
        checkpoint(progress)
    # A pipeline rewrote the sharded modules' forwards; give evaluation the plain model back.
    stepper.detach()
    warm_from = first_logged or (progress.samples, progress.seconds)
    return TrainStats(steps=progress.step, samples=progress.samples, seconds=progress.seconds,
                      final_loss=progress.last_loss, warm_samples=progress.samples - warm_from[0],
                      warm_seconds=progress.seconds - warm_from[1])


def _losses(stepper: TrainStepper, batches: Iterator[Batch], progress: TrainProgress,
            freeze_gc: bool = False) -> Iterator[float]:
    """The loss of each step until ``batches`` is exhausted (and a pipeline drained); stops the run on
    a non-finite loss, before any checkpoint could save its parameters.

    Each step's loss is read back once the next step is launched: read at once, it would hold the
    host until the GPU finished the step, and the host-bound step has no time to lose. The last loss
    is read when the pipeline has drained, before this segment ends (checkpoints come between
    segments), so a checkpoint still never holds a step with a non-finite loss.

    ``freeze_gc`` (the run's first segment): after the first step, everything alive (the model,
    compiled graphs, the pipeline's state, built by then) is collected once and frozen out of the
    garbage collector's reach (``gc.freeze``): a full collection walks every tracked object, and with
    2+ ranks its pause stalls the others at the next collective (1.09-1.10x samples/s on 2 H200,
    benchmarks/RESULTS.md row 27). Once per run: what later segments build (checkpoints, evaluation)
    is left to the collector.
    """
    pending: Optional[torch.Tensor] = None
    while True:
        try:
            loss, _, _ = stepper.progress(batches)
        except StopIteration:
            break
        if pending is None and freeze_gc:
            gc.collect()
            gc.freeze()
        if pending is not None:
            yield _finite(pending, progress)
        pending = loss.detach()
    if pending is not None:
        yield _finite(pending, progress)


def _finite(loss: torch.Tensor, progress: TrainProgress) -> float:
    """The loss of step ``progress.step + 1`` as a float; NonFiniteLossError if it is nan or inf."""
    value = float(loss)
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"step {progress.step + 1} (epoch {progress.epoch}): the training loss is {value}; "
            "lower train.sparse_lr / train.dense_lr or check the inputs (the run stops here; "
            "its checkpoints hold only earlier steps)"
        )
    return value


def _log_window(progress: TrainProgress, total: int, ctx: DistContext, log_file: Optional[Path],
                last_logged: Tuple[int, float]) -> None:
    """Log the mean loss since the last log line (rank 0: console and train_log.jsonl) and samples/s:
    since the start (start-up and compilation included) and since ``last_logged`` (samples, seconds)."""
    window_samples, window_seconds = progress.samples - last_logged[0], progress.seconds - last_logged[1]
    record = {"epoch": progress.epoch, "step": progress.step, "loss": progress.window_loss / progress.window_steps,
              "samples_per_s": progress.samples / max(progress.seconds, 1e-9),
              "window_samples_per_s": window_samples / max(window_seconds, 1e-9)}
    if ctx.is_main:
        log.info("step %d/%d  loss %.4f  %.0f samples/s since the last line (%.0f since the start)", progress.step,
                 total, record["loss"], record["window_samples_per_s"], record["samples_per_s"])
        if log_file is not None:
            with log_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
    progress.window_loss, progress.window_steps = 0.0, 0


def _padded_stream(batches: Iterator[Batch], total: int, filler: Batch) -> Iterator[Batch]:
    """Exactly ``total`` batches: the rank's own, then weight-0 copies of ``filler``."""
    padding = Batch(**{**filler.__dict__, "weights": torch.zeros_like(filler.weights)})
    for i in range(total):
        yield next(batches, padding)


@torch.no_grad()
def evaluate(cfg: ExperimentConfig, data: PreparedData, sharded: ShardedModel, ctx: DistContext,
             split: str = "test") -> EvalMetrics:
    """Score every sample of ``split`` exactly once over all ranks; metrics are identical on every rank."""
    batch_size = cfg.train.eval_batch_size
    path = batch_path(cfg, data, ctx.device, pad_to=batch_size)
    own = count_batches(data, split, batch_size, rank=ctx.rank, world_size=ctx.world_size,
                        num_workers=max(cfg.data.num_workers, 1), drop_last=False)
    total = all_reduce_int(own, dist.ReduceOp.MAX, ctx.device)
    if cfg.train.limit_eval_batches is not None:
        total = min(total, cfg.train.limit_eval_batches)
    filler = path.build(empty_block())
    sharded.model.eval()
    acc = EvalAccumulator()
    batches = iter(_loader(cfg, data, split, ctx, path, batch_size, shuffle=False, drop_last=False,
                           seed=cfg.data.seed))
    for batch in _padded_stream(batches, total, filler):
        batch = batch.to(ctx.device)
        _, (_, logits, labels) = sharded.model(batch)
        acc.update(batch.user_key, labels, logits, batch.weights, batch.true_prob)
    sharded.model.train()
    return acc.compute()


def empty_block() -> SampleBlock:
    """A one-sample block of padding ids (the filler for ranks that run out of eval batches)."""
    zeros = np.zeros(1, dtype=np.int64)
    return SampleBlock(
        labels=np.zeros(1, dtype=np.float32),
        user_key=zeros,
        sample_user=zeros,
        target={name: zeros for name in ("item", "cate", "item_city", "item_province")},
        user_features={name: zeros for name in ("user", "profile_1", "profile_2", "profile_3", "profile_4", "profile_5")},
        hist_offsets=np.zeros(2, dtype=np.int64),
        hist_items=np.zeros(0, dtype=np.int64),
        hist_cates=np.zeros(0, dtype=np.int64),
        true_prob=None,
    )


def resumed_progress(info: CheckpointInfo, world_size: int) -> TrainProgress:
    """The checkpoint's progress for a run of ``world_size`` ranks.

    With another world size each rank reads other samples, so the epoch continues after as many
    samples as were consumed (the model and optimizer state still load exactly, re-sharded).
    """
    progress = dataclasses.replace(info.progress)
    if info.world_size != world_size:
        progress.epoch_step = progress.epoch_step * info.world_size // world_size
        log.warning("resuming a %d-rank checkpoint on %d ranks: the rest of epoch %d reads the data in another "
                    "order than an uninterrupted run", info.world_size, world_size, progress.epoch)
    return progress


def _open_run_dir(run_dir: Path, cfg: ExperimentConfig, resumed_step: int) -> Path:
    """Create run_dir, save the config, and cut the loss log back to the resumed step (rank 0)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    log_file = run_dir / "train_log.jsonl"
    if log_file.exists():
        kept = [line for line in log_file.read_text().splitlines() if _logged_step(line) <= resumed_step]
        log_file.write_text("".join(line + "\n" for line in kept))
    return log_file


def _logged_step(line: str) -> float:
    """The step of a train_log.jsonl line; infinite for a line cut short by a crash (dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return math.inf


def run(cfg: ExperimentConfig, ctx: DistContext) -> Dict[str, float]:
    """Train (resuming from run_dir's latest checkpoint), evaluate, write ``<run_dir>/metrics.json``.

    Everything that can be checked before training (config, prepared data, a checkpoint to resume,
    the sharding plan) is checked before run_dir is touched. Returns the metrics.
    """
    check_checkpoint_settings(cfg)
    check_pipeline(cfg.train.pipeline)
    check_dense_sync(cfg.train.dense_sync, cfg.train.compile_mode)
    check_sparse_lookup(cfg.train.sparse_lookup, cfg.data.gsu_placement, cfg.train.exchange_slack)
    pinned = place_training_process(cfg.data.cpu_affinity, ctx.local_rank, ctx.local_world_size)  # ConfigError now
    if pinned is not None:
        log.info("rank %d: training process pinned to CPUs %s", ctx.rank, pinned)
    core = step_core(cfg.train.step_core, cfg.data.cpu_affinity, ctx.local_rank, ctx.local_world_size,
                     ctx.device)  # ConfigError now
    run_dir = Path(cfg.train.run_dir)
    data = open_prepared(cfg)
    resume = resume_point(cfg, vocab_sizes(data), ctx)
    sharded = build_sharded(cfg, data, ctx)
    if ctx.is_main:
        log.info("sharding plan (%d ranks):\n%s", ctx.world_size, sharded.plan.format())
        log.info("embedding lookups: %s", sharded.lookups)
    progress = TrainProgress()
    if resume is not None:
        load_checkpoint(resume, sharded, ctx, with_optimizer=True)
        progress = resumed_progress(resume, ctx.world_size)
        if ctx.is_main:
            log.info("resumed from %s (step %d, epoch %d)", resume.path, progress.step, progress.epoch)
    log_file = _open_run_dir(run_dir, cfg, progress.step) if ctx.is_main else None
    saver = None
    if cfg.train.keep_checkpoints > 0:
        saver = functools.partial(save_checkpoint, checkpoints_dir(run_dir), sharded, cfg=cfg,
                                  vocab_sizes=vocab_sizes(data), ctx=ctx, keep=cfg.train.keep_checkpoints)
    # The loaders' workers and the data path's threads start off the step core (started_elsewhere).
    first_step = progress.step
    with core:
        stats = train(cfg, data, sharded, ctx, progress, log_file, saver, pin_step_core=core.pin)
    if ctx.is_main:
        _log_graph_replays(sharded, stats.steps - first_step)
    metrics = evaluate(cfg, data, sharded, ctx).to_dict()
    metrics.update(
        train_samples_per_s=stats.samples_per_s,
        train_samples_per_s_warm=stats.warm_samples_per_s,
        train_steps=stats.steps,
        train_samples=stats.samples,
        train_seconds=stats.seconds,
        world_size=ctx.world_size,
        method=cfg.model.method,
    )
    if ctx.is_main:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _log_graph_replays(sharded: ShardedModel, steps: int) -> None:
    """How this run's ``steps`` training steps ran their loss step (``MuseTrain.replays``), and a
    warning where routed batches did not fit the fixed exchange. Every rank decides alike whether a
    batch fits, so one rank's counts are every rank's."""
    replays = loss_step_replays(sharded.model)
    if not replays:
        return
    log.info("loss step CUDA graphs replayed in this run's %d training steps: %s", steps,
             ", ".join(f"{name} {count}" for name, count in replays.items()))
    router = sharded.router
    if router is not None and router.ids_per_sample is not None and replays.get("graphs", 0) > 0:
        log.warning("%d training steps launched their rows' exchange from the host: their batches did not fit the "
                    "fixed exchange; a larger train.exchange_slack (now %s) makes room", replays["graphs"],
                    router.slack)


def evaluate_checkpoint(info: CheckpointInfo, cfg: ExperimentConfig, ctx: DistContext) -> Dict[str, object]:
    """Evaluate a checkpoint's model on ``cfg``'s test split, on any world size; writes nothing."""
    check_model_config(info, cfg)
    data = open_prepared(cfg)
    check_vocab_sizes(info, vocab_sizes(data), f"data.prepared_dir {cfg.data.prepared_dir}")
    sharded = build_sharded(cfg, data, ctx)
    load_checkpoint(info, sharded, ctx, with_optimizer=False)
    metrics: Dict[str, object] = dict(evaluate(cfg, data, sharded, ctx).to_dict())
    metrics.update(checkpoint=str(info.path), train_steps=info.step, world_size=ctx.world_size,
                   method=cfg.model.method)
    return metrics
