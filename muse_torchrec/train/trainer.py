"""Train then evaluate MUSE (or another method) with DMP and TrainPipelineSparseDist.

Invariants:
- every rank runs the same number of training steps (the minimum over ranks of their batch counts,
  known from metadata before the first step), otherwise collectives would hang;
- evaluation scores every test sample exactly once for any world size: ranks with fewer batches
  run padding batches (weight 0) so that every rank makes the same number of forward passes.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from muse_torchrec.config import ExperimentConfig, save_config
from muse_torchrec.data.batch import Batch, BatchBuilder, sequence_features
from muse_torchrec.data.block import SampleBlock
from muse_torchrec.data.loader import PreparedData, count_batches, make_loader
from muse_torchrec.metrics import EvalAccumulator, EvalMetrics
from muse_torchrec.model.methods import build_model, get_method
from muse_torchrec.train.distributed import DistContext, all_reduce_int
from muse_torchrec.train.sharded import ShardedModel, shard_model

log = logging.getLogger("muse_torchrec")


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


def build_sharded(cfg: ExperimentConfig, data: PreparedData, ctx: DistContext) -> ShardedModel:
    """The method's model on ``meta``, planned and sharded over the process group."""
    torch.manual_seed(cfg.train.seed)
    vocab = {name: data.vocab_size(name) for name in data.meta["vocab_sizes"]}
    model = build_model(
        cfg.model,
        vocab,
        sequence_features(get_method(cfg.model.method).gsu),
        recent=cfg.data.recent,
        max_history=cfg.data.max_history,
    )
    return shard_model(model, cfg, ctx)


@dataclass
class TrainStats:
    steps: int
    samples: int
    seconds: float
    final_loss: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def _loader(cfg: ExperimentConfig, data: PreparedData, split: str, ctx: DistContext, builder: BatchBuilder,
            batch_size: int, shuffle: bool, drop_last: bool) -> Iterable[Batch]:
    return make_loader(
        data, split, batch_size, builder,
        rank=ctx.rank, world_size=ctx.world_size, num_workers=cfg.data.num_workers,
        seed=cfg.data.seed, shuffle=shuffle, drop_last=drop_last,
    )


def train(cfg: ExperimentConfig, data: PreparedData, sharded: ShardedModel, ctx: DistContext,
          log_file: Optional[Path] = None) -> TrainStats:
    """One pass (``cfg.train.epochs`` passes) over the train split, same number of steps on every rank."""
    batch_size = cfg.train.batch_size
    own = count_batches(data, "train", batch_size, rank=ctx.rank, world_size=ctx.world_size,
                        num_workers=max(cfg.data.num_workers, 1), drop_last=True)
    steps_per_epoch = all_reduce_int(own, dist.ReduceOp.MIN, ctx.device)
    if cfg.train.limit_train_batches is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.train.limit_train_batches)
    if steps_per_epoch == 0:
        raise ValueError(
            f"no full training batch of {batch_size} samples on some rank: lower train.batch_size "
            f"or use fewer ranks ({ctx.world_size})"
        )
    builder = make_builder(cfg, data)
    pipeline = TrainPipelineSparseDist(sharded.model, sharded.optimizer, ctx.device, execute_all_batches=True)
    sharded.model.train()
    steps, samples, loss_sum, loss_n = 0, 0, 0.0, 0
    last_loss = float("nan")
    start = time.perf_counter()
    for epoch in range(cfg.train.epochs):
        batches = itertools.islice(
            iter(_loader(cfg, data, "train", ctx, builder, batch_size, shuffle=True, drop_last=True)),
            steps_per_epoch,
        )
        while True:
            try:
                loss, _, _ = pipeline.progress(batches)
            except StopIteration:
                break
            steps += 1
            samples += batch_size * ctx.world_size
            last_loss = float(loss.detach())
            loss_sum, loss_n = loss_sum + last_loss, loss_n + 1
            if steps % cfg.train.log_every == 0 or steps == steps_per_epoch * cfg.train.epochs:
                elapsed = time.perf_counter() - start
                record = {"epoch": epoch, "step": steps, "loss": loss_sum / loss_n,
                          "samples_per_s": samples / elapsed}
                if ctx.is_main:
                    log.info("step %d/%d  loss %.4f  %.0f samples/s", steps,
                             steps_per_epoch * cfg.train.epochs, record["loss"], record["samples_per_s"])
                    if log_file is not None:
                        with log_file.open("a") as f:
                            f.write(json.dumps(record) + "\n")
                loss_sum, loss_n = 0.0, 0
    # The pipeline rewrote the sharded modules' forwards; give evaluation the plain model back.
    pipeline.detach()
    return TrainStats(steps=steps, samples=samples, seconds=time.perf_counter() - start, final_loss=last_loss)


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
    builder = make_builder(cfg, data, pad_to=batch_size)
    own = count_batches(data, split, batch_size, rank=ctx.rank, world_size=ctx.world_size,
                        num_workers=max(cfg.data.num_workers, 1), drop_last=False)
    total = all_reduce_int(own, dist.ReduceOp.MAX, ctx.device)
    if cfg.train.limit_eval_batches is not None:
        total = min(total, cfg.train.limit_eval_batches)
    filler = builder(empty_block())
    sharded.model.eval()
    acc = EvalAccumulator()
    batches = iter(_loader(cfg, data, split, ctx, builder, batch_size, shuffle=False, drop_last=False))
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


def run(cfg: ExperimentConfig, ctx: DistContext) -> Dict[str, float]:
    """Train, evaluate, write ``<run_dir>/metrics.json`` (rank 0); returns the metrics."""
    run_dir = Path(cfg.train.run_dir)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "train_log.jsonl").unlink(missing_ok=True)
    data = PreparedData(cfg.data.prepared_dir)
    sharded = build_sharded(cfg, data, ctx)
    if ctx.is_main:
        log.info("sharding plan (%d ranks):\n%s", ctx.world_size, sharded.plan.format())
    stats = train(cfg, data, sharded, ctx, run_dir / "train_log.jsonl" if ctx.is_main else None)
    metrics = evaluate(cfg, data, sharded, ctx).to_dict()
    metrics.update(
        train_samples_per_s=stats.samples_per_s,
        train_steps=stats.steps,
        train_samples=stats.samples,
        train_seconds=stats.seconds,
        world_size=ctx.world_size,
        method=cfg.model.method,
    )
    if ctx.is_main:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
