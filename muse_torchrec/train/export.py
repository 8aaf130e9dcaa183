"""Export a checkpoint's weights for serving, as plain files that need neither TorchRec nor DCP.

Layout of the export directory (``FORMAT_VERSION`` 1)::

    meta.json               format_version, step, method, the dense file and, per table, its rows,
                            dimension and file (``tables``)
    config.yaml             the run's resolved config: model shape, K, recent, max_history
    dense.pt                torch state dict (``torch.load(..., weights_only=True)``) of every
                            parameter and buffer of ``MuseTrain`` except the embedding tables: the
                            interest blocks, the Dice MLP (BatchNorm statistics of rank 0) and the
                            logit layer; keys as in ``MuseTrain.state_dict()``
    embeddings/<table>.npy  float32 [rows, dim]: row r of the table, r = vocabulary row (0 = padding
                            and unknown ids), dim its configured width (``model.embeddings``; the
                            collection stores narrower side tables padded to the item width, and
                            only these columns are ever read)
    vocab/<table>.npy       int64 sorted raw ids: raw id ``vocab[i]`` has row ``i + 1``
    scl.npy, item_scl_row.npy   the frozen SCL table (int8 [S + 1, 128]) and item row -> SCL row,
                            which MUSE's GSU reads (copied from the prepared dir)

``load_export`` rebuilds the unsharded ``MuseTrain`` from these files on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn

from muse_torchrec.config import ExperimentConfig, load_config, save_config
from muse_torchrec.data.batch import sequence_features
from muse_torchrec.data.prepare import ITEM_SCL_ROW_FILE, SCL_FILE, VOCAB_DIR
from muse_torchrec.model.embeddings import table_dim
from muse_torchrec.model.methods import build_model, get_method
from muse_torchrec.model.muse import MuseTrain
from muse_torchrec.train.checkpoint import CheckpointError, CheckpointInfo, failure, read_rank_state
from muse_torchrec.train.sharded import embedding_parameters

FORMAT_VERSION = 1
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
DENSE_FILE = "dense.pt"
EMBEDDINGS_DIR = "embeddings"


def plain_model(cfg: ExperimentConfig, vocab_sizes: Dict[str, int]) -> MuseTrain:
    """The unsharded model of ``cfg`` on CPU (tables as ordinary tensors)."""
    features = sequence_features(get_method(cfg.model.method).gsu)
    return build_model(cfg.model, vocab_sizes, features, cfg.data.recent, cfg.data.max_history,
                       device=torch.device("cpu"))


def table_keys(model: nn.Module) -> Dict[str, str]:
    """Table name -> its state-dict key (``...embeddings.<table>.weight``)."""
    return {key.split(".")[-2]: key for key in embedding_parameters(model)}


def load_checkpoint_unsharded(info: CheckpointInfo, cfg: ExperimentConfig) -> MuseTrain:
    """The checkpoint's model as one unsharded CPU module (DCP assembles the full tables).

    Runs in a single process without a process group. Replicated buffers (BatchNorm statistics)
    are rank 0's.
    """
    model = plain_model(cfg, info.vocab_sizes)
    state = {"model": model.state_dict()}
    try:
        dcp.load(state, checkpoint_id=info.path)
    except CheckpointException as err:
        raise CheckpointError(f"checkpoint {info.path} cannot be loaded ({failure(err)})") from err
    state["model"].update(read_rank_state(info.path, 0)["buffers"])
    model.load_state_dict(state["model"])
    return model


def export_checkpoint(info: CheckpointInfo, cfg: ExperimentConfig, out: Path) -> Path:
    """Write the export of a checkpoint to ``out`` (must not exist), atomically; returns ``out``.

    ``cfg`` is the checkpoint's config (its ``data.prepared_dir`` provides vocabularies and SCL).
    """
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out")
    prepared = Path(cfg.data.prepared_dir)
    copies = [prepared / SCL_FILE, prepared / ITEM_SCL_ROW_FILE] + [prepared / VOCAB_DIR / f"{t}.npy" for t in info.vocab_sizes]
    missing = [str(p) for p in copies if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the export needs the prepared data of the checkpoint: missing {', '.join(missing)} "
                                "(set data.prepared_dir)")
    model = load_checkpoint_unsharded(info, cfg)
    state = model.state_dict()
    tables = table_keys(model)
    work = out.parent / f".{out.name}.partial"
    shutil.rmtree(work, ignore_errors=True)
    (work / EMBEDDINGS_DIR).mkdir(parents=True)
    (work / VOCAB_DIR).mkdir()
    for table, key in tables.items():
        width = table_dim(cfg.model.embeddings, table)
        np.save(work / EMBEDDINGS_DIR / f"{table}.npy", state[key][:, :width].numpy().astype(np.float32))
    torch.save({k: v for k, v in state.items() if k not in tables.values()}, work / DENSE_FILE)
    for source in copies:
        shutil.copyfile(source, work / source.relative_to(prepared))
    save_config(cfg, work / CONFIG_FILE)
    meta = {
        "format_version": FORMAT_VERSION,
        "step": info.step,
        "method": cfg.model.method,
        "dense": DENSE_FILE,
        "tables": {t: {"rows": int(state[k].shape[0]), "dim": table_dim(cfg.model.embeddings, t),
                       "file": f"{EMBEDDINGS_DIR}/{t}.npy"} for t, k in tables.items()},
    }
    (work / META_FILE).write_text(json.dumps(meta, indent=1))
    os.rename(work, out)
    return out


def load_export(path: str | Path) -> Tuple[MuseTrain, ExperimentConfig]:
    """The unsharded CPU model of an export directory, and its config."""
    path = Path(path)
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: export format version {meta.get('format_version')}, this code reads {FORMAT_VERSION}")
    cfg = load_config(path / CONFIG_FILE)
    model = plain_model(cfg, {t: spec["rows"] for t, spec in meta["tables"].items()})
    state = torch.load(path / meta["dense"], weights_only=True)
    full = model.state_dict()
    for table, key in table_keys(model).items():
        weights = torch.from_numpy(np.load(path / meta["tables"][table]["file"]))
        # Back to the collection's width: the columns past the table's own are never read.
        state[key] = torch.nn.functional.pad(weights, (0, full[key].shape[1] - weights.shape[1]))
    model.load_state_dict(state)
    return model, cfg
