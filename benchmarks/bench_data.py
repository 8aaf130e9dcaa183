"""Data path throughput: prepare, the block loader, ready batches, and the reference layout's loader.

For each scale (SynthConfig x N: users and items scaled together) it synthesises a raw set into the
work dir, runs ``prepare`` in a fresh process (so its per-stage peak memory is its own) and reports
samples/s, interactions/s and the peak resident memory of each stage. On the smallest scale's train
split it then times, on one worker (in-process, one thread):

- blocks: ``iter_blocks`` at ``--batch-size`` (SampleBlocks, users' lists deduplicated per block);
- ready batches: blocks + ``BatchBuilder`` (host-side MUSE GSU, KJTs), and blocks +
  ``DeferredGsuBuilder`` (KJTs and dense tensors of everything but the top-K, which the training
  device selects);
- baseline: the reference layout (one wide snappy Parquet row per sample with both 1,000-long int64
  lists copied in), read row by row into Python lists, then tensors, as the reference loader does.

Prints a markdown table and writes JSON (``--out``). Usage:
    python benchmarks/bench_data.py --work /tmp/bench_data --scales 1 4 --out bench_data.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from muse_torchrec import features as F
from muse_torchrec.config import SynthConfig
from muse_torchrec.data import schema
from muse_torchrec.data.loader import PreparedData, iter_blocks
from muse_torchrec.data.synthetic import synthesize

TARGET_SAMPLES_PER_S = 100_000


def _scaled(scale: int) -> SynthConfig:
    base = SynthConfig()
    return replace(
        base,
        train_users=base.train_users * scale,
        test_users=base.test_users * scale,
        num_items=base.num_items * scale,
    )


def bench_prepare(work: Path, scale: int, vocab: str, chunk_samples: Optional[int]) -> Dict[str, object]:
    """Synthesise (if missing) and prepare one scale; prepare runs in a fresh interpreter that imports
    only the data package, so the stage memory figures are prepare's own."""
    raw, out = work / f"raw-{scale}x", work / f"prepared-{scale}x"
    if not (raw / "synth_stats.json").exists():
        synthesize(raw, _scaled(scale), overwrite=True)
    code = (
        "import sys; from muse_torchrec.data.prepare import prepare; "
        "chunk = int(sys.argv[4]) if sys.argv[4] != 'auto' else None; "
        "prepare(*sys.argv[1:4], chunk_samples=chunk, overwrite=True, progress=False)"
    )
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code, str(raw), str(out), vocab, str(chunk_samples or "auto")], check=True
    )
    seconds = time.perf_counter() - start
    meta = json.loads((out / "meta.json").read_text())
    splits = meta["splits"].values()
    samples = sum(s["samples"] for s in splits)
    interactions = sum(s["interactions"] for s in splits)
    stage_seconds = sum(s["seconds"] for s in meta["stages"].values())
    return {
        "scale": scale,
        "samples": samples,
        "users": sum(s["users"] for s in splits),
        "interactions": interactions,
        "item_vocab": meta["vocab_sizes"][F.ITEM.name],
        "prepare_seconds": stage_seconds,
        "process_seconds": seconds,
        "samples_per_s": samples / stage_seconds,
        "interactions_per_s": interactions / stage_seconds,
        "stages": meta["stages"],
        "prepared": str(out),
        "raw": str(raw),
    }


def _timed(
    stream: Iterable[int], min_seconds: float, restart: Callable[[], Iterable[int]]
) -> Dict[str, float]:
    """Consume streams of per-item sample counts until ``min_seconds`` elapsed (whole passes)."""
    samples, items, start = 0, 0, time.perf_counter()
    while True:
        for n in stream:
            samples += n
            items += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return {
                "samples": samples,
                "items": items,
                "seconds": elapsed,
                "samples_per_s": samples / elapsed,
            }
        stream = restart()


def bench_blocks(data: PreparedData, batch_size: int, min_seconds: float) -> Dict[str, float]:
    def run() -> Iterable[int]:
        return (b.batch_size for b in iter_blocks(data, "train", batch_size, shuffle=True))

    result = _timed(run(), min_seconds, run)
    blocks = list(iter_blocks(data, "train", batch_size))
    result["users_per_block"] = float(np.mean([b.num_users for b in blocks]))
    result["behaviors_per_user"] = float(np.mean([b.hist_offsets[-1] / max(b.num_users, 1) for b in blocks]))
    return result


def bench_ready_batches(data: PreparedData, batch_size: int, min_seconds: float, device_gsu: bool) -> Dict[str, float]:
    """Blocks -> Batches: with the host GSU (the loader workers select the top-K), or with everything
    but the top-K (``device_gsu``: the training device selects it, see data/device_gsu.py)."""
    from muse_torchrec.data.batch import BatchBuilder
    from muse_torchrec.data.device_gsu import DeferredGsuBuilder

    max_history = data.meta["max_history"]
    if device_gsu:
        build = DeferredGsuBuilder(data.scl_vectors(), data.item_scl_row(), max_history=max_history)
    else:
        build = BatchBuilder(data.scl_vectors(), data.item_scl_row(), gsu="scl_cosine", max_history=max_history)

    def run() -> Iterable[int]:
        return (build(b).batch.batch_size if device_gsu else build(b).batch_size
                for b in iter_blocks(data, "train", batch_size, shuffle=True))

    return _timed(run(), min_seconds, run)


def write_reference_layout(raw: Path, path: Path, rows: int) -> None:
    """The reference's wide layout for the first ``rows`` train samples: samples joined with their
    user's features and lists and their item's features, one snappy Parquet row per sample."""
    samples = pq.read_table(schema.table_files(raw, schema.samples_table("train"))[0]).slice(0, rows)
    users = pq.read_table(schema.table_files(raw, schema.user_features_table("train"))[0])
    items = pq.read_table(schema.table_files(raw, schema.ITEM_FEATURES_TABLE)[0])

    def join(table: pa.Table, key: str, on: np.ndarray) -> pa.Table:
        keys = table.column(key).to_numpy()
        order = np.argsort(keys)
        pos = np.minimum(np.searchsorted(keys[order], on), keys.size - 1)
        found = keys[order][pos] == on
        return table.drop_columns([key]).take(pa.array(order[pos], mask=~found))

    wide = samples
    for table, key in ((users, F.USER_ID), (items, F.ITEM_ID)):
        side = join(table, key, samples.column(key).to_numpy())
        for name in side.column_names:
            wide = wide.append_column(name, side.column(name))
    pq.write_table(wide, path, compression="snappy", row_group_size=500_000)


def _reference_rows(path: Path, batch_size: int) -> Iterable[int]:
    """Row-by-row decoding into Python lists, padded to 1,000, then tensors (one batch at a time)."""
    scalar = [F.USER_ID, F.ITEM_ID, *F.USER_PROFILE, F.ITEM_CATE, F.ITEM_CITY, F.ITEM_PROVINCE]
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        labels, ids, hist_items, hist_cates = [], [], [], []
        for row in batch.to_pylist():
            labels.append(row[F.LABEL][1])
            ids.append([row[c] or 0 for c in scalar])
            for source, target in ((F.HIST_ITEMS, hist_items), (F.HIST_CATES, hist_cates)):
                values = row[source] or []
                target.append(values + [0] * (F.MAX_HISTORY - len(values)))
        torch.tensor(labels), torch.tensor(ids), torch.tensor(hist_items), torch.tensor(hist_cates)
        yield batch.num_rows


def _reference_decode(path: Path, batch_size: int) -> Iterable[int]:
    """Column-wise decoding of the same file into numpy, no Python per row: the best any loader of
    that layout could do before assembling tensors."""
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        for column in batch.columns:
            (column.flatten() if pa.types.is_list(column.type) else column).to_numpy(zero_copy_only=False)
        yield batch.num_rows


def bench_reference(
    raw: Path, work: Path, batch_size: int, rows: int, min_seconds: float
) -> Dict[str, Dict[str, float]]:
    """The reference layout read row by row (the baseline) and decoded column-wise (its ceiling)."""
    path = work / "reference_layout.parquet"
    if not path.exists():
        write_reference_layout(raw, path, rows)
    return {
        name: _timed(read(path, batch_size), min_seconds, lambda: read(path, batch_size))
        for name, read in (
            ("reference_baseline", _reference_rows),
            ("reference_layout_decode_only", _reference_decode),
        )
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def print_tables(results: Dict[str, object]) -> None:
    print("\n## prepare (one process)\n")
    print("| scale | samples | interactions | item vocab | seconds | samples/s | interactions/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results["prepare"]:
        print(
            f"| {r['scale']}x | {r['samples']:,} | {r['interactions']:,} | {r['item_vocab']:,} | {r['prepare_seconds']:.1f} "
            f"| {r['samples_per_s']:,.0f} | {r['interactions_per_s']:,.0f} |"
        )
    stages = list(results["prepare"][0]["stages"])
    print("\n## prepare: peak RSS per stage (GiB; start RSS in brackets)\n")
    print("| scale | " + " | ".join(stages) + " |")
    print("|---|" + "---|" * len(stages))
    for r in results["prepare"]:
        cells = [
            f"{_gib(r['stages'][s]['peak_rss_bytes'])} ({_gib(r['stages'][s]['start_rss_bytes'])})"
            for s in stages
        ]
        print(f"| {r['scale']}x | " + " | ".join(cells) + " |")
    print(
        f"\n## loader, one worker, batch {results['batch_size']} (target >= {TARGET_SAMPLES_PER_S:,} samples/s)\n"
    )
    print("| path | samples/s | x baseline |")
    print("|---|---|---|")
    base = results["loader"]["reference_baseline"]["samples_per_s"]
    for name, r in results["loader"].items():
        print(f"| {name} | {r['samples_per_s']:,.0f} | {r['samples_per_s'] / base:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work", type=Path, default=Path("out/bench_data"), help="raw + prepared sets (reused)"
    )
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4], help="SynthConfig multiples")
    parser.add_argument("--vocab", default="full")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument(
        "--chunk-samples", type=int, default=None, help="prepare's chunk size (default: its own)"
    )
    parser.add_argument(
        "--baseline-rows", type=int, default=20_000, help="samples in the reference-layout file"
    )
    parser.add_argument(
        "--min-seconds", type=float, default=5.0, help="time each loader path at least this long"
    )
    parser.add_argument("--out", type=Path, default=Path("bench_data.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # one worker = one thread
    args.work.mkdir(parents=True, exist_ok=True)
    prepared = [bench_prepare(args.work, scale, args.vocab, args.chunk_samples) for scale in args.scales]
    data = PreparedData(prepared[0]["prepared"])
    loader = {"blocks": bench_blocks(data, args.batch_size, args.min_seconds)}
    loader["ready_batches_host_gsu"] = bench_ready_batches(data, args.batch_size, args.min_seconds, False)
    loader["ready_batches_gsu_deferred"] = bench_ready_batches(data, args.batch_size, args.min_seconds, True)
    loader.update(
        bench_reference(
            Path(prepared[0]["raw"]), args.work, args.batch_size, args.baseline_rows, args.min_seconds
        )
    )
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "batch_size": args.batch_size,
        "chunk_samples": args.chunk_samples,
        "prepare": prepared,
        "loader": loader,
    }
    print_tables(results)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
