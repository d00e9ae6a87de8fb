"""idx pairs (``make-shards idx --pairs``): C x C classes of ordered pairs of source items shown side by side.

Validation ITEMS are held out of the source training items first (:func:`pairs_holdout`), then the pairs of each
split are drawn within that split's items only (:func:`draw_pairs`); the rule, as recorded in ``_info.json``, is
:data:`PAIRS_SPLIT_RULE`. The per-class draws are :func:`bigltr.data.longtail.draw_per_class`'s.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .longtail import _check_val_per_class, _class_pools, draw_per_class

__all__ = ["PAIRS_SPLIT_RULE", "pair_item_needs", "pairs_holdout", "draw_pairs"]

PAIRS_SPLIT_RULE = (
    "pair class c = C*left + right (ordered pairs of source classes left, right; image = the two items side by "
    "side). Items: val items held out of the official training items first, 2*C*val_per_class per source class "
    "(draw_per_class, numpy default_rng(seed)); train pairs from the remaining training items, val pairs from "
    "the val items, test pairs from the official test items only (a pair never mixes splits). Within a split, "
    "source class k's items are queued as consecutive numpy permutations of its pool (one generator per split: "
    "default_rng([seed, 2]) train, [seed, 3] val, [seed, 4] test, consumed k = 0..C-1), so every item is used "
    "once before any is used again; pair classes c = 0..C^2-1 in turn take their left items from the queue of "
    "class left and then their right items from the queue of class right; if a pair would show one item twice "
    "or repeat another pair of its class, its right items are rotated by the smallest shift that avoids it; "
    "train shard order default_rng([seed, 1]); val and test in pair-class order")


def pair_item_needs(counts: Sequence[int], num_base: int) -> np.ndarray:
    """Items of each source class k that ``counts`` (per pair class ``c = C*left + right``) use: the pairs of the
    classes with ``left == k`` plus those with ``right == k`` (a class with left == right uses 2 per pair)."""
    C = int(num_base)
    n = np.asarray(counts, dtype=np.int64)
    if n.shape != (C * C,):
        raise ValueError(f"pair counts need {C * C} entries ({C} x {C} pair classes), got {n.size}")
    grid = n.reshape(C, C)
    return grid.sum(axis=1) + grid.sum(axis=0)


def pairs_holdout(labels: np.ndarray, num_base: int, val_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold the validation ITEMS out of the source training items: ``2 * C * val_per_class`` of every source class
    (enough for ``val_per_class`` pairs of each of the C^2 pair classes without reusing an item), drawn by
    :func:`draw_per_class` with ``default_rng(seed)``. Returns ``(train items, val items)``, both sorted.
    A source class with fewer items than that, or with no item left for training, is a ValueError."""
    labels = np.asarray(labels, dtype=np.int64)
    k = _check_val_per_class(val_per_class)
    C = int(num_base)
    pools = _class_pools(labels, C)
    take = 2 * C * k
    for c, p in enumerate(pools):
        if p.size <= take and take:
            raise ValueError(f"source class {c} has {p.size} training items: holding out {take} for "
                             f"{k} validation pairs per class leaves none for training (lower --val-per-class)")
    val_mask = np.zeros(labels.size, dtype=bool)
    val_mask[draw_per_class(pools, [take] * C, seed)] = True
    return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)


def _pair_problem(left: np.ndarray, right: np.ndarray) -> bool:
    """A pair showing one item twice, or an ordered pair given twice."""
    if np.any(left == right):
        return True
    return np.unique(np.stack([left, right], axis=1), axis=0).shape[0] < left.size


def draw_pairs(labels: np.ndarray, items: np.ndarray, num_base: int, counts: Sequence[int], seed
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``counts[c]`` ordered pairs ``(left item of class c // C, right item of class c % C)`` for every pair class
    ``c`` (see :data:`PAIRS_SPLIT_RULE`), drawn from ``items`` (indices into ``labels``) only.

    Returns ``(left, right, pair_labels, max_uses)``: index arrays grouped by pair class (class 0 first), and the
    largest number of pairs any one item appears in (1 when the pools are large enough for distinct items).
    Raises ValueError when a source class has no item but is needed, or a pair class cannot be drawn without
    showing one item twice or repeating a pair.
    """
    labels = np.asarray(labels, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    C = int(num_base)
    counts = [int(n) for n in counts]
    if any(n < 0 for n in counts):
        raise ValueError(f"pair counts must be >= 0, got {counts}")
    needs = pair_item_needs(counts, C)
    rng = np.random.default_rng(seed)
    queues = []
    for k in range(C):
        pool = items[labels[items] == k]
        need = int(needs[k])
        if need and pool.size == 0:
            raise ValueError(f"source class {k} has no item in this split but {need} pair slots need one")
        reps = -(-need // pool.size) if need else 0
        queue = np.concatenate([pool[rng.permutation(pool.size)] for _ in range(reps)]) if reps else pool[:0]
        queues.append(queue[:need])
    cursor = [0] * C
    lefts, rights = [], []
    for c, n in enumerate(counts):
        a, b = divmod(c, C)
        left = queues[a][cursor[a]:cursor[a] + n]
        cursor[a] += n
        right = queues[b][cursor[b]:cursor[b] + n]
        cursor[b] += n
        if n and _pair_problem(left, right):
            for shift in range(1, n):
                if not _pair_problem(left, np.roll(right, shift)):
                    right = np.roll(right, shift)
                    break
            else:
                raise ValueError(f"pair class {c} ({a}, {b}): cannot draw {n} distinct pairs of distinct items "
                                 f"from this split's items of those classes (too few items)")
        lefts.append(left)
        rights.append(right)
    left, right = np.concatenate(lefts).astype(np.int64), np.concatenate(rights).astype(np.int64)
    pair_labels = np.repeat(np.arange(C * C, dtype=np.int64), counts)
    max_uses = int(np.bincount(np.concatenate([left, right])).max()) if left.size else 0
    return left, right, pair_labels, max_uses
