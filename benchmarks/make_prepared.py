"""Write a prepared dir (the format of data/prepare.py) of random Taobao-MM-shaped data at a realistic
vocabulary size, directly, without raw files: for throughput benchmarks on hosts where the real
data is absent. Ids follow a Zipf-like popularity over the whole table; every user has ``--history``
behaviors; ~11 samples per user; the SCL table has ``--scl-rows`` random int8 vectors. With
``--test-samples`` it also writes a test split, so the trainer itself runs on it: every id is in the
vocabulary, so the dir's rule is ``full``:

    python benchmarks/make_prepared.py --config configs/taobao_mm_p90.yaml --out /tmp/prepared --samples 400000
    muse-torchrec train --config configs/taobao_mm_p90.yaml --set data.prepared_dir=/tmp/prepared --set data.vocab=full
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from muse_torchrec import features as F
from muse_torchrec.config import load_config
from muse_torchrec.data import prepare as P
from muse_torchrec.data.loader import keep_inherited_objects

PARQUET = dict(compression="none", use_dictionary=False, write_statistics=False)


def zipf_rows(rng: np.random.Generator, vocab: int, size: int, exponent: float = 1.1) -> np.ndarray:
    """Rows in [1, vocab) with a Zipf-like popularity, popular ranks scattered over the table."""
    rank = np.minimum(rng.zipf(exponent, size=size), vocab - 1)
    return (rank * 2654435761 % (vocab - 1) + 1).astype(np.int32)


def _list(values: np.ndarray, users: int, history: int) -> pa.ListArray:
    offsets = pa.array(np.arange(users + 1, dtype=np.int32) * history)
    return pa.ListArray.from_arrays(offsets, pa.array(values, type=pa.int32()))


def write_shard(out: Path, split: str, index: int, vocab: Mapping[str, int], users: int, samples_per_user: int,
                history: int, chunk_users: int, seed: int) -> dict:
    """One shard of ``split`` with ``users`` users, row groups of ``chunk_users`` users; returns its meta entry."""
    rng = np.random.default_rng(seed)
    samples = users * samples_per_user
    user_index = np.repeat(np.arange(users, dtype=np.int32), samples_per_user)
    sample_table = pa.table({
        P.LABEL: (rng.random(samples) < 0.137).astype(np.int8),
        P.USER_INDEX: user_index,
        P.USER_KEY: user_index.astype(np.int64) + index * users,
        **{t.name: zipf_rows(rng, vocab[t.name], samples) for t in P.TARGET_TABLES},
    }, schema=P.samples_schema(False))
    user_table = pa.table({
        **{t.name: zipf_rows(rng, vocab[t.name], users) for t in P.USER_TABLES},
        P.HIST_ITEMS: _list(zipf_rows(rng, vocab["item"], users * history), users, history),
        P.HIST_CATES: _list(zipf_rows(rng, vocab["cate"], users * history), users, history),
    }, schema=P.USERS_SCHEMA)
    name = f"{split}/shard-{index:05d}"
    chunks: List[List[int]] = []
    with pq.ParquetWriter(out / f"{name}.samples.parquet", sample_table.schema, **PARQUET) as ws, \
            pq.ParquetWriter(out / f"{name}.users.parquet", user_table.schema, **PARQUET) as wu:
        for lo in range(0, users, chunk_users):
            n = min(chunk_users, users - lo)
            ws.write_table(sample_table.slice(lo * samples_per_user, n * samples_per_user))
            wu.write_table(user_table.slice(lo, n))
            chunks.append([n * samples_per_user, n])
    return {"samples_file": f"{name}.samples.parquet", "users_file": f"{name}.users.parquet",
            "num_samples": samples, "num_users": users, "chunks": chunks}


def write_scl(out: Path, item_rows: int, scl_rows: int, seed: int) -> None:
    """Random int8 SCL table (row 0 zeros) and an item -> SCL row map (every item has a vector)."""
    rng = np.random.default_rng(seed)
    scl = np.lib.format.open_memmap(out / P.SCL_FILE, mode="w+", dtype=np.int8, shape=(scl_rows + 1, F.SCL_DIM))
    step = 1 << 20
    for lo in range(1, scl_rows + 1, step):
        hi = min(lo + step, scl_rows + 1)
        scl[lo:hi] = np.frombuffer(rng.bytes((hi - lo) * F.SCL_DIM), dtype=np.int8).reshape(hi - lo, F.SCL_DIM)
    scl[0] = 0
    scl.flush()
    mapping = (np.arange(item_rows, dtype=np.int64) % scl_rows + 1).astype(np.int32)
    mapping[0] = 0
    np.save(out / P.ITEM_SCL_ROW_FILE, mapping)


def make_prepared(out: Path, vocab: Mapping[str, int], samples: int, samples_per_user: int, history: int,
                  scl_rows: int, shards: int, chunk_users: int, seed: int, test_samples: int = 0) -> Dict[str, object]:
    """Write the dir: ``samples`` training samples over ``shards`` shards, and ``test_samples`` (if any)
    over a quarter as many. Returns {"samples": training samples, "seconds": time taken}."""
    splits = {"train": (samples, shards)}
    if test_samples > 0:
        splits["test"] = (test_samples, max(1, shards // 4))
    for split in splits:
        (out / split).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # Forked after CUDA may be in use: the workers must not free the parent's CUDA tensors.
    with ProcessPoolExecutor(initializer=keep_inherited_objects) as pool:
        scl_job = pool.submit(write_scl, out, vocab["item"], scl_rows, seed)
        jobs = {}
        for split_seed, (split, (split_samples, split_shards)) in enumerate(splits.items()):
            users = -(-split_samples // (samples_per_user * split_shards))
            jobs[split] = [pool.submit(write_shard, out, split, i, vocab, users, samples_per_user, history,
                                       chunk_users, seed + 1 + i + split_seed * shards) for i in range(split_shards)]
        entries = {split: [job.result() for job in split_jobs] for split, split_jobs in jobs.items()}
        scl_job.result()
    meta = {
        "format_version": P.FORMAT_VERSION, "raw_dir": None, "max_history": history,
        "vocab": {"rule": "full"}, "vocab_sizes": dict(vocab),
        "scl": {"rows": scl_rows + 1},
        "splits": {split: {"samples": sum(e["num_samples"] for e in shard_entries),
                           "users": sum(e["num_users"] for e in shard_entries), "has_truth": False,
                           "interactions": sum(e["num_users"] for e in shard_entries) * history,
                           "shards": shard_entries}
                   for split, shard_entries in entries.items()},
        "stages": {},
    }
    (out / P.META_FILE).write_text(json.dumps(meta))
    return {"samples": meta["splits"]["train"]["samples"], "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/taobao_mm_p90.yaml")
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=400_000)
    parser.add_argument("--test-samples", type=int, default=0, help="samples of a test split (0: none)")
    parser.add_argument("--samples-per-user", type=int, default=11)
    parser.add_argument("--history", type=int, default=1000)
    parser.add_argument("--scl-rows", type=int, default=35_458_467)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--chunk-users", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    vocab = dict(load_config(args.config).sharding.plan_vocab_sizes)
    info = make_prepared(Path(args.out), vocab, args.samples, args.samples_per_user, args.history,
                         args.scl_rows, args.shards, args.chunk_users, args.seed, args.test_samples)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
