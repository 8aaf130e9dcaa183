"""Config strictness: unknown keys name their path, values are type-checked, overrides are explicit."""

from pathlib import Path

import pytest

from muse_torchrec.config import ConfigError, apply_overrides, load_config, save_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_load_and_round_trip(tmp_path):
    cfg = load_config(None)
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_unknown_key_names_its_path(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key model\.kk"):
        load_config(write(tmp_path, "model:\n  kk: 3\n"))
    with pytest.raises(ConfigError, match=r"unknown key trian"):
        load_config(write(tmp_path, "trian:\n  batch_size: 3\n"))


def test_wrong_types_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.k: expected an integer"):
        load_config(write(tmp_path, "model:\n  k: fifty\n"))
    with pytest.raises(ConfigError, match=r"data\.synthesize: expected true/false"):
        load_config(write(tmp_path, "data:\n  synthesize: 1\n"))
    with pytest.raises(ConfigError, match=r"model\.mlp\[1\]: expected an integer"):
        load_config(write(tmp_path, "model:\n  mlp: [256, x]\n"))


def test_overrides_are_type_checked():
    cfg = load_config(None)
    out = apply_overrides(cfg, ["model.k=20", "train.dense_lr=1e-3", "model.mlp=[64, 32]",
                                "model.embeddings.dims.item=8", "train.limit_train_batches=null"])
    assert out.model.k == 20 and out.train.dense_lr == 1e-3 and out.model.mlp == (64, 32)
    assert out.model.embeddings.dims["item"] == 8
    with pytest.raises(ConfigError, match=r"unknown key model\.kk"):
        apply_overrides(cfg, ["model.kk=1"])
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides(cfg, ["model.k"])
    with pytest.raises(ConfigError, match=r"train\.batch_size: expected an integer"):
        apply_overrides(cfg, ["train.batch_size=1.5"])


def test_yaml_booleans_survive_when_not_overridden(tmp_path):
    path = write(tmp_path, "data:\n  synthesize: false\n")
    assert load_config(path, ["model.k=10"]).data.synthesize is False


def test_shipped_configs_load():
    root = Path(__file__).resolve().parent.parent / "configs"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert {"demo_cpu.yaml", "taobao_mm_p90.yaml", "taobao_mm_full.yaml"} <= set(names)
    for name in names:
        load_config(root / name)
