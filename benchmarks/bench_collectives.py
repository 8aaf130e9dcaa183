"""Host time per call of the collectives a multi-rank training step launches, eager and replayed from
a CUDA graph, on this host's ranks (NCCL).

Why: the multi-rank step is bound by host time (benchmarks/RESULTS.md rows 86, 89), and besides the
one-GPU step it launches the rows' all-to-all forward and backward (``direct_lookup._RowsAllToAll``,
split sizes as host integers) and the dense gradients' all-reduce (``GraphedAdam``). This times what
each launch costs the launching thread ("host us": until the call returns) and the whole call
("done us": until the GPU finished it, every call waited for in turn), for the shapes of one step.
With one rank the collectives are copies (what ``bench_train --shard-as-on-several-ranks`` meets);
with two or more they are the real exchanges.

    torchrun --nproc_per_node 2 benchmarks/bench_collectives.py --out collectives.json

Prints a table on rank 0 and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, Dict, List

import torch
import torch.distributed as dist


def per_call_us(call: Callable[[], None], calls: int) -> Dict[str, float]:
    """``call`` ``calls`` times: microseconds a call until it returned (launch) and until the GPU
    finished it (each call waited for before the next, so no call overlaps another)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    launched = time.perf_counter() - start
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        call()
        torch.cuda.synchronize()
    done = time.perf_counter() - start
    return {"host_us": 1e6 * launched / calls, "done_us": 1e6 * done / calls}


def graphed(call: Callable[[], None]) -> Callable[[], None]:
    """``call`` captured once in a CUDA graph (after a warm-up on a side stream, as torch asks);
    returns the graph's replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def collectives(rows: int, dim: int, params: int, device: torch.device) -> Dict[str, Callable[[], None]]:
    """The step's collectives: the rows' all-to-all ([rows, dim] float32, an equal share to each
    rank, split sizes given as host integers) and the dense gradients' all-reduce ([params] float32)."""
    world = dist.get_world_size()
    splits: List[int] = [rows // world] * world
    splits[-1] += rows - sum(splits)
    send = torch.randn(rows, dim, device=device)
    received = torch.empty_like(send)
    flat = torch.randn(params, device=device)

    def all_to_all() -> None:
        dist.all_to_all_single(received, send, output_split_sizes=splits, input_split_sizes=splits)

    def all_reduce() -> None:
        dist.all_reduce(flat)

    order = torch.randperm(rows, device=device)

    def gather() -> None:  # no collective: what one of the step's own launches costs, for scale
        torch.index_select(send, 0, order, out=received)

    return {"rows all-to-all": all_to_all, "dense all-reduce": all_reduce, "rows gather (no comm)": gather}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # A step of the GPU configs: 1,000 samples x 210 ids at most, 16-wide tables.
    parser.add_argument("--rows", type=int, default=150_000, help="rows a rank sends a step (all ranks together)")
    parser.add_argument("--dim", type=int, default=16, help="the rows' width")
    parser.add_argument("--params", type=int, default=1_000_000, help="dense parameters all-reduced a step")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--out", help="JSON file for the results (rank 0)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs CUDA GPUs (NCCL)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    results = []
    for name, call in collectives(args.rows, args.dim, args.params, device).items():
        for how, fn in (("eager", call), ("graph replay", graphed(call))):
            per_call_us(fn, 10)  # warm-up
            results.append({"collective": name, "launch": how, **per_call_us(fn, args.calls)})
    if dist.get_rank() == 0:
        print(f"{torch.cuda.get_device_name(device)} x {dist.get_world_size()} rank(s); rows {args.rows:,} x "
              f"{args.dim}, dense {args.params:,}")
        print(f"{'collective':20} {'launch':14} {'host us':>9} {'done us':>9}")
        for r in results:
            print(f"{r['collective']:20} {r['launch']:14} {r['host_us']:9.1f} {r['done_us']:9.1f}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"world_size": dist.get_world_size(), "device": torch.cuda.get_device_name(device),
                           **vars(args), "results": results}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
