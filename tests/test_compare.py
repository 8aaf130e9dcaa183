"""`muse-torchrec compare`: run bookkeeping, aggregation over seeds, the report, and one tiny real study."""

import json
from pathlib import Path

import pytest

from muse_torchrec import compare as C
from muse_torchrec.config import load_config, save_config


def fake_runs(out: Path, gauc: dict) -> list:
    """metrics.json files for {method: [GAUC per seed]} (other metrics derived from it)."""
    seeds = range(len(next(iter(gauc.values()))))
    specs = C.run_specs(Path("cfg.yaml"), (), list(gauc), list(seeds), out)
    for spec in specs:
        g = gauc[spec.method][spec.seed]
        spec.run_dir.mkdir(parents=True)
        metrics = {"gauc": g, "auc": g + 0.05, "gauc_per_batch": g - 0.001, "logloss": 1.0 - g,
                   "train_samples_per_s": 1000.0 * g, "best_gauc": 0.8}
        (spec.run_dir / "metrics.json").write_text(json.dumps(metrics))
    return specs


def test_relative_change_is_the_papers():
    # MUSE vs DIN on Open-Source-1k: 0.6154 / 0.6082 - 1 = +1.18 %.
    assert C.relative_change_pct(0.6154, 0.6082) == pytest.approx(1.1838, abs=1e-4)


def test_aggregation_claims_and_report(tmp_path):
    gauc = {"din": [0.60, 0.61, 0.62], "sim_hard": [0.64, 0.65, 0.66], "sim_soft": [0.58, 0.74, 0.61],
            "muse": [0.70, 0.71, 0.72]}
    specs = fake_runs(tmp_path, gauc)
    results = C.collect(specs, {m: 100.0 for m in gauc})
    assert results["din"].mean["gauc"] == pytest.approx(0.61)
    assert results["din"].std["gauc"] == pytest.approx(0.01)  # sample standard deviation
    report = C.report_json(C.STUDIES["paper"], results, [0, 1, 2], "muse-torchrec compare", 12.0)
    assert report["methods"]["muse"]["gauc_change_vs_baseline_pct"] == pytest.approx(100 * (0.71 / 0.61 - 1))
    assert report["methods"]["muse"]["paper_gauc"] == 0.6154
    verdicts = {(c["better"], c["worse"]): c["holds"] for c in report["claims"]}
    # sim_soft's seeds spread (std 0.085) more than its gaps: those claims do not hold.
    assert verdicts == {("muse", "sim_soft"): False, ("muse", "sim_hard"): True,
                        ("sim_soft", "din"): False, ("sim_hard", "din"): True}
    assert report["best_by_mean"] == "muse"
    text = C.report_markdown(report)
    assert "Highest mean GAUC: **MUSE**." in text
    assert "| MUSE | 0.7100 ± 0.0100 | +16.39 % |" in text
    assert "| SIM-soft > DIN | +0.0333 | 0.0850 | NO |" in text
    assert "| TWIN" not in text  # only the methods that were run
    C.plot(report, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_finished_runs_are_reused_only_with_the_same_config(tmp_path):
    config = tmp_path / "base.yaml"
    save_config(load_config(None, ["model.k=7"]), config)
    spec = C.run_specs(config, ("train.batch_size=64",), ["din"], [3], tmp_path)[0]
    assert spec.overrides[-3:] == ("train.seed=3", "data.seed=3", f"train.run_dir={spec.run_dir}")
    assert not C._is_done(spec, config)
    spec.run_dir.mkdir(parents=True)
    save_config(load_config(config, spec.overrides), spec.run_dir / "config.yaml")
    (spec.run_dir / "metrics.json").write_text("{}")
    assert C._is_done(spec, config)
    other = C.run_specs(config, ("train.batch_size=32",), ["din"], [3], tmp_path)[0]
    assert other.run_dir == spec.run_dir and not C._is_done(other, config)


def test_train_command_uses_torchrun_for_several_ranks():
    spec = C.RunSpec("muse", 0, Path("/r"), ("model.method=muse",))
    one = C.train_command(Path("c.yaml"), spec, nproc=1, device="cpu")
    assert one[1:6] == ["-m", "muse_torchrec.cli", "train", "--config", "c.yaml"]
    assert one[-2:] == ["--set", "model.method=muse"]
    two = C.train_command(Path("c.yaml"), spec, nproc=2, device="cpu")
    assert two[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def test_tiny_study_end_to_end(tmp_path):
    """Two methods, one seed, tiny synthetic data, a few steps: the three report files appear."""
    from muse_torchrec.cli import main

    config = tmp_path / "tiny.yaml"
    save_config(load_config(None, [
        f"data.raw_dir={tmp_path}/raw", f"data.prepared_dir={tmp_path}/prepared",
        "data.synth.train_users=60", "data.synth.test_users=20", "data.synth.num_items=2000",
        "train.batch_size=32", "train.eval_batch_size=100", "train.limit_train_batches=3", "model.mlp=[16]",
    ]), config)
    out = tmp_path / "out"
    assert main(["compare", "--config", str(config), "--methods", "din", "muse", "--seeds", "1",
                 "--jobs", "2", "--out", str(out)]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert list(report["methods"]) == ["din", "muse"]
    for entry in report["methods"].values():
        assert 0.0 <= entry["mean"]["gauc"] <= 1.0 and entry["lookups_per_sample"] > 0
    # MUSE looks up the top-K on top of DIN's target + recent ids.
    assert report["methods"]["muse"]["lookups_per_sample"] > report["methods"]["din"]["lookups_per_sample"]
    assert (out / "compare.md").read_text().startswith("# DIN, SIM-hard")
    assert (out / "compare.png").is_file()
    with pytest.raises(ValueError, match="unknown method"):
        C.run_compare(C.CompareOptions(config, (), "paper", ("nope",), 1, out), "x")
