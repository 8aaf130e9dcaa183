"""Synthetic Taobao-MM: the five raw tables of MUSE_SPEC section 3 with a planted multimodal signal.

The world behind the files:

- **Semantic space.** Topics, categories and items are unit vectors in R^latent_dim: a category is
  its topic's center plus noise (so the few categories of a topic are semantically close) and an
  item is its category's center plus noise (so two items of one category need not be close). Item
  popularity is Zipf-like inside the catalog: a heavy head and a long tail of rarely seen items.
- **SCL vectors** are noisy L2-normalised random projections (latent -> 128) of the item latents,
  quantised exactly like the published ones; a few % of items have none.
- **Users** acquire several interests over their lifetime, each centered on an item and active
  around its own point in time. A history is a chain of browsing segments, each on one of the
  interests active at that time, so interests drift and many appear only in old behaviors (older
  than the last 50). Behaviors of an interest are popular items of its category or of a sibling
  category, biased towards the interest's center.
- **Candidates** are any items (popular or not) of the categories of one of the user's interests
  (old ones included), or random popular items.
- **Clicks.** ``p = sigmoid(b + a * log(1 + s) + item bias + user bias)`` where ``s`` softly counts,
  among the 50 behaviors *anywhere in the history* most similar to the target, those whose latent
  cosine to it is high, each weighted by its item's quality. Neither exact id repeats, nor category
  matches, nor the last 50 behaviors carry that signal fully; retrieving the 50 behaviors closest to
  the target from the whole history (MUSE's GSU on SCL vectors) sees all of it. ``b`` is calibrated
  so that the CTR is that of Taobao-MM; labels are Bernoulli(p).
- **Item quality** (0 for half of the items, 2 for the others): a behavior on a low-quality item
  says nothing about the user's interest. It is an item property that an ID embedding can learn
  from clicks but the SCL vector does not show, so using it means reading the ID embeddings of the
  behaviors that are semantically close to the target, which SA-TA does and which neither a
  histogram of similarities (SimTier) nor ID-only attention can (the paper's case for fusing the
  two in the ESU). Without it, SimTier alone would see the whole signal.

Besides the raw tables, ``<split>_truth.parquet`` (one ``prob: float32`` column, row-aligned with
``<split>_samples.parquet``) holds the true click probabilities, and ``synth_stats.json`` the
statistics returned by :func:`synthesize`.

Everything is vectorised over all behaviors of a block of users; users are generated block by
block (each block from its own random stream), so memory stays bounded at any scale and the output
depends only on the config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from muse_torchrec.config import SynthConfig
from muse_torchrec.data.schema import (
    ITEM_FEATURES_SCHEMA,
    ITEM_FEATURES_TABLE,
    SAMPLES_SCHEMA,
    SCL_SCHEMA,
    SCL_TABLE,
    SPLITS,
    TRUTH_SCHEMA,
    USER_FEATURES_SCHEMA,
    samples_table,
    truth_table,
    user_features_table,
)
from muse_torchrec.features import MAX_HISTORY, RECENT, SCL_DIM, SCL_SCALE

STATS_FILE = "synth_stats.json"

# --- Shape of the data (MUSE_SPEC section 2). ---
EXTRA_SAMPLES_MEAN = 10.0  # candidate samples per user: 1 + Poisson(10), about 11 as in Taobao-MM
TEST_OVERLAP = 0.094  # share of test users who are also train users
PROFILE_CARDINALITIES = (11, 4, 50, 494, 7)
PROFILE_MISSING = 0.03  # users whose profile field is raw 0 (missing), per field
CITY_CARDINALITY, PROVINCE_CARDINALITY = 543, 122
ITEM_SIDE_MISSING = 0.01  # items whose city / province is raw 0
ITEM_FEATURES_MISSING = 0.02  # items absent from item_features
SCL_MISSING = 0.03  # items absent from the SCL table
HISTORY_EMPTY, HISTORY_SHORT = 0.02, 0.18  # the other users have a full 1,000-long history
RARE_COUNT = 17  # the p90 vocabulary keeps history ids seen at least this often
ITEM_ZIPF, CATEGORY_ZIPF = 1.05, 0.8
PROFILE_ZIPF, CITY_ZIPF = 1.0, 1.0

# --- Semantic space. ---
CATEGORIES_PER_TOPIC = 8
# A category is unit(topic + spread * noise) and an item unit(category + spread * noise): two items of a
# category have cosine ~0.74 on average, of sibling categories ~0.68, so many close pairs (cosine >
# SIM_THRESHOLD) cross categories, while two random items have cosine ~0 (std 0.25).
CATEGORY_SPREAD = 0.3
ITEM_SPREAD = 0.6
SCL_NOISE = 0.3  # relative noise added to the projected latent before normalising

# --- Users, interests, histories, candidates. ---
MIN_INTERESTS, EXTRA_INTERESTS_MEAN, MAX_INTERESTS = 2, 2.5, 8
INTEREST_WIDTH = 0.12  # std of an interest's activity around its peak, in units of the lifetime
SEGMENT_MEAN = 25  # mean behaviors per browsing segment on one interest
EXPLORE = 0.12  # behaviors that are random popular items, off every interest
SAME_CATEGORY = 0.35  # interest items in the interest's own category (rest: its topic's categories)
# Behaviors of an interest are the best of a few popular draws, softly biased towards the interest's
# center. Candidates near an interest are any items of its categories, popular or not (ads are
# seldom items already in the history), so neither a category match nor an id repeat tells how close
# to the user's behaviors a candidate is.
HISTORY_DRAWS, NEAR_TEMPERATURE = 4, 0.1
NEAR_TARGETS = 0.7  # candidates drawn near one of the user's interests (rest: popular items)

# --- Click model. ---
SIM_THRESHOLD, SIM_SOFTNESS = 0.85, 0.04  # a behavior counts when its cosine to the target > ~0.85
SIGNAL_WEIGHT = 1.0
QUALITY_LEVELS = (0.0, 2.0)  # a behavior counts q times, q drawn uniformly from these (mean 1)
BIAS_STD = 0.25  # item and user click biases
TARGET_CTR = 0.137
TOP_RELEVANT = 5  # for the statistic "most relevant behaviors older than the last 50"

# --- Output layout. ---
ROWS_PER_GROUP = 50_000
# A user row holds up to 2 x 1,000 int64 (16 KB), so user tables use smaller row groups (~50 MB).
USERS_PER_GROUP = 4096
USERS_PER_BLOCK = 512  # users generated together (one random stream each)
SESSIONS_PER_RELEVANCE_BLOCK = 64  # bounds the [sessions, samples, behaviors] cosine array

# Independent random streams; a block-wise stream also takes the block index.
_STREAM_IDS, _STREAM_CATALOG, _STREAM_POPULATION, _STREAM_USERS = 1, 2, 3, 4
_STREAM_SCL, _STREAM_ITEM_SIDE, _STREAM_LABELS, _STREAM_QUALITY = 5, 6, 7, 8


def _rng(seed: int, stream: int, block: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, block]))


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` [n, d] scaled to unit L2 norm."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _noise(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """[n, d] float32 Gaussian noise with E|row|^2 = 1, so spreads are relative to unit vectors.
    (float32 halves the memory of the per-item arrays of large catalogs.)"""
    return rng.standard_normal((n, d), dtype=np.float32) / np.float32(np.sqrt(d))


def _hashed_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n] distinct nonzero random int64, like Taobao-MM's hashed ids (raw 0 means missing)."""
    info = np.iinfo(np.int64)
    ids = np.empty(0, dtype=np.int64)
    while ids.size < n:  # collisions are astronomically rare: one more draw fixes them
        draw = rng.integers(info.min, info.max, size=n - ids.size, dtype=np.int64, endpoint=True)
        merged = np.concatenate([ids, draw[draw != 0]])
        _, first = np.unique(merged, return_index=True)
        ids = merged[np.sort(first)]
    return ids


def _zipf_weights(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """[n] float64 weights 1 / rank^exponent, ranks in random order."""
    return 1.0 / (rng.permutation(n) + 1.0) ** exponent


def _zipf_choice(rng: np.random.Generator, n: int, size: int, exponent: float) -> np.ndarray:
    weights = _zipf_weights(rng, n, exponent)
    return rng.choice(n, size=size, p=weights / weights.sum())


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """[n + 1] int64 offsets of consecutive runs of ``lengths`` [n]."""
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|, unlike 1 / (1 + exp(-x))


@dataclass(frozen=True)
class _Catalog:
    """N items, C categories, T topics and their semantic space (d = latent_dim).

    Attributes:
        item_ids: [N] int64 raw (hashed) item ids.
        cate_ids: [C] int64 raw category ids.
        latent: [N, d] float32 unit item vectors.
        cate: [N] int64 category of each item.
        bias: [N] float64 item click bias.
        quality: [N] float64 weight of a behavior on the item in the click model.
        by_cate: [N] int64 item indices sorted by category.
        cum_pop: [N] float64 inclusive cumulative popularity along ``by_cate``.
        cate_bounds: [C + 1] int64 positions of each category's items in ``by_cate``.
        cate_topic: [C] int64 topic of each category.
        topic_cates: [C'] int64 the non-empty categories, sorted by topic.
        topic_bounds: [T + 1] int64 positions of each topic's categories in ``topic_cates``.
    """

    item_ids: np.ndarray
    cate_ids: np.ndarray
    latent: np.ndarray
    cate: np.ndarray
    bias: np.ndarray
    quality: np.ndarray
    by_cate: np.ndarray
    cum_pop: np.ndarray
    cate_bounds: np.ndarray
    cate_topic: np.ndarray
    topic_cates: np.ndarray
    topic_bounds: np.ndarray


def _build_catalog(cfg: SynthConfig) -> _Catalog:
    """Topics, categories and items in the latent space; ids; popularity; item biases."""
    rng = _rng(cfg.seed, _STREAM_CATALOG)
    n, c, d = cfg.num_items, cfg.num_categories, cfg.latent_dim
    topics = max(1, c // CATEGORIES_PER_TOPIC)
    cate_topic = rng.permutation(np.arange(c) % topics)
    topic_center = _unit(rng.standard_normal((topics, d), dtype=np.float32))
    cate_center = _unit(topic_center[cate_topic] + np.float32(CATEGORY_SPREAD) * _noise(rng, c, d))
    cate = _zipf_choice(rng, c, n, CATEGORY_ZIPF)
    latent = _unit(cate_center[cate] + np.float32(ITEM_SPREAD) * _noise(rng, n, d))
    popularity = _zipf_weights(rng, n, ITEM_ZIPF)
    by_cate = np.argsort(cate, kind="stable")
    cate_sizes = np.bincount(cate, minlength=c)
    nonempty = np.flatnonzero(cate_sizes)
    topic_cates = nonempty[np.argsort(cate_topic[nonempty], kind="stable")]
    ids = _rng(cfg.seed, _STREAM_IDS)
    return _Catalog(
        item_ids=_hashed_ids(ids, n),
        cate_ids=_hashed_ids(ids, c),
        latent=latent,
        cate=cate,
        bias=rng.normal(0.0, BIAS_STD, n),
        # Its own stream: adding quality left every other draw of the generator unchanged.
        quality=np.asarray(QUALITY_LEVELS)[_rng(cfg.seed, _STREAM_QUALITY).integers(len(QUALITY_LEVELS), size=n)],
        by_cate=by_cate,
        cum_pop=np.cumsum(popularity[by_cate]),
        cate_bounds=_offsets(cate_sizes),
        cate_topic=cate_topic,
        topic_cates=topic_cates,
        topic_bounds=_offsets(np.bincount(cate_topic[nonempty], minlength=topics)),
    )


def _draw_popular(cat: _Catalog, rng: np.random.Generator, n: int) -> np.ndarray:
    """[n] items drawn by popularity from the whole catalog."""
    pos = np.searchsorted(cat.cum_pop, rng.random(n) * cat.cum_pop[-1], side="right")
    return cat.by_cate[np.minimum(pos, cat.by_cate.size - 1)]


def _draw_in_categories(cat: _Catalog, rng: np.random.Generator, cates: np.ndarray) -> np.ndarray:
    """[n] items drawn by popularity, each within its category ``cates`` [n] (non-empty ones)."""
    lo, hi = cat.cate_bounds[cates], cat.cate_bounds[cates + 1]
    mass_before = np.where(lo > 0, cat.cum_pop[np.maximum(lo - 1, 0)], 0.0)
    mass = cat.cum_pop[hi - 1] - mass_before
    pos = np.searchsorted(cat.cum_pop, mass_before + rng.random(cates.size) * mass, side="right")
    return cat.by_cate[np.clip(pos, lo, hi - 1)]  # the clip absorbs float rounding at the edges


def _uniform_in_ranges(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """[n] int64 uniform draws in the non-empty ranges [lo, hi) given by ``lo``, ``hi`` [n]."""
    return lo + (rng.random(lo.size) * (hi - lo)).astype(np.int64)


def _interest_categories(
    cat: _Catalog, rng: np.random.Generator, anchor: np.ndarray
) -> np.ndarray:
    """[n] category of each of n interest items: the interest's ``anchor`` [n] or a sibling."""
    cates = anchor.copy()
    sibling = rng.random(anchor.size) >= SAME_CATEGORY
    topic = cat.cate_topic[anchor[sibling]]
    lo, hi = cat.topic_bounds[topic], cat.topic_bounds[topic + 1]
    cates[sibling] = cat.topic_cates[_uniform_in_ranges(rng, lo, hi)]
    return cates


def _draw_near(
    cat: _Catalog, rng: np.random.Generator, anchor: np.ndarray, center: np.ndarray
) -> np.ndarray:
    """[n] behaviors of interests (``anchor`` [n] categories, ``center`` [n, d]): popular items
    of the interest's categories, the best of a few draws by a soft preference for the center."""
    n = anchor.size
    cates = np.repeat(_interest_categories(cat, rng, anchor), HISTORY_DRAWS)
    items = _draw_in_categories(cat, rng, cates).reshape(n, HISTORY_DRAWS)
    similarity = np.einsum("nmd,nd->nm", cat.latent[items], center)
    best = np.argmax(similarity / NEAR_TEMPERATURE + rng.gumbel(size=items.shape), axis=1)
    return items[np.arange(n), best]


def _draw_any_in_categories(
    cat: _Catalog, rng: np.random.Generator, cates: np.ndarray
) -> np.ndarray:
    """[n] items drawn uniformly (popular or not) within their category ``cates`` [n]."""
    return cat.by_cate[_uniform_in_ranges(rng, cat.cate_bounds[cates], cat.cate_bounds[cates + 1])]


@dataclass(frozen=True)
class _Population:
    """P distinct users; train users are 0..train_users-1, test users a subset plus the rest.

    Attributes:
        ids: [P] int64 raw user ids.
        profile: [P, 5] int64 raw profile values (130_1..130_5), 0 = missing.
        bias: [P] float64 user click bias.
        member: split -> [P] bool, whether the user belongs to that split.
    """

    ids: np.ndarray
    profile: np.ndarray
    bias: np.ndarray
    member: Dict[str, np.ndarray]


def _build_population(cfg: SynthConfig) -> _Population:
    """All users of both splits: ids, profiles, biases and split membership (with the overlap)."""
    rng = _rng(cfg.seed, _STREAM_POPULATION)
    overlap = min(round(TEST_OVERLAP * cfg.test_users), cfg.train_users)
    size = cfg.train_users + cfg.test_users - overlap
    train = np.arange(size) < cfg.train_users
    test = ~train
    test[rng.choice(cfg.train_users, size=overlap, replace=False)] = True
    profile = np.stack(
        [
            np.where(
                rng.random(size) < PROFILE_MISSING,
                0,
                _hashed_ids(rng, card)[_zipf_choice(rng, card, size, PROFILE_ZIPF)],
            )
            for card in PROFILE_CARDINALITIES
        ],
        axis=1,
    )
    return _Population(
        ids=_hashed_ids(rng, size),
        profile=profile,
        bias=rng.normal(0.0, BIAS_STD, size),
        member={"train": train, "test": test},
    )


@dataclass(frozen=True)
class _Interests:
    """The K = MAX_INTERESTS interest slots of u users (the first ``count`` are real).

    Attributes:
        count: [u] int64 number of interests.
        anchor: [u, K] int64 category of each interest.
        center: [u, K, d] float32 latent center of each interest.
        peak: [u, K] float64 time (0 = oldest behavior, 1 = newest) the interest is most active.
    """

    count: np.ndarray
    anchor: np.ndarray
    center: np.ndarray
    peak: np.ndarray


def _draw_interests(cat: _Catalog, rng: np.random.Generator, users: int) -> _Interests:
    """Interests of ``users`` users, each centered on a popular item, peaking at a random time."""
    extra = rng.poisson(EXTRA_INTERESTS_MEAN, users)
    seeds = _draw_popular(cat, rng, users * MAX_INTERESTS).reshape(users, MAX_INTERESTS)
    return _Interests(
        count=np.minimum(MIN_INTERESTS + extra, MAX_INTERESTS),
        anchor=cat.cate[seeds],
        center=cat.latent[seeds],
        peak=rng.random((users, MAX_INTERESTS)),
    )


def _draw_history_lengths(rng: np.random.Generator, users: int) -> np.ndarray:
    """[u] int64 lengths: a few empty, some short (log-uniform in 1..999), most full (1,000)."""
    kind = rng.random(users)
    short = np.exp(rng.random(users) * np.log(MAX_HISTORY)).astype(np.int64)
    short = np.clip(short, 1, MAX_HISTORY - 1)
    lengths = np.where(kind < HISTORY_EMPTY + HISTORY_SHORT, short, MAX_HISTORY)
    return np.where(kind < HISTORY_EMPTY, 0, lengths)


def _segment_interests(
    rng: np.random.Generator, interests: _Interests, owner: np.ndarray, time: np.ndarray
) -> np.ndarray:
    """[s] interest slot of segments starting at ``time`` [s] in the life of users ``owner`` [s]:
    a draw among the user's interests weighted by a Gaussian bump around each one's peak."""
    logits = -0.5 * ((time[:, None] - interests.peak[owner]) / INTEREST_WIDTH) ** 2
    logits[np.arange(MAX_INTERESTS)[None, :] >= interests.count[owner][:, None]] = -np.inf
    return np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)


def _draw_histories(
    cat: _Catalog, rng: np.random.Generator, interests: _Interests, lengths: np.ndarray
) -> np.ndarray:
    """Behavior items [sum(lengths)] int64 of u users, each user's run oldest first."""
    total = int(lengths.sum())
    owner = np.repeat(np.arange(lengths.size), lengths)
    pos = np.arange(total) - _offsets(lengths)[owner]
    is_start = (pos == 0) | (rng.random(total) < 1.0 / SEGMENT_MEAN)
    segment = np.cumsum(is_start) - 1  # [total] segment of each behavior
    first = np.flatnonzero(is_start)
    time = (pos[first] + 0.5) / lengths[owner[first]]
    slot = _segment_interests(rng, interests, owner[first], time)[segment]
    items = np.empty(total, dtype=np.int64)
    explore = rng.random(total) < EXPLORE
    items[explore] = _draw_popular(cat, rng, int(explore.sum()))
    near = ~explore
    user, interest = owner[near], slot[near]
    items[near] = _draw_near(
        cat, rng, interests.anchor[user, interest], interests.center[user, interest]
    )
    return items


def _draw_candidates(
    cat: _Catalog, rng: np.random.Generator, interests: _Interests, users: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """Candidate samples of ``users`` [m] (indices into ``interests``).

    Returns:
        counts: [m] int64 samples per user (1 + Poisson).
        targets: [sum(counts)] int64 target items, each user's run contiguous.
    """
    counts = 1 + rng.poisson(EXTRA_SAMPLES_MEAN, users.size)
    owner = np.repeat(users, counts)
    targets = np.empty(owner.size, dtype=np.int64)
    near = rng.random(owner.size) < NEAR_TARGETS
    user = owner[near]
    interest = (rng.random(user.size) * interests.count[user]).astype(np.int64)
    cates = _interest_categories(cat, rng, interests.anchor[user, interest])
    targets[near] = _draw_any_in_categories(cat, rng, cates)
    targets[~near] = _draw_popular(cat, rng, int((~near).sum()))
    return counts, targets


def _padded_index(
    starts: np.ndarray, lengths: np.ndarray, fill: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Index [b, W] of runs ``starts``/``lengths`` [b] (W = max length, >= 1), ``fill`` where
    padded, and the valid mask [b, W]."""
    pos = np.arange(max(int(lengths.max(initial=0)), 1))
    valid = pos[None, :] < lengths[:, None]
    return np.where(valid, starts[:, None] + pos[None, :], fill), valid


# Per-sample relevance measures of the target against its user's history.
_RELEVANCE_KEYS = (
    "semantic",
    "semantic_recent",
    "semantic_same_category",
    "category_matches",
    "top_relevant_old",
)


def _relevance_block(
    cat: _Catalog,
    hist: np.ndarray,
    hist_starts: np.ndarray,
    hist_lengths: np.ndarray,
    targets: np.ndarray,
    target_starts: np.ndarray,
    target_counts: np.ndarray,
) -> Dict[str, np.ndarray]:
    """Relevance of b sessions' targets to their history; ``hist`` and ``targets`` end with one
    padding entry that padded positions point at. Returns arrays [sum(target_counts)]."""
    h_index, h_valid = _padded_index(hist_starts, hist_lengths, hist.size - 1)  # [b, L]
    t_index, t_valid = _padded_index(target_starts, target_counts, targets.size - 1)  # [b, S]
    h_items, t_items = hist[h_index], targets[t_index]
    cosine = np.matmul(cat.latent[t_items], cat.latent[h_items].transpose(0, 2, 1))  # [b, S, L]
    strength = _sigmoid((cosine - SIM_THRESHOLD) / SIM_SOFTNESS) * cat.quality[h_items][:, None, :]
    soft = strength * h_valid[:, None, :]
    pos = np.arange(h_index.shape[1])
    old = pos[None, :] < (hist_lengths - RECENT)[:, None]  # [b, L] behaviors before the last 50
    matches = (cat.cate[h_items][:, None, :] == cat.cate[t_items][:, :, None]) & h_valid[:, None, :]
    # The 50 most recent behaviors of the target's category: what SIM-hard's GSU keeps.
    newer_matches = np.cumsum(matches[..., ::-1], axis=-1)[..., ::-1]
    sim_hard = matches & (newer_matches <= RECENT)
    top = min(TOP_RELEVANT, pos.size)
    ranked = np.where(h_valid[:, None, :], cosine, -np.inf)
    top_pos = np.argpartition(ranked, pos.size - top, axis=-1)[..., pos.size - top :]  # [b, S, top]
    # Padded positions are never old, so users with fewer than `top` behaviors are handled too.
    top_old = np.take_along_axis(np.broadcast_to(old[:, None, :], ranked.shape), top_pos, axis=-1)
    # Strength of the 50 strongest (close, good-quality) behaviors: a top-50 cosine GSU sees them.
    nearest = min(RECENT, pos.size)
    semantic = np.partition(soft, pos.size - nearest, axis=-1)[..., pos.size - nearest :].sum(-1)
    measures = {
        "semantic": semantic,
        "semantic_recent": (soft * ~old[:, None, :]).sum(-1),
        "semantic_same_category": (soft * sim_hard).sum(-1),
        "category_matches": matches.sum(-1),
        "top_relevant_old": top_old.any(-1),
    }
    return {key: value[t_valid] for key, value in measures.items()}


def _relevance(
    cat: _Catalog,
    hist: np.ndarray,
    hist_offsets: np.ndarray,
    users: np.ndarray,
    targets: np.ndarray,
    target_counts: np.ndarray,
) -> Dict[str, np.ndarray]:
    """Relevance measures [n] of the n targets of sessions ``users`` [m] (with ``target_counts``
    [m]) against the histories ``hist`` [N] / ``hist_offsets`` [u + 1], by blocks of sessions."""
    hist_ext, targets_ext = np.append(hist, 0), np.append(targets, 0)
    target_offsets = _offsets(target_counts)
    parts = [
        _relevance_block(
            cat,
            hist_ext,
            hist_offsets[users[lo:hi]],
            np.diff(hist_offsets)[users[lo:hi]],
            targets_ext,
            target_offsets[lo:hi],
            target_counts[lo:hi],
        )
        for lo, hi in _blocks(users.size, SESSIONS_PER_RELEVANCE_BLOCK)
    ]
    return {key: np.concatenate([part[key] for part in parts]) for key in _RELEVANCE_KEYS}


def _blocks(n: int, size: int) -> Iterator[Tuple[int, int]]:
    return ((lo, min(lo + size, n)) for lo in range(0, n, size))


class _RowGroupWriter:
    """A snappy Parquet file written in row groups of ``rows_per_group`` from pieces of any size."""

    def __init__(self, path: Path, schema: pa.Schema, rows_per_group: int) -> None:
        self._writer = pq.ParquetWriter(path, schema, compression="snappy")
        self._rows_per_group = rows_per_group
        self._pending: List[pa.Table] = []
        self._rows = 0

    def __enter__(self) -> "_RowGroupWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rows and exc[0] is None:
            self._write(self._rows)
        self._writer.close()

    def write(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._rows += table.num_rows
        whole_groups = self._rows // self._rows_per_group * self._rows_per_group
        if whole_groups:
            self._write(whole_groups)

    def _write(self, rows: int) -> None:
        """Write the first ``rows`` pending rows (whole groups, or the last partial group)."""
        pending = pa.concat_tables(self._pending)
        self._writer.write_table(pending.slice(0, rows), row_group_size=self._rows_per_group)
        rest = pending.slice(rows)
        self._pending, self._rows = ([rest] if rest.num_rows else []), rest.num_rows


def _write_table(path: Path, table: pa.Table) -> None:
    with _RowGroupWriter(path, table.schema, ROWS_PER_GROUP) as writer:
        writer.write(table)


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def _user_rows(
    cat: _Catalog,
    pop: _Population,
    users: np.ndarray,
    hist: np.ndarray,
    hist_offsets: np.ndarray,
    rows: np.ndarray,
) -> pa.Table:
    """User-feature table of ``rows`` [r] (indices into the block's ``users`` [u] and its
    histories ``hist`` / ``hist_offsets`` [u + 1])."""
    lengths = np.diff(hist_offsets)[rows]
    offsets = _offsets(lengths)
    # Position of every kept behavior in `hist`: its row's start there plus its rank in the row.
    index = np.repeat(hist_offsets[rows] - offsets[:-1], lengths) + np.arange(offsets[-1])
    items = hist[index]
    profile = pop.profile[users[rows]]
    columns = [pa.array(pop.ids[users[rows]])]
    columns += [pa.array(profile[:, j]) for j in range(profile.shape[1])]
    columns += [
        _list_array(offsets, cat.item_ids[items]),
        _list_array(offsets, cat.cate_ids[cat.cate[items]]),
    ]
    return pa.Table.from_arrays(columns, schema=USER_FEATURES_SCHEMA)


@dataclass
class _SplitSamples:
    """Samples of one split, accumulated block by block (each list holds one array per block)."""

    user: List[np.ndarray] = dataclasses.field(default_factory=list)  # population index
    target: List[np.ndarray] = dataclasses.field(default_factory=list)  # item index
    relevance: List[Dict[str, np.ndarray]] = dataclasses.field(default_factory=list)

    def merged(self) -> Tuple[np.ndarray, np.ndarray, Dict[str, np.ndarray]]:
        relevance = {k: np.concatenate([r[k] for r in self.relevance]) for k in _RELEVANCE_KEYS}
        return np.concatenate(self.user), np.concatenate(self.target), relevance


@dataclass
class _HistoryCounts:
    """Running statistics over the generated users."""

    item_seen: np.ndarray  # [N] int64 occurrences of each item in train histories
    users: int = 0
    short: int = 0
    empty: int = 0
    behaviors: int = 0


def _generate_users(
    out: Path, cfg: SynthConfig, cat: _Catalog, pop: _Population
) -> Tuple[Dict[str, _SplitSamples], _HistoryCounts]:
    """Write both user-feature tables block by block; return the samples and history counts."""
    samples = {split: _SplitSamples() for split in SPLITS}
    counts = _HistoryCounts(item_seen=np.zeros(cfg.num_items, dtype=np.int64))
    with contextlib.ExitStack() as stack:
        writers = {
            split: stack.enter_context(
                _RowGroupWriter(
                    out / f"{user_features_table(split)}.parquet",
                    USER_FEATURES_SCHEMA,
                    USERS_PER_GROUP,
                )
            )
            for split in SPLITS
        }
        for block, (lo, hi) in enumerate(_blocks(pop.ids.size, USERS_PER_BLOCK)):
            rng = _rng(cfg.seed, _STREAM_USERS, block)
            users = np.arange(lo, hi)
            interests = _draw_interests(cat, rng, users.size)
            lengths = _draw_history_lengths(rng, users.size)
            hist, hist_offsets = _draw_histories(cat, rng, interests, lengths), _offsets(lengths)
            for split in SPLITS:
                rows = np.flatnonzero(pop.member[split][users])
                if rows.size == 0:  # e.g. blocks of test-only users have no train rows
                    continue
                writers[split].write(_user_rows(cat, pop, users, hist, hist_offsets, rows))
                target_counts, targets = _draw_candidates(cat, rng, interests, rows)
                acc = samples[split]
                acc.user.append(np.repeat(users[rows], target_counts))
                acc.target.append(targets)
                acc.relevance.append(
                    _relevance(cat, hist, hist_offsets, rows, targets, target_counts)
                )
            train_behaviors = np.repeat(pop.member["train"][users], lengths)
            counts.item_seen += np.bincount(hist[train_behaviors], minlength=cfg.num_items)
            counts.users += users.size
            counts.short += int((lengths < MAX_HISTORY).sum())
            counts.empty += int((lengths == 0).sum())
            counts.behaviors += int(lengths.sum())
    return samples, counts


def _scl_int8(latent: np.ndarray, projection: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[n, 128] int8 SCL vectors of item latents [n, d] through ``projection`` [d, 128],
    quantised as the published ones."""
    noise = SCL_NOISE * _noise(rng, latent.shape[0], SCL_DIM)
    x = _unit(_unit(latent.astype(np.float64) @ projection) + noise)
    return np.trunc(np.clip(x, -1.0, 1.0) * SCL_SCALE).astype(np.int8)


def _write_items(out: Path, cfg: SynthConfig, cat: _Catalog) -> Dict[str, float]:
    """Write item_features and the SCL table; return their statistics."""
    rng = _rng(cfg.seed, _STREAM_ITEM_SIDE)
    n = cfg.num_items
    city_ids = _hashed_ids(rng, CITY_CARDINALITY)
    province_ids = _hashed_ids(rng, PROVINCE_CARDINALITY)
    city_province = rng.integers(PROVINCE_CARDINALITY, size=CITY_CARDINALITY)
    city = _zipf_choice(rng, CITY_CARDINALITY, n, CITY_ZIPF)
    side_missing = rng.random(n) < ITEM_SIDE_MISSING
    keep = rng.random(n) >= ITEM_FEATURES_MISSING
    has_scl = rng.random(n) >= SCL_MISSING
    features = pa.Table.from_arrays(
        [
            pa.array(cat.item_ids[keep]),
            pa.array(cat.cate_ids[cat.cate[keep]]),
            pa.array(np.where(side_missing, 0, city_ids[city])[keep]),
            pa.array(np.where(side_missing, 0, province_ids[city_province[city]])[keep]),
        ],
        schema=ITEM_FEATURES_SCHEMA,
    )
    _write_table(out / f"{ITEM_FEATURES_TABLE}.parquet", features)

    projection = rng.standard_normal((cfg.latent_dim, SCL_DIM))
    norm_sum = 0.0
    with _RowGroupWriter(out / f"{SCL_TABLE}.parquet", SCL_SCHEMA, ROWS_PER_GROUP) as writer:
        for block, (lo, hi) in enumerate(_blocks(n, ROWS_PER_GROUP)):
            items = lo + np.flatnonzero(has_scl[lo:hi])
            vectors = _scl_int8(cat.latent[items], projection, _rng(cfg.seed, _STREAM_SCL, block))
            norm_sum += float(np.linalg.norm(vectors.astype(np.float64), axis=1).sum())
            offsets = np.arange(items.size + 1) * SCL_DIM
            columns = [pa.array(cat.item_ids[items]), _list_array(offsets, vectors.reshape(-1))]
            writer.write(pa.Table.from_arrays(columns, schema=SCL_SCHEMA))
    return {
        "items_without_features_share": float(1.0 - keep.mean()),
        "items_without_scl_share": float(1.0 - has_scl.mean()),
        "scl_int8_norm_mean": norm_sum / max(int(has_scl.sum()), 1),
    }


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` [n] for binary ``labels`` [n] (ties count half)."""
    labels = labels.astype(bool)
    _, inverse, tie_counts = np.unique(scores, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(tie_counts) - (tie_counts - 1) / 2.0  # mean 1-based rank of each tie group
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    rank_sum = float(mid_rank[inverse][labels].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def _auc_stat(scores: np.ndarray, labels: np.ndarray) -> Optional[float]:
    """AUC for the statistics file: None (JSON null) where undefined, as with a single class."""
    value = auc(scores, labels)
    return None if np.isnan(value) else value


def _calibrate_offset(logits: np.ndarray, rate: float) -> float:
    """Offset b with mean(sigmoid(b + logits)) = rate, by bisection (the mean rises with b)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _sigmoid(mid + logits).mean() < rate else (lo, mid)
    return 0.5 * (lo + hi)


def _write_samples(
    out: Path, cfg: SynthConfig, cat: _Catalog, pop: _Population, samples: Dict[str, _SplitSamples]
) -> Dict[str, object]:
    """Draw clicks, write the samples and truth tables of both splits; return their statistics."""
    merged = {split: samples[split].merged() for split in SPLITS}
    logits = {
        split: SIGNAL_WEIGHT * np.log1p(rel["semantic"]) + cat.bias[target] + pop.bias[user]
        for split, (user, target, rel) in merged.items()
    }
    offset = _calibrate_offset(np.concatenate(list(logits.values())), TARGET_CTR)
    stats: Dict[str, Dict[str, object]] = {key: {} for key in ("samples", "ctr", "best_auc")}
    labels_all, relevance_all = [], []
    for index, (split, (user, target, rel)) in enumerate(merged.items()):
        prob = _sigmoid(offset + logits[split]).astype(np.float32)
        click = _rng(cfg.seed, _STREAM_LABELS, index).random(prob.size) < prob
        label = np.stack([~click, click], axis=1).astype(np.int8).reshape(-1)
        columns = [
            _list_array(np.arange(prob.size + 1) * 2, label),
            pa.array(pop.ids[user]),
            pa.array(cat.item_ids[target]),
        ]
        _write_table(
            out / f"{samples_table(split)}.parquet",
            pa.Table.from_arrays(columns, schema=SAMPLES_SCHEMA),
        )
        _write_table(
            out / f"{truth_table(split)}.parquet",
            pa.Table.from_arrays([pa.array(prob)], schema=TRUTH_SCHEMA),
        )
        stats["samples"][split] = int(prob.size)
        stats["ctr"][split] = float(click.mean())
        stats["best_auc"][split] = _auc_stat(prob, click)
        labels_all.append(click)
        relevance_all.append(rel)
    click = np.concatenate(labels_all)
    rel = {k: np.concatenate([r[k] for r in relevance_all]) for k in _RELEVANCE_KEYS}
    return {
        **stats,
        "click_offset": offset,
        "samples_top5_relevant_older_than_recent_share": float(rel["top_relevant_old"].mean()),
        # AUC of single relevance measures (both splits): the semantic strength of the 50 closest
        # behaviors of the whole history (MUSE's view) should beat that of the last 50 (DIN's
        # view), that of the 50 most recent behaviors of the target's category (SIM-hard's view)
        # and the plain count of behaviors of the target's category.
        "signal_auc": {
            "semantic_full_history": _auc_stat(rel["semantic"], click),
            "semantic_recent_50": _auc_stat(rel["semantic_recent"], click),
            "semantic_same_category_recent_50": _auc_stat(rel["semantic_same_category"], click),
            "category_matches": _auc_stat(rel["category_matches"], click),
        },
    }


def _generate(out: Path, cfg: SynthConfig) -> Dict[str, object]:
    cat = _build_catalog(cfg)
    pop = _build_population(cfg)
    samples, counts = _generate_users(out, cfg, cat, pop)
    seen = counts.item_seen[counts.item_seen > 0]
    test_users = int(pop.member["test"].sum())
    stats: Dict[str, object] = {
        "config": dataclasses.asdict(cfg),
        "users": {split: int(pop.member[split].sum()) for split in SPLITS},
        "test_users_in_train_share": float(
            (pop.member["test"] & pop.member["train"]).sum() / test_users
        ),
        "users_short_history_share": counts.short / counts.users,
        "users_empty_history_share": counts.empty / counts.users,
        "mean_history_length": counts.behaviors / counts.users,
        "history_items_distinct": int(seen.size),
        "history_items_rare_share": float((seen < RARE_COUNT).mean()) if seen.size else 0.0,
        "history_items_seen_at_least_17": int((seen >= RARE_COUNT).sum()),
    }
    stats.update(_write_items(out, cfg, cat))
    stats.update(_write_samples(out, cfg, cat, pop, samples))
    text = json.dumps(stats, indent=2, sort_keys=True, allow_nan=False)
    (out / STATS_FILE).write_text(text + "\n")
    return stats


def _check_config(cfg: SynthConfig) -> None:
    for name in ("train_users", "test_users", "num_items", "num_categories", "latent_dim"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"SynthConfig.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.seed < 0:
        raise ValueError(f"SynthConfig.seed must be >= 0, got {cfg.seed}")


def synthesize(
    out_dir: Path | str, cfg: SynthConfig = SynthConfig(), *, overwrite: bool = False
) -> Dict[str, object]:
    """Write a synthetic Taobao-MM raw directory at ``out_dir`` and return its statistics.

    Files: the five raw tables of MUSE_SPEC section 3 (``<table>.parquet``, snappy), the truth side
    tables ``train_truth.parquet`` / ``test_truth.parquet`` (``prob: float32``, row-aligned with the
    samples) and ``synth_stats.json`` (the returned statistics). The directory is built next to
    ``out_dir`` and renamed into place at the end, so a crash never leaves a complete-looking one.
    The same config gives bit-identical files.

    Raises:
        FileExistsError: ``out_dir`` exists and is not an empty directory, and not ``overwrite``.
    """
    _check_config(cfg)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise FileExistsError(
            f"{out_dir} exists and is not empty; pass overwrite=True to replace it"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        stats = _generate(tmp, cfg)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
        if out_dir.is_dir():
            shutil.rmtree(out_dir)
        elif out_dir.exists():
            out_dir.unlink()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats
