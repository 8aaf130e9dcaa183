"""Host time per call of the collectives a multi-rank training step launches, eager and replayed from
a CUDA graph, on this host's ranks (NCCL).

Why: the multi-rank step is bound by host time (benchmarks/RESULTS.md rows 86, 89), and besides the
one-GPU step it launches the rows' all-to-all forward and backward (``direct_lookup._RowsAllToAll``,
split sizes as host integers) and the dense gradients' all-reduce (``GraphedAdam``). This times what
each launch costs the launching thread ("host us": until the call returns) and the whole call
("done us": until the GPU finished it, every call waited for in turn), for the shapes of one step.
With one rank the collectives are copies (what ``bench_train --shard-as-on-several-ranks`` meets);
with two or more they are the real exchanges.

It also times the rows' exchange as the step runs it: ``_RowsAllToAll``'s forward and backward
(a gather, the all-to-all each way, the gradients' gather and division), against the same autograd
function with each all-to-all replaced by a local copy of the same size (``--rows`` split equally,
so every rank sends and receives as many rows). The difference is what the collectives cost there,
including the slower ops around them (benchmarks/RESULTS.md row 118).

    torchrun --nproc_per_node 2 benchmarks/bench_collectives.py --out collectives.json

Prints a table on rank 0 and writes it as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from typing import Callable, Dict, List
from unittest import mock

import torch
import torch.distributed as dist

from muse_torchrec.train.direct_lookup import _RowsAllToAll


def per_call_us(call: Callable[[], object], calls: int) -> Dict[str, float]:
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


def _split_equally(rows: int, world: int) -> List[int]:
    """``rows`` split over ``world`` ranks as evenly as whole rows allow (the last takes the rest)."""
    splits = [rows // world] * world
    splits[-1] += rows - sum(splits)
    return splits


def collectives(rows: int, dim: int, params: int, device: torch.device) -> Dict[str, Callable[[], None]]:
    """The step's collectives: the rows' all-to-all ([rows, dim] float32, an equal share to each
    rank, split sizes given as host integers) and the dense gradients' all-reduce ([params] float32)."""
    splits = _split_equally(rows, dist.get_world_size())
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


def rows_exchange(rows: int, dim: int, device: torch.device) -> Callable[[], torch.Tensor]:
    """One training step's rows exchange through the routed lookup's autograd function: forward on
    [rows, dim] float32 rows in a random order, backward of a gradient of the received rows; each
    call returns the looked-up rows' gradient [rows, dim]."""
    splits = _split_equally(rows, dist.get_world_size())
    looked_up = torch.randn(rows, dim, device=device, requires_grad=True)
    as_sent = torch.randperm(rows, device=device)
    as_looked_up = torch.argsort(as_sent)
    grad = torch.randn(rows, dim, device=device)
    group = dist.group.WORLD

    def exchange() -> torch.Tensor:
        _RowsAllToAll.apply(looked_up, as_sent, as_looked_up, splits, splits, group).backward(grad)
        looked_up_grad, looked_up.grad = looked_up.grad, None
        return looked_up_grad

    return exchange


def _local_copy(output: torch.Tensor, input: torch.Tensor, **_: object) -> None:
    """A stand-in for ``dist.all_to_all_single`` where every rank sends and receives as many rows."""
    output.copy_(input)


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
    exchange = rows_exchange(args.rows, args.dim, device)
    for how, copies in (("autograd, NCCL", False), ("autograd, copies", True)) * 2:  # alternated: the host drifts
        with mock.patch.object(dist, "all_to_all_single", _local_copy) if copies else contextlib.nullcontext():
            per_call_us(exchange, 10)
            results.append({"collective": "rows exchange fwd+bwd", "launch": how,
                            **per_call_us(exchange, args.calls)})
    if dist.get_rank() == 0:
        print(f"{torch.cuda.get_device_name(device)} x {dist.get_world_size()} rank(s); rows {args.rows:,} x "
              f"{args.dim}, dense {args.params:,}")
        print(f"{'collective':22} {'launch':16} {'host us':>9} {'done us':>9}")
        for r in results:
            print(f"{r['collective']:22} {r['launch']:16} {r['host_us']:9.1f} {r['done_us']:9.1f}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"world_size": dist.get_world_size(), "device": torch.cuda.get_device_name(device),
                           **vars(args), "results": results}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
