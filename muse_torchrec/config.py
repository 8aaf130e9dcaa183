"""Typed, frozen configuration tree for a whole experiment, loaded from YAML.

Rules a demanding user relies on:
- an unknown key is an error that names its full path (``model.gsu_k`` -> "unknown key model.gsu_k");
- every value is type-checked, for YAML and for ``--set a.b=c`` overrides alike;
- CLI flags never override the file implicitly: only explicit ``--set`` does.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import yaml


_MAPPING_ORIGINS = (dict, collections.abc.Mapping)


class ConfigError(ValueError):
    """A configuration problem; the message names the key path."""


@dataclass(frozen=True)
class SynthConfig:
    """Size of the synthetic Taobao-MM set (see data/synthetic.py)."""

    train_users: int = 4000
    test_users: int = 1000
    num_items: int = 200_000
    num_categories: int = 400
    latent_dim: int = 16
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    raw_dir: str = "data/synth/raw"
    prepared_dir: str = "data/synth/prepared"
    # Generate synthetic raw data into raw_dir when it is missing (the embedded default).
    synthesize: bool = True
    synth: SynthConfig = SynthConfig()
    # Vocabulary rule: "full", "p90" or "min-count:N".
    vocab: str = "full"
    max_history: int = 1000
    recent: int = 50
    num_workers: int = 0
    # Where MUSE's / SIM-hard's GSU runs: "workers" (the loader processes, on the CPU), "device" (the
    # training GPU, in a background thread; the SCL table is copied there) or "device_inline" (the
    # training GPU, in the training thread). See README.
    gsu_placement: str = "workers"
    # Where the training process and its loader workers run: "none" (anywhere) or "pinned" (each
    # rank's share of the node's cores, its first four for the training process, the rest for its
    # workers): data/affinity.py.
    cpu_affinity: str = "none"
    seed: int = 0


@dataclass(frozen=True)
class EmbeddingConfig:
    """Embedding dimension per table; tables not listed use ``default_dim``."""

    default_dim: int = 16
    dims: Mapping[str, int] = field(
        default_factory=lambda: {"profile_3": 8, "profile_4": 8, "profile_5": 8}
    )


@dataclass(frozen=True)
class ModelConfig:
    method: str = "muse"
    k: int = 50
    # SimTier: "paper" (counts per tier) or "reference" (log(1 + count) x learned weight).
    simtier_mode: str = "paper"
    simtier_tiers: int = 20
    # SA-TA: "paper" (MUSE_SPEC section 6 equation) or "reference" (public implementation).
    sata_mode: str = "paper"
    mlp: Tuple[int, ...] = (256, 128, 64)
    embeddings: EmbeddingConfig = EmbeddingConfig()


@dataclass(frozen=True)
class TableConstraint:
    """Planner constraint for one table (empty = let the planner choose)."""

    sharding_types: Tuple[str, ...] = ()
    compute_kernels: Tuple[str, ...] = ()


@dataclass(frozen=True)
class ShardingConfig:
    constraints: Mapping[str, TableConstraint] = field(default_factory=dict)
    # Per-device memory the planner may use (None: the device's own / the host's RAM).
    hbm_gb: Optional[float] = None
    ddr_gb: Optional[float] = None
    # Vocabulary sizes (rows incl. row 0) that `plan` uses when no prepared data exists yet.
    plan_vocab_sizes: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/demo"
    batch_size: int = 1000
    eval_batch_size: int = 1000
    epochs: int = 1
    # "adam" (GPU), "rowwise_adagrad", "adagrad", "sgd".
    sparse_optimizer: str = "rowwise_adagrad"
    sparse_lr: float = 2e-3
    dense_lr: float = 2e-4
    limit_train_batches: Optional[int] = None
    limit_eval_batches: Optional[int] = None
    log_every: int = 20
    seed: int = 0
    # Checkpoints in <run_dir>/checkpoints: every this many steps (None: only at the end of training).
    checkpoint_every: Optional[int] = None
    # Complete checkpoints kept, oldest deleted first; 0 writes none.
    keep_checkpoints: int = 2
    # Continue from the latest checkpoint in run_dir, if any (how a torchelastic restart resumes).
    resume: bool = True
    # torch.compile of the dense tower (model.muse.TOWER_MODES): "none" runs it eagerly; "default"
    # fuses its kernels; "reduce-overhead" also replays them as CUDA graphs (GPU); "graphs" replays
    # the compiled tower's forward and backward as CUDA graphs of our own, with less host time per
    # step (GPU; model/cuda_graphs.py).
    compile_mode: str = "none"
    # How a step runs (train.step.STEPPERS): "plain" (forward, backward, optimizer; nothing prefetched)
    # or "sparse_dist" (TorchRec's TrainPipelineSparseDist: overlaps the next batch's copy and input
    # distribution; costs more host time per step, see train/step.py).
    pipeline: str = "plain"
    # How the dense part stays identical on 2+ ranks (train.dense_sync.DENSE_SYNCS): "allreduce"
    # (rank 0's weights broadcast once, the gradients averaged in one all-reduce before each dense
    # optimizer step) or "ddp" (TorchRec's default, DistributedDataParallel; not with compile_mode
    # "graphs", whose capture CUDA refuses inside DDP's forward).
    dense_sync: str = "allreduce"
    # How the sharded embedding collection is called (train.direct_lookup.SPARSE_LOOKUPS): "direct"
    # calls its lookup module itself where TorchRec's input and output distributions are identities
    # (one rank, the plain step); "routed" also, on 2+ ranks with every table row-wise, has the data
    # path's thread ahead send each id to the rank holding its row (data.gsu_placement "device", the
    # plain step); "distributed" always runs TorchRec's forward.
    sparse_lookup: str = "direct"
    # With "routed" and compile_mode "graphs": the rows' all-to-all, in fixed shapes laid out by the
    # data path, replayed inside the step's CUDA graph, forward and backward (batches that do not
    # fit it launch it as before); false: always launched from the host.
    exchange_in_graphs: bool = True
    # The fixed exchange's room: every rank sends every rank C rows, C this many times the first
    # batch's largest count from one rank to another (at least 1). A batch past it launches its
    # exchange from the host; the trainer's log counts such steps ("graphs" among the loss step
    # graphs replayed): raise it where ids crowd some rank's rows more than in the first batch.
    exchange_slack: float = 1.25
    # With "routed": the data path sends each id of a batch once per feature, not once per sample
    # that holds it (a batch's samples of one user repeat its top-K and recent ids: 11x fewer ids on
    # the benchmarks' batches). Off by default: on one H100's proxy of 2 ranks the model step ran
    # 1.04-1.11x with it but end to end 0.83x, the deduplication's host time in the data path's
    # thread outweighing the smaller exchanges (benchmarks/RESULTS.md row 131).
    route_unique_ids: bool = False
    # CUDA: from the third training step on, the training thread and autograd's device threads share
    # one physical core that the rest of the job keeps off (data/affinity.py: StepCore).
    step_core: bool = False


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    sharding: ShardingConfig = ShardingConfig()
    train: TrainConfig = TrainConfig()


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _build(tp, value, path)
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item_tp = args[0]
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in _MAPPING_ORIGINS:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_tp, val_tp = args
        return {
            _coerce(k, key_tp, f"{path}"): _coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept any text that is a number.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")


def _build(cls: type, raw: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"unknown key {where} (known: {', '.join(sorted(names))})")
    kwargs = {
        key: _coerce(value, hints[key], f"{path}.{key}" if path else key) for key, value in raw.items()
    }
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """Plain (YAML/JSON-serialisable) form of a config tree."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    return _build(ExperimentConfig, raw, "")


def _set_path(tree: Dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if not isinstance(child, dict):
            raise ConfigError(f"unknown key {'.'.join(keys[: depth + 1])} in override {dotted}")
        node = child
    if keys[-1] not in node and not _is_open_mapping(tree, keys):
        raise ConfigError(f"unknown key {dotted} in override")
    node[keys[-1]] = value


def _is_open_mapping(tree: Dict[str, Any], keys: Sequence[str]) -> bool:
    """True when ``keys[:-1]`` names a Mapping field (whose keys are free, e.g. embedding dims)."""
    tp: Any = ExperimentConfig
    for key in keys[:-1]:
        if not dataclasses.is_dataclass(tp):
            return False
        hints = typing.get_type_hints(tp)
        if key not in hints:
            return False
        tp = hints[key]
    return typing.get_origin(tp) in _MAPPING_ORIGINS


def apply_overrides(cfg: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """Apply ``a.b=c`` overrides; values are parsed as YAML scalars and type-checked."""
    tree = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        dotted, text = item.split("=", 1)
        _set_path(tree, dotted.strip(), yaml.safe_load(text) if text.strip() else "")
    return from_dict(tree)


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load a YAML config (defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw: Any = {}
    if path is not None:
        text = Path(path).read_text()
        if not text.strip():
            raise ConfigError(f"{path}: the config file is empty")
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
    try:
        cfg = from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path else str(err)) from None
    return apply_overrides(cfg, overrides)


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config (YAML, loadable by ``load_config``)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_fingerprint(cfg: ExperimentConfig) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)
