"""Checkpoints of a sharded run with torch.distributed.checkpoint (DCP): save, find, check, load, retain.

Layout: ``<run_dir>/checkpoints/step_<N>/`` (N zero-padded so that names sort by step)::

    .metadata, __<r>_0.distcp   DCP: the model state dict (embedding shards as ShardedTensors, dense
                                parameters and buffers) and the combined optimizer state (fused
                                sparse: per-row momentum ShardedTensors; dense: Adam moments, step)
    rank_<r>.pt                 rank r's own state: its dense buffers (BatchNorm running statistics
                                differ per rank: train.dense_sync does not synchronise buffers after
                                the start) and RNG states
    train_state.json            progress (step, epoch, position in the epoch, samples, seconds, the
                                loss log's open window), world size, vocabulary sizes
    config.yaml                 the run's resolved config

Atomic: every rank writes into ``step_<N>.partial/``; after a barrier rank 0 writes config.yaml and
train_state.json, then renames the directory to ``step_<N>`` (atomic on POSIX filesystems). A crash
before the rename leaves a ``.partial`` dir that loading ignores and the next save deletes, so the
previous checkpoint stays the latest. Multi-node runs need run_dir on a filesystem every node sees.

Re-sharding: DCP stores every shard with its global offsets, so a checkpoint loads into any world size
and sharding plan, each rank reading the rows of its new shards. Rank-local files come from the same
rank, or from rank 0 for ranks the writing run did not have.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.api import CheckpointException

from muse_torchrec.config import ConfigError, ExperimentConfig, load_config, save_config, to_dict
from muse_torchrec.train.distributed import DistContext, all_reduce_int
from muse_torchrec.train.sharded import ShardedModel

log = logging.getLogger("muse_torchrec")

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "train_state.json"
CONFIG_FILE = "config.yaml"
PARTIAL_SUFFIX = ".partial"
FORMAT_VERSION = 1
_STEP_PREFIX = "step_"

# A checkpoint loads for evaluation or export into a model of the same shape reading the same inputs.
MODEL_KEYS: Tuple[str, ...] = ("model", "data.vocab", "data.max_history", "data.recent")
# Resuming training keeps everything that decides the trajectory: only these may change.
RESUME_FREE_KEYS: Tuple[str, ...] = (
    "data.raw_dir", "data.prepared_dir", "data.synthesize", "data.synth", "data.gsu_placement",
    "data.cpu_affinity", "sharding",
    "train.run_dir", "train.epochs", "train.eval_batch_size", "train.limit_eval_batches", "train.log_every",
    "train.checkpoint_every", "train.keep_checkpoints", "train.resume", "train.compile_mode",
    "train.pipeline", "train.sparse_lookup", "train.exchange_in_graphs", "train.exchange_slack",
    "train.route_unique_ids", "train.step_core",
)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the config or data loading it."""


@dataclass
class TrainProgress:
    """Where training stands; a checkpoint stores it so that a resumed run continues exactly.

    Attributes:
        step: optimizer steps done, over all epochs.
        epoch: the epoch in progress.
        epoch_step: steps done in that epoch (batches each rank has consumed, the data position).
        samples: training samples seen over all ranks.
        seconds: training time so far, over all attempts.
        window_loss, window_steps: the sum and count of losses since the last log line.
        last_loss: the last step's loss (rank-local).
    """

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    samples: int = 0
    seconds: float = 0.0
    window_loss: float = 0.0
    window_steps: int = 0
    last_loss: float = math.nan

    def record(self, loss: float, samples: int) -> None:
        self.step += 1
        self.epoch_step += 1
        self.samples += samples
        self.window_loss += loss
        self.window_steps += 1
        self.last_loss = loss

    def next_epoch(self) -> None:
        self.epoch += 1
        self.epoch_step = 0


@dataclass(frozen=True)
class CheckpointInfo:
    """What a complete checkpoint says about itself (without loading any tensor)."""

    path: Path
    progress: TrainProgress
    world_size: int
    vocab_sizes: Dict[str, int]
    config: ExperimentConfig

    @property
    def step(self) -> int:
        return self.progress.step


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def _step_of(path: Path) -> Optional[int]:
    """N for a complete ``step_N`` dir, else None."""
    suffix = path.name[len(_STEP_PREFIX):]
    if not path.name.startswith(_STEP_PREFIX) or not suffix.isdigit() or not (path / STATE_FILE).is_file():
        return None
    return int(suffix)


def complete_checkpoints(root: Path) -> List[Path]:
    """The complete checkpoints under ``root``, oldest first (``.partial`` dirs are not complete)."""
    if not root.is_dir():
        return []
    found = [(step, p) for p in root.iterdir() if (step := _step_of(p)) is not None]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or the latest complete one of a checkpoints dir or a run dir."""
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX):
        raise CheckpointError(f"{path} is an incomplete checkpoint (its save was interrupted)")
    if _step_of(path) is not None:
        return path
    for root in (path, checkpoints_dir(path)):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    raise CheckpointError(f"{path}: no complete checkpoint (expected {path}/{STATE_FILE} or "
                          f"{path}/[{CHECKPOINTS_DIR}/]{_STEP_PREFIX}N/)")


def read_info(path: Path) -> CheckpointInfo:
    """Read a complete checkpoint's train_state.json and config.yaml."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        config = load_config(path / CONFIG_FILE)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable: {err}") from err
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state.get('format_version')}, "
                              f"this code reads {FORMAT_VERSION}")
    return CheckpointInfo(path=path, progress=TrainProgress(**state["progress"]), world_size=int(state["world_size"]),
                          vocab_sizes=dict(state["vocab_sizes"]), config=config)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_differences(saved: ExperimentConfig, current: ExperimentConfig) -> Dict[str, Tuple[Any, Any]]:
    """Dotted key -> (saved value, current value) for every leaf that differs."""
    a, b = _flatten(to_dict(saved)), _flatten(to_dict(current))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume_config(info: CheckpointInfo, cfg: ExperimentConfig) -> None:
    """Resuming training needs the config that wrote the checkpoint, up to ``RESUME_FREE_KEYS``."""
    bad = {k: v for k, v in config_differences(info.config, cfg).items() if not _under(k, RESUME_FREE_KEYS)}
    if bad:
        raise CheckpointError(
            f"checkpoint {info.path} was written with another config ({_describe(bad)}); these keys decide the "
            f"training run, so resuming would silently change it: use another train.run_dir for a new run"
        )


def check_model_config(info: CheckpointInfo, cfg: ExperimentConfig) -> None:
    """Evaluating or exporting needs the checkpoint's model shape and inputs (``MODEL_KEYS``)."""
    bad = {k: v for k, v in config_differences(info.config, cfg).items() if _under(k, MODEL_KEYS)}
    if bad:
        raise CheckpointError(f"checkpoint {info.path} holds another model ({_describe(bad)}); "
                              f"use the checkpoint's own config ({info.path / CONFIG_FILE})")


def check_vocab_sizes(info: CheckpointInfo, vocab_sizes: Mapping[str, int], where: str) -> None:
    """The prepared data's tables have the rows the checkpoint's tables have."""
    if dict(vocab_sizes) != info.vocab_sizes:
        diff = {t: (info.vocab_sizes.get(t), vocab_sizes.get(t)) for t in sorted(set(info.vocab_sizes) | set(vocab_sizes))
                if info.vocab_sizes.get(t) != vocab_sizes.get(t)}
        raise CheckpointError(f"checkpoint {info.path} has other table sizes than {where} "
                              f"({_describe(diff)}): it was trained on another preparation of the data")


def _describe(diff: Mapping[str, Tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in diff.items())


def failure(err: CheckpointException) -> str:
    """The root cause of a DCP failure in one line (DCP's message carries every rank's traceback)."""
    return str(err).strip().splitlines()[-1]


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _local_buffers(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The state-dict entries that are buffers of replicated (dense) modules: they may differ per rank."""
    names = {name for name, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in names and not isinstance(v, ShardedTensor)}


def _rank_state(model: torch.nn.Module) -> Dict[str, Any]:
    """This rank's buffers and torch RNG states. (No code here draws from numpy's global RNG: every
    numpy draw comes from a Generator seeded by the config.)"""
    state: Dict[str, Any] = {
        "buffers": {k: v.detach().cpu().clone() for k, v in _local_buffers(model).items()},
        "torch_rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def _restore_rank_state(model: torch.nn.Module, state: Mapping[str, Any]) -> None:
    current = _local_buffers(model)
    if set(current) != set(state["buffers"]):
        raise CheckpointError(f"rank-local buffers differ: checkpoint {sorted(state['buffers'])}, model {sorted(current)}")
    for key, value in state["buffers"].items():
        current[key].copy_(value)
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])


def read_rank_state(path: Path, rank: int) -> Dict[str, Any]:
    """Rank ``rank``'s file, or rank 0's when the writing run had no such rank."""
    own = path / _rank_file(rank)
    # Saved on the CPU; read there too, so that any device (or none) can load it.
    return torch.load(own if own.is_file() else path / _rank_file(0), map_location="cpu", weights_only=True)


def _shared_state(sharded: ShardedModel, with_optimizer: bool) -> Dict[str, Any]:
    state: Dict[str, Any] = {"model": sharded.model.state_dict()}
    if with_optimizer:
        state["optim"] = sharded.optimizer.state_dict()
    return state


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk, so that a rename after it publishes complete data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: Path,
    sharded: ShardedModel,
    progress: TrainProgress,
    cfg: ExperimentConfig,
    vocab_sizes: Mapping[str, int],
    ctx: DistContext,
    keep: int,
) -> Path:
    """Write ``root/step_<N>`` atomically on every rank (collective), then keep the last ``keep``."""
    final = root / f"{_STEP_PREFIX}{progress.step:08d}"
    partial = root / (final.name + PARTIAL_SUFFIX)
    if ctx.is_main:
        for stale in root.glob(f"*{PARTIAL_SUFFIX}"):
            shutil.rmtree(stale)
        partial.mkdir(parents=True)
    dist.barrier()
    dcp.save(_shared_state(sharded, with_optimizer=True), checkpoint_id=partial)
    torch.save(_rank_state(sharded.model), partial / _rank_file(ctx.rank))
    _fsync(partial / _rank_file(ctx.rank))
    dist.barrier()
    if ctx.is_main:
        save_config(cfg, partial / CONFIG_FILE)
        state = {"format_version": FORMAT_VERSION, "progress": dataclasses.asdict(progress),
                 "world_size": ctx.world_size, "vocab_sizes": dict(vocab_sizes)}
        (partial / STATE_FILE).write_text(json.dumps(state, indent=1))
        for name in (CONFIG_FILE, STATE_FILE):
            _fsync(partial / name)
        os.rename(partial, final)
        _fsync(root)
        prune(root, keep)
        log.info("checkpoint %s", final)
    dist.barrier()
    return final


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints."""
    for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)


def load_checkpoint(info: CheckpointInfo, sharded: ShardedModel, ctx: DistContext, with_optimizer: bool) -> None:
    """Load a checkpoint into a sharded model (any world size or plan; collective).

    ``with_optimizer``: also the fused sparse and dense optimizer state (to continue training).
    """
    if with_optimizer:
        # DCP loads in place, and Adam creates its state at the first step: create it (a step on
        # zero gradients leaves the parameters as they are).
        for _, optimizer in sharded.optimizer.optimizers:
            if not optimizer.state:
                optimizer.init_state()
    state = _shared_state(sharded, with_optimizer)
    try:
        dcp.load(state, checkpoint_id=info.path)
    except CheckpointException as err:
        raise CheckpointError(f"checkpoint {info.path} cannot be loaded ({failure(err)})") from err
    sharded.model.load_state_dict(state["model"])
    if with_optimizer:
        sharded.optimizer.load_state_dict(state["optim"])
        # fbgemm's fused optimizers count steps themselves (Adam's bias correction reads the count).
        sharded.optimizer.set_optimizer_step(info.step)
    _restore_rank_state(sharded.model, read_rank_state(info.path, ctx.rank))


def resume_point(cfg: ExperimentConfig, vocab_sizes: Mapping[str, int], ctx: DistContext) -> Optional[CheckpointInfo]:
    """The checkpoint a training run continues from (the latest in its run_dir), checked; None for a new run.

    Every rank must see the same one: run_dir has to be on a filesystem all nodes share.
    """
    root = checkpoints_dir(cfg.train.run_dir)
    latest = latest_checkpoint(root)
    step = -1 if latest is None else _step_of(latest)
    if all_reduce_int(step, dist.ReduceOp.MIN, ctx.device) != all_reduce_int(step, dist.ReduceOp.MAX, ctx.device):
        raise CheckpointError(f"ranks see different checkpoints in {root}: train.run_dir must be on a shared filesystem")
    if latest is None:
        return None
    if not cfg.train.resume:
        raise CheckpointError(f"{root} holds checkpoints (latest {latest.name}) but train.resume is false: "
                              f"use another train.run_dir, or remove {root} to start afresh")
    info = read_info(latest)
    check_resume_config(info, cfg)
    check_vocab_sizes(info, vocab_sizes, f"data.prepared_dir {cfg.data.prepared_dir}")
    return info


def check_checkpoint_settings(cfg: ExperimentConfig) -> None:
    """The checkpoint settings of ``train`` are meaningful."""
    every, keep = cfg.train.checkpoint_every, cfg.train.keep_checkpoints
    if every is not None and every < 1:
        raise ConfigError(f"train.checkpoint_every: expected a positive number of steps or null, got {every}")
    if keep < 0:
        raise ConfigError(f"train.keep_checkpoints: expected 0 (no checkpoints) or more, got {keep}")
