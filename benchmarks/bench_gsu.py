"""GSU top-K (cosine over int8 SCL vectors, K = 50) for long histories, in two shapes:

- training: a batch of ``--batch`` samples over ~batch/11 users, each user's history of length L;
- serving: one user, ``--candidates`` candidates scored against the user's cached history.

Times ``muse_gsu`` (exact: integer dot products, exact norms, recency tie-break), and in the
serving shape also ``serving_topk`` (int8 GEMM, one pass to ranking keys, then one ``torch.topk``
or the two-stage ``blocked_topk`` for each ``--blocks``; "fused": keys and block maxima from one
Triton kernel, on CUDA), and checks all against a plain PyTorch
reference (float cosine + full sort) on the same inputs.

    python benchmarks/bench_gsu.py --lengths 1000 10000 100000 --out gsu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from muse_torchrec.features import SCL_DIM
from muse_torchrec.model.gsu import TopK, muse_gsu, normalize_scl, serving_topk


def reference_topk(hist: torch.Tensor, target: torch.Tensor, sample_user: torch.Tensor, k: int) -> torch.Tensor:
    """Plain PyTorch: float cosines of every behavior, full descending sort; returns the top-K scores [B, k]."""
    scores = torch.einsum("bld,bd->bl", normalize_scl(hist)[sample_user], normalize_scl(target))
    return scores.sort(dim=1, descending=True).values[:, :k]


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs after two warm-up runs."""
    for _ in range(2):
        fn()
    times: List[float] = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def case(name: str, users: int, samples: int, length: int, k: int, device: torch.device, repeats: int,
         blocks: List[int]) -> Dict:
    g = torch.Generator(device="cpu").manual_seed(length + samples)
    hist = torch.randint(-127, 128, (users, length, SCL_DIM), dtype=torch.int8, generator=g).to(device)
    target = torch.randint(-127, 128, (samples, SCL_DIM), dtype=torch.int8, generator=g).to(device)
    sample_user = (torch.arange(samples) * users // samples).to(device)
    lengths = torch.full((users,), length, device=device)
    result: TopK = muse_gsu(hist, lengths, target, sample_user, k)
    reference = reference_topk(hist, target, sample_user, k)
    max_error = float((result.scores - reference).abs().max())
    ms = timed(lambda: muse_gsu(hist, lengths, target, sample_user, k), device, repeats)
    row = {"shape": name, "users": users, "samples": samples, "history": length, "k": k, "ms": ms,
           "max_abs_diff_vs_reference": max_error, "correct": max_error < 1e-5}
    if users == 1:
        row["serving_topk"] = []
        variants = [(None, False)] + [(b, False) for b in blocks] + [(b, True) for b in blocks]
        for block, fused in variants:
            fast = serving_topk(hist[0], length, target, k, block=block, fused=fused)
            ms = timed(lambda: serving_topk(hist[0], length, target, k, block=block, fused=fused), device, repeats)
            error = float((fast.scores - reference).abs().max())
            row["serving_topk"].append({"block": block, "fused": fused, "ms": ms, "correct": error < 1e-5})
    return row


def serving_profile(length: int, candidates: int, k: int, block: int, device: torch.device, repeats: int) -> str:
    """Ops of ``serving_topk`` by device time (host time on CPU), ``repeats`` calls."""
    g = torch.Generator(device="cpu").manual_seed(length)
    hist = torch.randint(-127, 128, (length, SCL_DIM), dtype=torch.int8, generator=g).to(device)
    target = torch.randint(-127, 128, (candidates, SCL_DIM), dtype=torch.int8, generator=g).to(device)
    serving_topk(hist, length, target, k, block=block)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(repeats):
            serving_topk(hist, length, target, k, block=block)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return (f"\nserving_topk, history {length:,}, block {block}, {repeats} calls:\n"
            + prof.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=50))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 128, 256],
                        help="serving: blocked_topk block sizes to time (besides one torch.topk)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true",
                        help="print a torch.profiler table of serving_topk at the last length (first --blocks)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for length in args.lengths:
        rows.append(case("training", max(1, args.batch // 11), args.batch, length, args.k, device, args.repeats,
                         args.blocks))
        rows.append(case("serving", 1, args.candidates, length, args.k, device, args.repeats, args.blocks))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    serving_columns = ["one topk", *[f"block {b}" for b in args.blocks], *[f"fused {b}" for b in args.blocks]]
    print(f"GSU top-{args.k} on {name} (ms; serving_topk in the serving shape)\n\n{'shape':<9} {'users':>6} "
          f"{'samples':>8} {'history':>8} {'muse_gsu':>9} " + " ".join(f"{c:>10}" for c in serving_columns) + "  correct")
    for r in rows:
        fast = r.get("serving_topk", [])
        times = [f"{f['ms']:>10.3f}" for f in fast] or [f"{'-':>10}"] * len(serving_columns)
        ok = r["correct"] and all(f["correct"] for f in fast)
        print(f"{r['shape']:<9} {r['users']:>6} {r['samples']:>8} {r['history']:>8,} {r['ms']:>9.3f} "
              + " ".join(times) + f"  {ok}")
    if args.profile:
        print(serving_profile(args.lengths[-1], args.candidates, args.k, args.blocks[0], device, args.repeats))
    if args.out:
        Path(args.out).write_text(json.dumps({"device": name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
