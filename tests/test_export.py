"""Export for serving: the documented files, and an unsharded model loaded from them gives the same
logits as the sharded model loaded from the checkpoint."""

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_run  # noqa: E402

from muse_torchrec import cli  # noqa: E402
from muse_torchrec.train import checkpoint as ck  # noqa: E402
from muse_torchrec.model.embeddings import table_dim  # noqa: E402
from muse_torchrec.train.export import load_export  # noqa: E402

BATCHES = 2


def _eval_batches(cfg, data):
    from muse_torchrec.data.loader import make_loader
    from muse_torchrec.train.trainer import make_builder

    builder = make_builder(cfg, data, pad_to=cfg.train.eval_batch_size)
    return list(itertools.islice(iter(make_loader(data, "test", cfg.train.eval_batch_size, builder)), BATCHES))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-rank run's checkpoint and the sharded model's logits on the first test batches."""
    from muse_torchrec.train.trainer import build_sharded, open_prepared, run

    root = tmp_path_factory.mktemp("export")
    tiny_run.prepare(root)
    cfg = tiny_run.config(root, extra=["train.limit_train_batches=4"])
    with pytest.MonkeyPatch.context() as monkeypatch, tiny_run.process_group(monkeypatch) as ctx:
        run(cfg, ctx)
        data = open_prepared(cfg)
        sharded = build_sharded(cfg, data, ctx)
        info = ck.read_info(ck.resolve_checkpoint(cfg.train.run_dir))
        ck.load_checkpoint(info, sharded, ctx, with_optimizer=False)
        sharded.model.eval()
        with torch.no_grad():
            logits = [sharded.model(batch)[1][1] for batch in _eval_batches(cfg, data)]
    return root, cfg, data, logits


def test_unsharded_model_from_the_export_gives_the_sharded_logits(trained):
    root, cfg, data, logits = trained
    assert cli.main(["export", "--checkpoint", str(root / "run"), "--out", str(root / "served")]) == 0
    model, exported_cfg = load_export(root / "served")
    assert exported_cfg == cfg
    model.eval()
    with torch.no_grad():
        for batch, expected in zip(_eval_batches(cfg, data), logits):
            torch.testing.assert_close(model(batch)[1][1], expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(logits[0], torch.zeros_like(logits[0]))


def test_export_files_follow_the_documented_format(trained):
    root, cfg, data, _ = trained
    out = root / "served_format"
    assert cli.main(["export", "--checkpoint", str(root / "run"), "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format_version"] == 1 and meta["step"] == 4 and meta["method"] == cfg.model.method
    assert set(meta["tables"]) == set(data.meta["vocab_sizes"])
    for table, spec in meta["tables"].items():
        rows = np.load(out / spec["file"])
        assert rows.dtype == np.float32 and rows.shape == (data.vocab_size(table), spec["dim"])
        # Each table at its configured width (the reference's D/2 profile tables stay D/2 wide).
        assert spec["dim"] == table_dim(cfg.model.embeddings, table)
        assert np.array_equal(np.load(out / "vocab" / f"{table}.npy"), data.vocab(table))
    dense = torch.load(out / "dense.pt", weights_only=True)
    assert "model.tower.logit.weight" in dense and not any(".embeddings." in k for k in dense)
    assert np.array_equal(np.load(out / "scl.npy"), data.scl_vectors())


def test_export_never_overwrites(trained, capsys):
    root, _, _, _ = trained
    out = root / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("earlier output")
    assert cli.main(["export", "--checkpoint", str(root / "run"), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "earlier output" and len(list(out.iterdir())) == 1
