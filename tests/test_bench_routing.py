"""benchmarks/bench_routing.py over 2 gloo ranks on the CPU: every phase of the router timed on each
rank, the fixed exchange's layout with the config's graphs (as the trainer's router) and not without,
the distinct ids only where each id is routed once."""

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_run  # noqa: E402

SMALL = ["train.batch_size=16", "data.max_history=40", "data.recent=5", "model.k=6"]


def _bench(tmp_path: Path, name: str, extra: list) -> dict:
    """bench_routing on 2 ranks, each a process, as torchrun would start them."""
    out, port = tmp_path / f"{name}.json", tiny_run.free_port()
    args = [sys.executable, str(tiny_run.ROOT / "benchmarks" / "bench_routing.py"), "--config",
            str(tiny_run.ROOT / "configs" / "taobao_mm_p90.yaml"), "--device", "cpu", "--routings", "4",
            "--warmup", "1", "--distinct-batches", "2", "--scl-rows", "100", "--out", str(out)]
    for override in [*SMALL, *extra]:
        args += ["--set", override]
    ranks = [subprocess.Popen(args, env={**os.environ, **tiny_run.dist_env(r, 2, port, tmp_path)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for rank in ranks:
        output, _ = rank.communicate(timeout=300)
        assert rank.returncode == 0, output
    return json.loads(out.read_text())


def test_every_phase_of_the_routing_is_timed_on_every_rank(tmp_path):
    graphed = _bench(tmp_path, "graphed", [])
    launched = _bench(tmp_path, "launched", ["train.exchange_in_graphs=false"])
    unique = _bench(tmp_path, "unique", ["train.route_unique_ids=true"])
    # The p90 config's model: 2 * (target 1 + recent 5 + top-K 6) sequence slots and 8 side features.
    assert graphed["ids_per_sample"] == 2 * (1 + 5 + 6) + 8 and launched["ids_per_sample"] is None
    optional = ("fixed exchange layout", "distinct ids")
    for results in (graphed, launched, unique):
        assert results["world_size"] == 2 and len(results["ranks"]) == 2
        for rank in results["ranks"]:
            phases = [p for p in rank if p not in ("other", "total")]
            assert all(rank[p] > 0 for p in phases if p not in optional), rank
            assert abs(sum(rank[p] for p in phases) + rank["other"] - rank["total"]) < 1e-6, rank
    assert all(rank["fixed exchange layout"] > 0 for rank in graphed["ranks"] + unique["ranks"])
    assert all(rank["fixed exchange layout"] == 0 for rank in launched["ranks"])
    assert all(rank["distinct ids"] > 0 for rank in unique["ranks"])
    assert all(rank["distinct ids"] == 0 for rank in graphed["ranks"] + launched["ranks"])
