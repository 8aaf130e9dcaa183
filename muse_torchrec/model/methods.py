"""Methods as configurations over shared parts (MUSE_SPEC sections 5-6).

A method is a GSU kind for the batch builder (``data.batch.GSU_KINDS``) plus a factory of the parts
it adds to the shared model: ESU blocks and, when its GSU needs trainable parameters, a model-side
GSU (``trainable_gsu.HistoryGSU``). Adding a method is adding an entry here; nothing inside
``forward`` switches on the method.

The paper's comparison (Open-Source-1k table): ``din``, ``sim_hard``, ``sim_soft``, ``twin``,
``miss``, ``muse``. ESU ablations (Table 3, MUSE's GSU, only the ESU over the top-K varies):
``esu_ta``, ``esu_simtier``, ``esu_ta_simtier``, ``esu_sata`` and ``muse`` (SA-TA + SimTier). GSU
variants (Table 2, MUSE's ESU, only the GSU varies): ``muse`` (SCL cosine), ``gsu_projection``,
``gsu_scl_id_cosine``, ``gsu_scl_id_attention``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional

import torch
from torch import nn

from muse_torchrec.config import ModelConfig
from muse_torchrec.model import esu
from muse_torchrec.model import trainable_gsu as tg
from muse_torchrec.model.attention import SemanticAwareTargetAttention, TargetAttention
from muse_torchrec.model.embeddings import build_collection, sequence_dim, side_dims
from muse_torchrec.model.muse import MuseModel, MuseTrain, SparseArch


@dataclass
class Parts:
    """What a method adds to the shared model.

    Attributes:
        blocks: ESU / interest blocks (their outputs are concatenated into the tower input).
        gsu: model-side GSU filling the top-K from the whole history, or None (the builder selects).
    """

    blocks: List[nn.Module]
    gsu: Optional[nn.Module] = None


@dataclass(frozen=True)
class Method:
    """A method: which GSU kind the batch builder runs and which parts the model gets.

    ``parts(cfg, dim)`` builds fresh modules for item+category embeddings of width ``dim``.
    """

    gsu: str
    parts: Callable[[ModelConfig, int], Parts]
    label: str
    description: str


def _layout(
    cfg: ModelConfig,
    dim: int,
    topk_interest: Optional[nn.Module],
    topk_simtier: bool,
    recent_simtier: bool = True,
) -> List[nn.Module]:
    """The reference tower's blocks, in its order: TA(recent), [interest over the top-K], mean(top-K),
    mean(recent), [SimTier(top-K)], [SimTier(recent)]."""
    blocks: List[nn.Module] = [esu.RecentTargetAttention(dim)]
    if topk_interest is not None:
        blocks.append(topk_interest)
    blocks += [esu.TopKMean(dim), esu.RecentMean(dim)]
    if topk_simtier:
        blocks.append(esu.TopKSimTier(cfg.simtier_mode, cfg.simtier_tiers))
    if recent_simtier:
        blocks.append(esu.RecentSimTier(cfg.simtier_mode, cfg.simtier_tiers))
    return blocks


def _sata(cfg: ModelConfig, dim: int) -> SemanticAwareTargetAttention:
    return SemanticAwareTargetAttention(dim, dim, mode=cfg.sata_mode)


def _topk_attention(cfg: ModelConfig, dim: int) -> TargetAttention:
    """Plain target attention over the top-K, in SA-TA's mode: SA-TA without its similarity terms."""
    return TargetAttention(dim, dim, mode=cfg.sata_mode)


def _muse_esu(cfg: ModelConfig, dim: int) -> List[nn.Module]:
    """MUSE's ESU in the reference layout: SA-TA and SimTier over the top-K."""
    return _layout(cfg, dim, esu.TopKSemanticAttention(_sata(cfg, dim)), topk_simtier=True)


def _muse(cfg: ModelConfig, dim: int) -> Parts:
    return Parts(_muse_esu(cfg, dim))


def _din(cfg: ModelConfig, dim: int) -> Parts:
    """DIN: target attention and mean over the recent behaviors only."""
    return Parts([esu.RecentTargetAttention(dim), esu.RecentMean(dim)])


def _with_gsu(scorer: Callable[[], tg.HistoryScorer]) -> Callable[[ModelConfig, int], Parts]:
    """MUSE's ESU behind a model-side GSU scoring with ``scorer()`` (parameter-free or own parameters)."""

    def parts(cfg: ModelConfig, dim: int) -> Parts:
        return Parts(_muse_esu(cfg, dim), tg.HistoryGSU(scorer(), cfg.k))

    return parts


def _twin(cfg: ModelConfig, dim: int) -> Parts:
    """TWIN: the GSU scores the whole history with the ESU's own target attention; + SimTier."""
    attention = _topk_attention(cfg, dim)
    blocks = _layout(cfg, dim, esu.TopKTargetAttention(attention), topk_simtier=True)
    return Parts(blocks, tg.HistoryGSU(tg.AttentionLogits(attention), cfg.k))


def _miss(cfg: ModelConfig, dim: int) -> Parts:
    """MISS: union of an ID-cosine GSU and an SCL-cosine GSU; an ID-only ESU (no SimTier, no SA-TA)."""
    blocks = _layout(cfg, dim, esu.TopKTargetAttention(_topk_attention(cfg, dim)), topk_simtier=False,
                     recent_simtier=False)
    return Parts(blocks, tg.HistoryGSU(tg.RankUnion(tg.IdCosine(), tg.SclCosine()), cfg.k))


def _gsu_scl_id_attention(cfg: ModelConfig, dim: int) -> Parts:
    """GSU scored by the ESU's own SA-TA logits (SCL cosine fused with the ID attention score)."""
    attention = _sata(cfg, dim)
    blocks = _layout(cfg, dim, esu.TopKSemanticAttention(attention), topk_simtier=True)
    return Parts(blocks, tg.HistoryGSU(tg.SemanticAttentionLogits(attention), cfg.k))


def _esu_ablation(interest: Optional[Callable[[ModelConfig, int], nn.Module]], simtier: bool) -> Callable[[ModelConfig, int], Parts]:
    """MUSE's GSU; over the top-K only ``interest`` (or none) and optionally SimTier."""

    def parts(cfg: ModelConfig, dim: int) -> Parts:
        module = None if interest is None else interest(cfg, dim)
        return Parts(_layout(cfg, dim, module, topk_simtier=simtier))

    return parts


def _ta(cfg: ModelConfig, dim: int) -> nn.Module:
    return esu.TopKTargetAttention(_topk_attention(cfg, dim))


def _sata_block(cfg: ModelConfig, dim: int) -> nn.Module:
    return esu.TopKSemanticAttention(_sata(cfg, dim))


METHODS: Dict[str, Method] = {
    "din": Method("recent_only", _din, "DIN", "recent 50 behaviors only"),
    "sim_hard": Method("category", _muse, "SIM-hard", "category-match GSU, most recent first + MUSE's ESU"),
    "sim_soft": Method("whole_history_scl", _with_gsu(tg.IdCosine), "SIM-soft",
                       "cosine of the model's own item+category ID embeddings (no gradient) + MUSE's ESU"),
    "twin": Method("whole_history_scl", _twin, "TWIN",
                   "GSU = the ESU's own target attention over the whole history; TA + SimTier ESU"),
    "miss": Method("whole_history_scl", _miss, "MISS",
                   "union of an ID-cosine and an SCL-cosine GSU; ID-only ESU"),
    "muse": Method("scl_cosine", _muse, "MUSE", "SCL-cosine GSU + SimTier + SA-TA (MUSE)"),
    "esu_ta": Method("scl_cosine", _esu_ablation(_ta, simtier=False), "TA", "ESU: target attention"),
    "esu_simtier": Method("scl_cosine", _esu_ablation(None, simtier=True), "SimTier", "ESU: SimTier"),
    "esu_ta_simtier": Method("scl_cosine", _esu_ablation(_ta, simtier=True), "TA + SimTier",
                             "ESU: target attention + SimTier"),
    "esu_sata": Method("scl_cosine", _esu_ablation(_sata_block, simtier=False), "SA-TA", "ESU: SA-TA"),
    "gsu_projection": Method("whole_history_scl_vectors", _with_gsu(tg.ProjectedSclCosine), "SCL + projection",
                             "GSU: cosine of learned projections of the SCL vectors + MUSE's ESU"),
    "gsu_scl_id_cosine": Method("whole_history_scl", _with_gsu(lambda: tg.SumOfScores(tg.SclCosine(), tg.IdCosine())),
                                "SCL cos + ID cos", "GSU: SCL cosine + ID-embedding cosine + MUSE's ESU"),
    "gsu_scl_id_attention": Method("whole_history_scl", _gsu_scl_id_attention, "SCL cos + ID attention",
                                   "GSU: the ESU's SA-TA logits (SCL cosine + ID attention) + MUSE's ESU"),
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
        tables=build_collection(vocab_sizes, cfg.embeddings, sequence_features, device),
        sequence_dim=dim,
        side_dims=side_dims(cfg.embeddings),
        sequence_features=sequence_features,
        k=cfg.k,
        recent=recent,
        max_history=max_history,
    )
    parts = method.parts(cfg, 2 * dim)
    return MuseTrain(MuseModel(sparse, parts.blocks, cfg.mlp, parts.gsu))
