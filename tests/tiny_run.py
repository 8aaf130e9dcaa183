"""A tiny synthetic experiment for the checkpoint, resume, export and fault tests, and gloo helpers.

1,332 train samples of 120 users in two chunks (1,025 + 307 samples): with 2 ranks and batches of
32, an epoch is 9 steps. Preparing it takes about a second.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence

import torch
import torch.multiprocessing as mp
from torch.distributed._shard.sharded_tensor import ShardedTensor

from muse_torchrec import features as F
from muse_torchrec.config import ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
# Every table row-wise (``train.sparse_lookup: routed`` routes only then).
ALL_ROW_WISE = "sharding.constraints={" + ", ".join(f"{t.name}: {{sharding_types: [row_wise]}}" for t in F.TABLES) + "}"


def overrides(root: Path, run: str = "run", extra: Sequence[str] = ()) -> List[str]:
    """Config overrides of the tiny experiment with data under ``root`` and run_dir ``root/run``."""
    return [
        f"data.raw_dir={root}/raw", f"data.prepared_dir={root}/prepared", f"train.run_dir={root}/{run}",
        "data.synth.train_users=120", "data.synth.test_users=40", "data.synth.num_items=3000",
        "data.max_history=200", "model.mlp=[32, 16]", "model.k=20", "data.recent=20",
        "train.batch_size=32", "train.eval_batch_size=100", "train.log_every=2",
        # Row-wise tables: every rank holds a part of every table, the case re-sharding must get right.
        "sharding.constraints={item: {sharding_types: [row_wise]}, user: {sharding_types: [row_wise]}}",
        *extra,
    ]


def config(root: Path, run: str = "run", extra: Sequence[str] = ()) -> ExperimentConfig:
    return load_config(ROOT / "configs" / "demo_cpu.yaml", overrides(root, run, extra))


def prepare(root: Path) -> ExperimentConfig:
    """Synthesize and prepare the tiny data under ``root``; returns its config."""
    from muse_torchrec.cli import ensure_prepared

    cfg = config(root)
    ensure_prepared(cfg)
    return cfg


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def dist_env(rank: int, world_size: int, port: str, tmp: Path) -> Dict[str, str]:
    """What torchrun would set for ``rank``, plus one OpenMP thread and a private TMPDIR."""
    return dict(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1", TMPDIR=str(tmp))


def use_one_rank(monkeypatch) -> None:
    """Set what a launcher sets for a 1-rank group in this process (``monkeypatch`` restores it)."""
    for key, value in dist_env(0, 1, free_port(), Path()).items():
        if key not in ("OMP_NUM_THREADS", "TMPDIR"):
            monkeypatch.setenv(key, value)


@contextmanager
def process_group(monkeypatch) -> Iterator[Any]:
    """A 1-rank gloo group in this process (cheaper than spawning: the imports are done); yields the
    DistContext and destroys the group afterwards."""
    from muse_torchrec.train.distributed import distributed

    use_one_rank(monkeypatch)
    with distributed("cpu") as ctx:
        yield ctx


def _entry(rank: int, world_size: int, port: str, tmp: str, fn: Callable[..., None], args: tuple) -> None:
    os.environ.update(dist_env(rank, world_size, port, Path(tmp)))
    torch.set_num_threads(1)
    fn(rank, *args)


def spawn(fn: Callable[..., None], world_size: int, tmp: Path, *args: Any) -> None:
    """Run ``fn(rank, *args)`` in ``world_size`` fresh processes set up as gloo ranks.

    ``fn`` must be importable (a module-level function); a rank that dies raises
    ``torch.multiprocessing.ProcessExitedException`` here after the others are stopped.
    """
    mp.start_processes(_entry, args=(world_size, free_port(), str(tmp), fn, args), nprocs=world_size,
                       start_method="spawn")


def local_state(tree: Any) -> Any:
    """A state dict (nested) with each ShardedTensor replaced by this rank's [(offsets, tensor)]."""
    if isinstance(tree, dict):
        return {k: local_state(v) for k, v in tree.items()}
    if isinstance(tree, ShardedTensor):
        return [(tuple(s.metadata.shard_offsets), s.tensor.clone()) for s in tree.local_shards()]
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    return tree


def assemble(states: Sequence[Any], sizes: Sequence[Any]) -> Any:
    """Full tensors from every rank's ``local_state`` (plain tensors are taken from the first rank).

    ``sizes``: each rank's ``global_sizes`` tree. A rank holding no shard of a table may lack its
    optimizer state: every entry comes from the ranks that have it.
    """
    first = states[0]
    if isinstance(first, dict):
        keys = {k: None for state in states for k in state}
        return {k: assemble([s[k] for s in states if k in s], [z[k] for z in sizes if k in z]) for k in keys}
    if isinstance(first, list):
        full = torch.full(tuple(sizes[0]), float("nan"))
        for state in states:
            for offsets, shard in state:
                full[tuple(slice(o, o + n) for o, n in zip(offsets, shard.shape))] = shard
        return full
    return first


def global_sizes(tree: Any) -> Any:
    """The tree of full sizes of the ShardedTensors of a state dict (None elsewhere)."""
    if isinstance(tree, dict):
        return {k: global_sizes(v) for k, v in tree.items()}
    return tuple(tree.size()) if isinstance(tree, ShardedTensor) else None


def flat(tree: Any, prefix: str = "") -> Dict[str, Any]:
    """Nested dicts -> {"a/b/c": leaf}."""
    if isinstance(tree, dict):
        out: Dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}/"))
        return out
    return {prefix.rstrip("/"): tree}
