"""Methods as configurations over shared parts: a GSU kind (run by the batch builder) + ESU blocks.

Adding a method is adding an entry here; nothing inside ``forward`` switches on the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping

import torch
from torch import nn

from muse_torchrec.config import ModelConfig
from muse_torchrec.model import esu
from muse_torchrec.model.embeddings import (
    build_pooled_collection,
    build_sequence_collection,
    pooled_dims,
    sequence_dim,
)
from muse_torchrec.model.muse import MuseModel, MuseTrain, SparseArch


@dataclass(frozen=True)
class Method:
    """A method: which GSU selects the top-K (see ``data.batch.GSU_KINDS``) and which ESU blocks read it."""

    gsu: str
    blocks: Callable[[ModelConfig, int], List[nn.Module]]
    description: str


def _muse_esu(cfg: ModelConfig, dim: int) -> List[nn.Module]:
    """MUSE's ESU in the reference layout: TA(recent), SA-TA(top-K), means, SimTier(top-K, recent)."""
    return [
        esu.RecentTargetAttention(dim),
        esu.TopKSemanticAttention(dim, cfg.sata_mode),
        esu.TopKMean(dim),
        esu.RecentMean(dim),
        esu.TopKSimTier(cfg.simtier_mode, cfg.simtier_tiers),
        esu.RecentSimTier(cfg.simtier_mode, cfg.simtier_tiers),
    ]


def _din(cfg: ModelConfig, dim: int) -> List[nn.Module]:
    """DIN: target attention and mean over the recent behaviors only."""
    return [esu.RecentTargetAttention(dim), esu.RecentMean(dim)]


METHODS: Dict[str, Method] = {
    "muse": Method("scl_cosine", _muse_esu, "SCL-cosine GSU + SimTier + SA-TA (MUSE)"),
    "sim_hard": Method("category", _muse_esu, "category-match GSU, most recent first + MUSE's ESU"),
    "din": Method("recent_only", _din, "recent 50 behaviors only"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"model.method: unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def build_model(
    cfg: ModelConfig,
    vocab_sizes: Mapping[str, int],
    sequence_features: List[str],
    recent: int,
    max_history: int,
    device: torch.device = torch.device("meta"),
) -> MuseTrain:
    """The training module of ``cfg.method`` with its embedding tables on ``device`` (``meta`` for DMP)."""
    method = get_method(cfg.method)
    dim = sequence_dim(cfg.embeddings)
    sparse = SparseArch(
        sequence=build_sequence_collection(vocab_sizes, cfg.embeddings, sequence_features, device),
        pooled=build_pooled_collection(vocab_sizes, cfg.embeddings, device),
        sequence_dim=dim,
        pooled_dims=pooled_dims(cfg.embeddings),
        sequence_features=sequence_features,
        k=cfg.k,
        recent=recent,
        max_history=max_history,
    )
    return MuseTrain(MuseModel(sparse, method.blocks(cfg, 2 * dim), cfg.mlp))
