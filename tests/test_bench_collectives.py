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
                    for launch in ("eager", "graph replay")}
    assert all(0 < r["host_us"] <= r["done_us"] for r in results["results"]), results["results"]
