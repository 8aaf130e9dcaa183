"""benchmarks/make_prepared.py writes a prepared dir that the trainer itself reads, test split included."""

import json
import sys
from pathlib import Path

from muse_torchrec import features as F
from muse_torchrec.train.trainer import run

import tiny_run

sys.path.insert(0, str(tiny_run.ROOT / "benchmarks"))
from make_prepared import make_prepared  # noqa: E402


def test_the_trainer_trains_and_evaluates_on_a_generated_dir(tmp_path, monkeypatch):
    out = tmp_path / "generated"
    vocab = {table.name: 500 for table in F.TABLES}
    info = make_prepared(out, vocab, samples=600, samples_per_user=6, history=50, scl_rows=300, shards=2,
                         chunk_users=16, seed=0, test_samples=200)
    meta = json.loads((out / "meta.json").read_text())
    assert info["samples"] == meta["splits"]["train"]["samples"] >= 600
    assert meta["splits"]["test"]["samples"] >= 200
    cfg = tiny_run.config(tmp_path, extra=[f"data.prepared_dir={out}", "data.synthesize=false", "data.vocab=full",
                                           "data.max_history=50", "train.limit_train_batches=3"])
    with tiny_run.process_group(monkeypatch) as ctx:
        metrics = run(cfg, ctx)
    assert metrics["train_steps"] == 3
    assert metrics["num_eval_samples"] == meta["splits"]["test"]["samples"]
    assert 0.0 < metrics["auc"] < 1.0
    # The log's samples/s: since the start and since the previous line (steps 2 and 3: log_every=2).
    logs = [json.loads(line) for line in (Path(cfg.train.run_dir) / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [2, 3]
    assert logs[0]["window_samples_per_s"] == logs[0]["samples_per_s"] > 0
    seconds = [r["step"] * cfg.train.batch_size / r["samples_per_s"] for r in logs]
    expected = cfg.train.batch_size / (seconds[1] - seconds[0])
    assert abs(logs[1]["window_samples_per_s"] - expected) < 1e-6 * expected
    # metrics.json's speed after the first log line: the last window's here.
    assert metrics["train_samples_per_s_warm"] == logs[1]["window_samples_per_s"]
