"""Batch: the model input (TorchRec ``Pipelineable``), and the builder that turns a SampleBlock into one.

The builder runs the parameter-free GSU (MUSE's SCL cosine, or SIM-hard's category match) on the
host, before the sparse lookup, so only the selected top-K and the recent behaviors reach the
sharded item table (DESIGN.md, "Where the GSU runs"). Id 0 (padding/unknown) is dropped from every
feature, so row 0 of a table is never read nor trained.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from muse_torchrec import features as F
from muse_torchrec.data.block import SampleBlock
from muse_torchrec.data.routing import Routing
from muse_torchrec.model import gsu as gsu_ops

GSU_KINDS = ("scl_cosine", "category", "recent_only", "whole_history", "whole_history_scl", "whole_history_scl_vectors")
# Kinds whose batches carry the whole history (``item_hist``/``cate_hist``): the model selects the top-K.
WHOLE_HISTORY_KINDS = ("whole_history", "whole_history_scl", "whole_history_scl_vectors")


@dataclass
class Batch(Pipelineable):
    """One training/eval batch of B samples.

    Attributes:
        sparse_features: KJT of every id the model's one EmbeddingCollection looks up, keys in its
            order (``features.lookup_order``): the item and category sequences (keys among
            ``features.SEQUENCE_FEATURES`` + ``HISTORY_FEATURES``: target (0/1 id per sample), top-K
            (<= K ids), recent (<= R ids), optional whole history (<= L ids)) and the side features
            (``features.SIDE_FEATURES``, 0/1 id per sample).
        topk_scores: [B, K] float32 GSU similarity of each selected behavior (0 on padding slots).
        recent_scores: [B, R] float32 SCL cosine of each recent behavior with the target.
        labels: [B] float32 click labels.
        weights: [B] float32, 1 for real samples, 0 for padding rows (eval pads the last batch).
        user_key: [B] int64 raw user id (exact GAUC grouping).
        true_prob: [B] float32 true click probability (synthetic data), -1 where unknown.
        hist_scores: [B, L] float32 SCL cosine of every history behavior with the target, aligned with
            ``item_hist``; 0.0 beyond the history and where either vector is missing (GSU kind
            "whole_history_scl"; [B, 0] for the other kinds).
        hist_scl: [U, L, 128] int8 SCL vectors of each user's history, aligned with ``item_hist``
            (zero = missing or padding), target_scl: [B, 128] int8, sample_user: [B] int64 index of each
            sample's user (GSU kind "whole_history_scl_vectors"; empty for the other kinds).
        routing: where ``sparse_features``' ids are looked up over the ranks, set by the data path for
            row-wise tables (``data.routing``); None: the lookup distributes them itself.
    """

    sparse_features: KeyedJaggedTensor
    topk_scores: torch.Tensor
    recent_scores: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    user_key: torch.Tensor
    true_prob: torch.Tensor
    hist_scores: torch.Tensor
    hist_scl: torch.Tensor
    target_scl: torch.Tensor
    sample_user: torch.Tensor
    routing: Optional[Routing] = None

    def _parts(self) -> List[Union[torch.Tensor, KeyedJaggedTensor, Routing]]:
        return [part for part in (getattr(self, f.name) for f in fields(self)) if part is not None]

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        """The batch on ``device``: itself when every tensor is there already (as ``Tensor.to``), which
        is what the training step meets with the device GSU and costs it no rebuilding."""
        if all(_device(part) == device for part in self._parts()):
            return self
        return Batch(**{f.name: None if part is None else part.to(device=device, non_blocking=non_blocking)
                        for f, part in ((f, getattr(self, f.name)) for f in fields(self))})

    def record_stream(self, stream: torch.Stream) -> None:
        for part in self._parts():
            part.record_stream(stream)

    def pin_memory(self) -> "Batch":
        if self.routing is not None:
            raise ValueError("Batch.pin_memory: a routed batch is made on the device, not pinned")
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self) if f.name != "routing"})

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])


def _device(part: Union[torch.Tensor, KeyedJaggedTensor, Routing]) -> torch.device:
    return part.device() if isinstance(part, (KeyedJaggedTensor, Routing)) else part.device


def _padded_rows(offsets: np.ndarray, values: np.ndarray, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """Jagged rows -> ([R, width] values, validity mask), keeping the last ``width`` entries, left-aligned."""
    start = np.maximum(offsets[:-1], offsets[1:] - width)
    index = start[:, None] + np.arange(width)
    mask = index < offsets[1:, None]
    safe = np.where(mask, index, 0)
    out = values[safe] if values.size else np.zeros(safe.shape, dtype=values.dtype)
    return np.where(mask, out, 0), mask


def _compact(mask: np.ndarray, *arrays: np.ndarray) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Move the valid entries of each row to the front (stable) and zero the rest.

    Returns (lengths [R], arrays reordered the same way).
    """
    order = np.argsort(~mask, axis=1, kind="stable")
    kept = np.take_along_axis(mask, order, axis=1)
    return kept.sum(axis=1), [np.where(kept, np.take_along_axis(a, order, axis=1), 0) for a in arrays]


def _jagged(ids: np.ndarray, lengths: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Left-aligned [B, W] ids with per-row lengths -> (flat values, lengths)."""
    mask = np.arange(ids.shape[1]) < lengths[:, None]
    return ids[mask], lengths


def _single(ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """One id per sample, id 0 dropped -> (values, lengths)."""
    present = ids != 0
    return ids[present], present.astype(np.int64)


def _kjt(parts: Dict[str, Tuple[np.ndarray, np.ndarray]]) -> KeyedJaggedTensor:
    """(values, lengths) per feature -> one KJT, its keys in the embedding collection's order.

    The ids per key are given as host numbers, which ``to(device)`` keeps: computed from the lengths
    on the device, TorchRec would read them back (a sync) in every input distribution.
    """
    keys = F.lookup_order(parts)
    values = np.concatenate([parts[k][0].astype(np.int64, copy=False) for k in keys])
    lengths = np.concatenate([parts[k][1].astype(np.int32, copy=False) for k in keys])
    return KeyedJaggedTensor(
        keys=keys, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths),
        length_per_key=[len(parts[k][0]) for k in keys],
    )


def sequence_features(gsu: str) -> List[str]:
    """The item and category sequence features that batches built for GSU kind ``gsu`` carry, in the
    collection's order (their ``sparse_features`` hold these, then ``features.SIDE_FEATURES``)."""
    names = ["item_target", "cate_target", "item_recent", "cate_recent"]
    if gsu in ("scl_cosine", "category"):
        names += ["item_topk", "cate_topk"]
    if gsu in WHOLE_HISTORY_KINDS:
        names += list(F.HISTORY_FEATURES)
    return F.lookup_order(names)


class BatchBuilder:
    """SampleBlock -> Batch: runs the host-side GSU and assembles the KJTs.

    Args:
        scl_vectors: [S + 1, 128] int8 SCL table (row 0 zeros), may be a memmap.
        item_scl_row: [V_item] int32 item row -> SCL row (0 = no vector), may be a memmap.
        gsu: one of ``GSU_KINDS``: "scl_cosine" (MUSE), "category" (SIM-hard), "recent_only" (DIN:
            no top-K), "whole_history" (GSUs with trainable parameters: the model selects from the
            whole history, so the builder emits it as ``item_hist``/``cate_hist``), plus the SCL
            cosine of every behavior ("whole_history_scl") or the SCL vectors themselves
            ("whole_history_scl_vectors"), see :class:`Batch`.
        k: top-K size; recent: number of recent behaviors; max_history: L.
        pad_to: pad every batch to this many samples with weight-0 rows (eval), or None.
        defer_topk: for "scl_cosine" / "category", leave the selection to the training device
            (``device_gsu.DeviceGsu``): item_topk / cate_topk hold as many 0 ids as the GSU will select
            (placeholders it overwrites: their count is known on the host) and topk_scores zeros.
    """

    def __init__(
        self,
        scl_vectors: np.ndarray,
        item_scl_row: np.ndarray,
        gsu: str = "scl_cosine",
        k: int = 50,
        recent: int = 50,
        max_history: int = 1000,
        pad_to: Optional[int] = None,
        defer_topk: bool = False,
    ) -> None:
        if gsu not in GSU_KINDS:
            raise ValueError(f"unknown GSU kind {gsu!r}; expected one of {GSU_KINDS}")
        self.scl_vectors = scl_vectors
        self.item_scl_row = item_scl_row
        self.gsu = gsu
        self.k = k
        self.recent = recent
        self.max_history = max_history
        self.pad_to = pad_to
        self.defer_topk = defer_topk

    def _scl(self, item_rows: np.ndarray) -> torch.Tensor:
        """Item rows (any shape) -> int8 SCL vectors (shape + [128])."""
        rows = np.asarray(self.item_scl_row[item_rows.reshape(-1)])
        return torch.from_numpy(np.asarray(self.scl_vectors[rows])).view(*item_rows.shape, F.SCL_DIM)

    def __call__(self, block: SampleBlock) -> Batch:
        block, weights = padded_block(block, self.pad_to)
        return self.assemble(block, weights, *user_histories(block, self.max_history))

    def assemble(self, block: SampleBlock, weights: np.ndarray, items: np.ndarray, cates: np.ndarray,
                 hist_len: np.ndarray) -> Batch:
        """The batch of an already padded ``block`` (``weights`` [B]) from its ``user_histories``."""
        su = block.sample_user
        su_t = torch.from_numpy(su)
        target_scl = self._scl(block.target[F.ITEM.name])
        target_unit = gsu_ops.normalize_scl(target_scl)

        recent_items, recent_cates, recent_len = _last(items, cates, hist_len, self.recent)
        recent_cos = gsu_ops.grouped_cosine(gsu_ops.normalize_scl(self._scl(recent_items)), target_unit, su_t)
        recent_len = recent_len[su]
        seq: Dict[str, Tuple[np.ndarray, np.ndarray]] = {
            "item_target": _single(block.target[F.ITEM.name]),
            "cate_target": _single(block.target[F.CATE.name]),
            "item_recent": _jagged(recent_items[su], recent_len),
            "cate_recent": _jagged(recent_cates[su], recent_len),
        }
        topk_scores = torch.zeros(block.batch_size, self.k)
        if self.gsu in ("scl_cosine", "category") and self.defer_topk:
            lengths = self._selected_lengths(block, cates, hist_len)
            seq["item_topk"] = seq["cate_topk"] = (np.zeros(int(lengths.sum()), dtype=np.int64), lengths)
        elif self.gsu in ("scl_cosine", "category"):
            topk = self._select(block, items, cates, hist_len, target_scl)
            selected_items = gsu_ops.gather_selected(torch.from_numpy(items), su_t, topk).numpy()
            lengths = topk.lengths.numpy()
            if self.gsu == "scl_cosine":
                topk_scores = topk.scores
            else:
                # The ESU's similarity is the SCL cosine of each selected behavior, whatever selected it.
                selected_unit = gsu_ops.normalize_scl(self._scl(selected_items))
                mask = torch.from_numpy(np.arange(self.k) < lengths[:, None])
                topk_scores = torch.einsum("bkd,bd->bk", selected_unit, target_unit) * mask
            seq["item_topk"] = _jagged(selected_items, lengths)
            seq["cate_topk"] = _jagged(gsu_ops.gather_selected(torch.from_numpy(cates), su_t, topk).numpy(), lengths)
        if self.gsu in WHOLE_HISTORY_KINDS:
            seq["item_hist"] = _jagged(items[su], hist_len[su])
            seq["cate_hist"] = _jagged(cates[su], hist_len[su])
        history_scl = self._history_scl(items, su_t, target_scl, target_unit)

        seq.update({name: _single(block.user_features[name][su]) for name in F.USER_FEATURES})
        seq.update({name: _single(block.target[name]) for name in F.TARGET_SIDE_FEATURES})
        true_prob = block.true_prob if block.true_prob is not None else np.full(block.batch_size, -1.0)
        return Batch(
            sparse_features=_kjt(seq),
            topk_scores=topk_scores.float().contiguous(),
            recent_scores=recent_cos.float().contiguous(),
            labels=torch.from_numpy(block.labels.astype(np.float32)),
            weights=torch.from_numpy(weights),
            user_key=torch.from_numpy(block.user_key.astype(np.int64)),
            true_prob=torch.from_numpy(np.asarray(true_prob, dtype=np.float32)),
            **history_scl,
        )

    def _history_scl(
        self, hist_items: np.ndarray, sample_user: torch.Tensor, target_scl: torch.Tensor, target_unit: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        """The SCL fields of :class:`Batch` for this GSU kind (empty placeholders for the others)."""
        batch_size = target_scl.shape[0]
        out = {
            "hist_scores": torch.zeros(batch_size, 0),
            "hist_scl": torch.zeros(0, hist_items.shape[1], F.SCL_DIM, dtype=torch.int8),
            "target_scl": torch.zeros(0, F.SCL_DIM, dtype=torch.int8),
            "sample_user": torch.zeros(0, dtype=torch.int64),
        }
        if self.gsu == "whole_history_scl":
            # Padding positions hold item 0, whose SCL vector is zero: their cosine is 0.0.
            history_unit = gsu_ops.normalize_scl(self._scl(hist_items))
            out["hist_scores"] = gsu_ops.grouped_cosine(history_unit, target_unit, sample_user).float().contiguous()
        if self.gsu == "whole_history_scl_vectors":
            out.update(hist_scl=self._scl(hist_items), target_scl=target_scl, sample_user=sample_user)
        return out

    def _selected_lengths(self, block: SampleBlock, hist_cates: np.ndarray, hist_len: np.ndarray) -> np.ndarray:
        """[B] how many behaviors the GSU will select per sample: MUSE selects min(k, history length)
        (behaviors without an SCL vector rank last but are selectable), SIM-hard min(k, matches)."""
        su = block.sample_user
        if self.gsu == "scl_cosine":
            return np.minimum(hist_len[su], self.k)
        target_cate = torch.from_numpy(block.target[F.CATE.name])
        matches = gsu_ops.category_matches(torch.from_numpy(hist_cates[su]), torch.from_numpy(hist_len[su]), target_cate)
        return matches.sum(dim=1).clamp(max=self.k).numpy()

    def _select(
        self,
        block: SampleBlock,
        hist_items: np.ndarray,
        hist_cates: np.ndarray,
        hist_len: np.ndarray,
        target_scl: torch.Tensor,
    ) -> gsu_ops.TopK:
        """Top-K positions into each sample's user history (MUSE: SCL cosine; SIM-hard: category)."""
        su = torch.from_numpy(block.sample_user)
        lengths = torch.from_numpy(hist_len)
        if self.gsu == "category":
            target_cate = torch.from_numpy(block.target[F.CATE.name])
            return gsu_ops.category_match_topk(torch.from_numpy(hist_cates)[su], lengths[su], target_cate, self.k)
        return gsu_ops.muse_gsu(self._scl(hist_items), lengths, target_scl, su, self.k)


def user_histories(block: SampleBlock, max_history: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each user's last ``max_history`` behaviors: ([U, L] item rows, [U, L] category rows, lengths [U]),
    id-0 entries (padding / out-of-vocabulary) removed, the rest left-aligned (oldest first), zeros after."""
    items, valid = _padded_rows(block.hist_offsets, block.hist_items, max_history)
    cates, _ = _padded_rows(block.hist_offsets, block.hist_cates, max_history)
    lengths, (items, cates) = _compact(valid & (items != 0), items, cates)
    return items, cates, lengths


def padded_block(block: SampleBlock, size: Optional[int]) -> Tuple[SampleBlock, np.ndarray]:
    """``pad_block(block, size)``, or ``block`` as is with weights all 1 when ``size`` is None."""
    if size is None:
        return block, np.ones(block.batch_size, dtype=np.float32)
    return pad_block(block, size)


def _last(items: np.ndarray, cates: np.ndarray, lengths: np.ndarray, width: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The last ``width`` entries of left-aligned rows, oldest first: ([R, width] x 2, lengths [R])."""
    count = np.minimum(lengths, width)
    index = (lengths - count)[:, None] + np.arange(width)
    keep = np.arange(width) < count[:, None]
    index = np.where(keep, index, 0)
    picked = [np.where(keep, np.take_along_axis(a, index, axis=1), 0) for a in (items, cates)]
    return picked[0], picked[1], count


def pad_block(block: SampleBlock, size: int) -> Tuple[SampleBlock, np.ndarray]:
    """Pad a block to ``size`` samples by repeating its last sample; returns (block, weights [size])."""
    n = block.batch_size
    if n > size:
        raise ValueError(f"block of {n} samples is larger than the batch size {size}")
    weights = np.zeros(size, dtype=np.float32)
    weights[:n] = 1.0
    if n == size:
        return block, weights
    take = np.minimum(np.arange(size), n - 1)
    per_sample = {
        "labels": block.labels[take],
        "user_key": block.user_key[take],
        "sample_user": block.sample_user[take],
        "target": {name: ids[take] for name, ids in block.target.items()},
        "true_prob": None if block.true_prob is None else block.true_prob[take],
    }
    return replace(block, **per_sample), weights
