"""benchmarks/bench_train.py: ``shadow`` mode's pacing draws one data-path batch per step and trains
on the staged ones; the script runs every mode on the CPU (the model step with its dense part
synchronised as on several ranks; the data path in the training process and in a feeder process)."""

import gzip
import json
import os
import subprocess
import sys

import tiny_run

sys.path.insert(0, str(tiny_run.ROOT / "benchmarks"))
from bench_train import WaitClock, paced_beside  # noqa: E402

ROUTED = "train.sparse_lookup=routed data.gsu_placement=device train.pipeline=plain"


def test_shadow_pacing_draws_one_data_batch_per_staged_batch_and_ends_with_the_data():
    drawn = []

    def data_path():
        for i in range(5):
            drawn.append(i)
            yield f"data{i}"

    paced = paced_beside(["a", "b"], data_path())
    assert next(paced) == "a" and drawn == [0]
    assert next(paced) == "b" and drawn == [0, 1]
    assert list(paced) == ["a", "b", "a"] and drawn == [0, 1, 2, 3, 4]


def test_the_wait_clock_sums_the_time_inside_each_draw():
    now = [0.0]

    def slow():
        for wait in (0.5, 1.5):
            now[0] += wait
            yield wait
        now[0] += 0.25  # the last draw, which ends the items, waits too

    clock = WaitClock(slow(), clock=lambda: now[0])
    now[0] += 10.0  # time outside the draws does not count
    assert list(clock) == [0.5, 1.5] and clock.seconds == 2.25


def _bench(tmp_path, *args: str) -> dict:
    """bench_train on the CPU, the tables row-wise as on several ranks; its JSON."""
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, str(tiny_run.ROOT / "benchmarks" / "bench_train.py"), "--device", "cpu",
         "--config", str(tiny_run.ROOT / "configs" / "demo_cpu.yaml"), "--set", "train.batch_size=64",
         "--steps", "2", "--warmup", "1", "--workers", "1", "--e2e-samples", "3000", "--sync-dense-on-one-rank",
         "--work", str(tmp_path / "work"), "--out", str(out), "--shard-as-on-several-ranks",
         "--set", tiny_run.ALL_ROW_WISE, *args],
        check=True, env={**os.environ, **tiny_run.dist_env(0, 1, tiny_run.free_port(), tmp_path)},
        capture_output=True, timeout=600)
    return json.loads(out.read_text())


def test_every_mode_runs_on_the_cpu(tmp_path):
    results = _bench(tmp_path, "--modes", "model", "e2e", "shadow", "--gsu-places", "device", "device_process",
                     "--variant", "", "--variant", ROUTED.replace(" ", ";"))
    assert results["sync_dense_on_one_rank"] is True and results["shard_as_on_several_ranks"] is True
    item_plan = next(line for line in results["model:v0"]["plan"].splitlines() if line.startswith("item "))
    assert "row_wise" in item_plan, item_plan  # kept on one rank, as on several
    # The routed lookup's batches routed before the timed steps, their routing timed.
    assert results["model:v0"]["route_ms"] is None and results["model:v1"]["route_ms"] > 0
    for name in ("model:v0", "model:v1", "e2e_device_gsu", "shadow_device_gsu", "e2e_device_gsu_process",
                 "shadow_device_gsu_process"):
        assert results[name]["samples_per_s_per_gpu"] > 0, name


def test_e2e_routes_in_the_thread_ahead(tmp_path):
    settings = [arg for setting in ROUTED.split() for arg in ("--set", setting)]
    results = _bench(tmp_path, "--modes", "e2e", "--gsu-places", "device_ahead", "--steps", "18", *settings)
    run = results["e2e_device_gsu_ahead"]
    assert run["samples_per_s_per_gpu"] > 0 and run["lookups"].startswith("1 ranks, row-wise: the ids routed"), run
    assert 0 < run["batch_wait_ms"] < run["step_ms"], run
    # The data path's two threads by name, beside the training thread.
    assert {"MainThread", "gsu-ahead", "route-ahead"} <= set(run["cpu_ms_by_thread"]), run["cpu_ms_by_thread"]
    for counts in ("runnable_ms_by_thread", "sleeps_by_thread", "preemptions_by_thread"):
        assert set(run[counts]) == set(run["cpu_ms_by_thread"]), counts
    # The data path's threads wait for their inputs: each goes to sleep at some step.
    assert run["sleeps_by_thread"]["gsu-ahead"] > 0 and run["sleeps_by_thread"]["route-ahead"] > 0, run


def test_profiled_steps_leave_a_timeline_per_rank(tmp_path):
    traces = tmp_path / "traces"
    results = _bench(tmp_path, "--modes", "model", "--variant", "", "--profile-steps", "2",
                     "--trace-dir", str(traces))
    assert "host, by CPU time" in results["model:v0"]["profile"]
    with gzip.open(traces / "model_v0.rank0.json.gz", "rt") as trace:
        events = json.load(trace)["traceEvents"]
    # The steps' ops on the host, by name.
    assert any(event.get("name") == "aten::addmm" for event in events), {event.get("name") for event in events}
