"""`muse-torchrec plan` on a machine without GPUs, for the full 243 M-row item table."""

import json
from pathlib import Path

import pytest

from muse_torchrec.cli import main

ROOT = Path(__file__).resolve().parent.parent
FULL = str(ROOT / "configs" / "taobao_mm_full.yaml")
ITEM_ROWS = 243_363_021
GIB = 1024**3


def plan_json(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", FULL, "--world-size", "8", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def item_shards(plan: dict) -> list:
    return [s for s in plan["shards"] if s["table"] == "item"]


def test_full_vocabulary_on_8_ranks_is_row_wise_with_optimizer_state(tmp_path):
    adam = plan_json(tmp_path, "--set", "train.sparse_optimizer=adam")
    shards = item_shards(adam)
    assert {s["sharding_type"] for s in shards} == {"row_wise"}
    assert sorted(s["rank"] for s in shards) == list(range(8))
    assert sum(s["rows"] for s in shards) == ITEM_ROWS
    weights_per_rank = ITEM_ROWS * 16 * 4 / 8
    item_hbm = [s["hbm_bytes"] for s in shards]
    # Adam keeps two fp32 states per weight: the estimate must hold ~3x the weights.
    assert min(item_hbm) >= 2.9 * weights_per_rank
    sgd = plan_json(tmp_path, "--set", "train.sparse_optimizer=sgd")
    assert max(s["hbm_bytes"] for s in item_shards(sgd)) < 1.2 * weights_per_rank


def test_plan_respects_memory_limits(tmp_path, capsys):
    # 8 x 1 GiB of GPU memory cannot hold 15.6 GB of weights: the item table moves to host memory (UVM).
    small_hbm = plan_json(tmp_path, "--hbm-gb", "1")
    assert {s["compute_kernel"] for s in item_shards(small_hbm)} == {"fused_uvm"}
    assert all(mem["hbm"] <= GIB for mem in small_hbm["per_rank_bytes"].values())
    # ... and with 1 GiB of host memory per rank too, no plan exists.
    assert main(["plan", "--config", FULL, "--world-size", "8", "--hbm-gb", "1", "--ddr-gb", "1"]) == 2
    assert "no sharding plan fits 8 cuda ranks" in capsys.readouterr().err


def test_plan_text_lists_every_table(capsys):
    assert main(["plan", "--config", FULL, "--world-size", "4", "--nodes", "2"]) == 0
    text = capsys.readouterr().out
    for table in ("item", "cate", "user", "profile_1", "item_city", "item_province"):
        assert f"\n{table} " in text
    assert "device mem (GiB)" in text


def test_plan_rejects_bad_topology(capsys):
    assert main(["plan", "--config", FULL, "--world-size", "6", "--nodes", "4"]) == 2
    assert "not a multiple" in capsys.readouterr().err


@pytest.mark.parametrize("world_size,expected", [(1, {"table_wise"}), (2, {"row_wise"})])
def test_one_rank_plans_every_table_table_wise(tmp_path, world_size, expected):
    """One rank holds whole tables either way: the config's row-wise item constraint is replaced by
    table-wise there (no bucketization per step), and kept with more ranks."""
    out = tmp_path / "plan.json"
    p90 = str(ROOT / "configs" / "taobao_mm_p90.yaml")
    assert main(["plan", "--config", p90, "--world-size", str(world_size), "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert {s["sharding_type"] for s in item_shards(plan)} == expected
    if world_size == 1:
        assert {s["sharding_type"] for s in plan["shards"]} == {"table_wise"}


def test_one_rank_keeps_the_configs_sharding_when_asked():
    """Benchmarks time one rank sharded as several are (``table_wise_on_one_rank=False``)."""
    from muse_torchrec.config import load_config
    from muse_torchrec.sharding import make_constraints

    cfg = load_config(ROOT / "configs" / "taobao_mm_p90.yaml", []).sharding
    assert make_constraints(cfg, 1)["item"].sharding_types == ["table_wise"]
    assert make_constraints(cfg, 1, table_wise_on_one_rank=False)["item"].sharding_types == ["row_wise"]
    assert make_constraints(cfg, 2)["item"].sharding_types == ["row_wise"]
