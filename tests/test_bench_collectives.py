"""benchmarks/bench_collectives.py on one GPU: every collective of the multi-rank step, eager and
replayed from a CUDA graph, timed (NCCL, so CUDA only)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_run  # noqa: E402


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
def test_every_collective_is_timed_eager_and_replayed(tmp_path):
    out = tmp_path / "collectives.json"
    subprocess.run([sys.executable, str(tiny_run.ROOT / "benchmarks" / "bench_collectives.py"), "--rows", "1000",
                    "--params", "100", "--calls", "5", "--out", str(out)],
                   check=True, env={**os.environ, **tiny_run.dist_env(0, 1, tiny_run.free_port(), tmp_path)},
                   capture_output=True, timeout=300)
    results = json.loads(out.read_text())
    assert results["world_size"] == 1 and results["rows"] == 1000
    runs = {(r["collective"], r["launch"]) for r in results["results"]}
    assert runs == {(name, launch) for name in ("rows all-to-all", "dense all-reduce", "rows gather (no comm)")
                    for launch in ("eager", "graph replay")} | {("rows exchange fwd+bwd", "autograd, NCCL"),
                                                               ("rows exchange fwd+bwd", "autograd, copies")}
    assert all(0 < r["host_us"] <= r["done_us"] for r in results["results"]), results["results"]


def test_the_rows_exchange_with_local_copies_gives_the_collective_gradients(monkeypatch):
    """On one (gloo, CPU) rank the all-to-all is an identity, so its stand-in copy must give the same
    gradient: the looked-up rows' gradient is the received rows' gradient in the lookup's order."""
    import torch.distributed as dist
    from unittest import mock

    monkeypatch.syspath_prepend(str(tiny_run.ROOT / "benchmarks"))
    import bench_collectives

    tiny_run.use_one_rank(monkeypatch)
    dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        exchange = bench_collectives.rows_exchange(50, 3, torch.device("cpu"))
        through_gloo = exchange()
        with mock.patch.object(dist, "all_to_all_single", bench_collectives._local_copy):
            through_copies = exchange()
    finally:
        dist.destroy_process_group()
    torch.manual_seed(0)  # rows_exchange's draws, in its order: the rows, their order sent, the gradient
    torch.randn(50, 3)
    as_sent = torch.randperm(50)
    grad = torch.randn(50, 3)
    torch.testing.assert_close(through_gloo, grad[torch.argsort(as_sent)], rtol=0, atol=0)
    torch.testing.assert_close(through_copies, through_gloo, rtol=0, atol=0)
