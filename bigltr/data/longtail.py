"""Every split rule of the dataset converters, in one place (used by all of ``bigltr.data.sources``).

* The long-tail profile (:func:`longtail_counts`) follows the LDAM-DRW convention used by CIFAR-LT and by the
  weight-balancing paper: ``n_c = int(n_max * (1 / imbalance) ** (c / (C - 1)))`` for c = 0 .. C-1, i.e.
  exponential decay from ``n_max`` (class 0) to ``n_max / imbalance`` (class C-1). It is written with
  ``1 / imbalance`` raised to a positive power exactly as the LDAM-DRW code does
  (``img_max * imb_factor ** (c / (C - 1.0))``), so the integer truncation matches theirs (CIFAR-100 IF
  100/50/10: 10,847 / 12,608 / 19,573 images).
* idx (MNIST / Fashion-MNIST): a balanced validation split held out first, then the long-tailed training subset
  (:func:`holdout_and_longtail`).
* The class order (:func:`class_order`, :func:`counts_by_class`): which class gets which count of the profile; label
  order (class 0 gets n_max) unless a seeded permutation is asked for.
* idx pairs (:func:`pairs_holdout`, :func:`draw_pairs`): C x C classes of ordered pairs of source items shown side
  by side; validation ITEMS held out of the source training items first, then pairs drawn within one split only.
* Sources without a validation split (imagefolder, list, inat): a hold-out that never starves the tail
  (:class:`HoldoutPolicy`: nothing from a class under 10 images, at most 10% and at most K=5 of any class), drawn
  from the decodable training images only (:func:`split_items` defers it to :func:`bigltr.data.convert.convert`
  through a :class:`Holdout`).
* CIFAR-LT: the subset by the ``ldam`` or ``official`` convention (:func:`cifar_subset`), validation from the
  training images the subset leaves unused (:func:`val_from_unused`).
* The seeded order the training split is written in (:func:`train_shuffle`); val and test keep source order.

Every random hold-out draws with one ``numpy.random.default_rng(seed)`` consumed class by class
(:func:`draw_per_class`), so a result depends only on its inputs and the seed.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import numpy as np

__all__ = ["LONGTAIL_FORMULA", "IDX_SPLIT_RULE", "longtail_counts", "holdout_and_longtail", "holdout_per_class",
           "draw_per_class", "cifar_subset", "cifar_subset_rule", "val_from_unused", "train_shuffle",
           "train_order_rule", "split_items", "warn", "HoldoutPolicy", "Holdout", "HOLDOUT_DEFAULTS",
           "CLASS_ORDER_RULE", "class_order", "counts_by_class", "PAIRS_SPLIT_RULE", "pair_item_needs",
           "pairs_holdout", "draw_pairs"]

LONGTAIL_FORMULA = "int(n_max * (1/imbalance) ** (c / (C-1)))  # LDAM-DRW"  # as recorded in _info.json


def warn(msg: str) -> None:
    """A converter warning on stderr (the conversion goes on)."""
    print(f"make_shards.py: warning: {msg}", file=sys.stderr)


def longtail_counts(n_max: int, imbalance: float, num_classes: int) -> list[int]:
    """Per-class training counts of an exponential long-tailed profile (LDAM-DRW convention).

    ``imbalance`` is the ratio n_max / n_min (>= 1; 1 gives ``n_max`` for every class).
    Raises ValueError on invalid arguments or when a class would get zero images.
    """
    if isinstance(n_max, bool) or not isinstance(n_max, (int, np.integer)) or n_max < 1:
        raise ValueError(f"longtail_counts: n_max must be a positive integer, got {n_max!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"longtail_counts: num_classes must be a positive integer, got {num_classes!r}")
    try:
        imbalance = float(imbalance)
    except (TypeError, ValueError):
        raise ValueError(f"longtail_counts: imbalance must be a number >= 1, got {imbalance!r}") from None
    if not np.isfinite(imbalance) or imbalance < 1.0:
        raise ValueError(
            f"longtail_counts: imbalance (n_max / n_min) must be a finite number >= 1, got {imbalance!r}"
        )
    n_max, num_classes = int(n_max), int(num_classes)
    if num_classes == 1:
        return [n_max]
    ratio = 1.0 / imbalance
    counts = [int(n_max * ratio ** (c / (num_classes - 1.0))) for c in range(num_classes)]
    if counts[-1] < 1:
        raise ValueError(
            f"longtail_counts: imbalance {imbalance:g} is too large for n_max {n_max}: class {num_classes - 1} "
            f"would get {counts[-1]} images (need n_max / imbalance >= 1)"
        )
    return counts


# ----------------------------------------------------------------------------------------- random draws
def _class_pools(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Per class c, the indices ``i`` with ``labels[i] == c`` in source order."""
    return [np.flatnonzero(labels == c) for c in range(int(num_classes))]


def _drawn(pool: np.ndarray, take: int, rng: np.random.Generator) -> np.ndarray:
    """The first ``take`` of ``pool`` after one ``rng.permutation(pool.size)`` (a pool of 0 or 1 draws nothing)."""
    return pool[rng.permutation(pool.size)[:take]]


def draw_per_class(pools: Sequence[np.ndarray], takes: Sequence[int], seed) -> np.ndarray:
    """``takes[c]`` random indices out of each ``pools[c]``, by one ``default_rng(seed)`` consumed class by
    class (0 .. C-1, every pool permuted whole); returns their union, sorted (source order)."""
    rng = np.random.default_rng(seed)
    parts = [_drawn(np.asarray(p), int(t), rng) for p, t in zip(pools, takes)]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def _check_val_per_class(k) -> int:
    k = int(k)
    if k < 0:
        raise ValueError(f"--val-per-class must be >= 0, got {k}")
    return k


# ----------------------------------------------------------------------------------------- idx
def holdout_and_longtail(
    labels: np.ndarray,
    num_classes: int,
    counts: Sequence[int],
    val_per_class: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a balanced validation split, then take a long-tailed training subset.

    For each class c (in order 0..C-1) the indices ``i`` with ``labels[i] == c`` are shuffled by a
    ``numpy.random.Generator`` seeded with ``seed`` (one generator, consumed class by class, so the result
    depends only on (labels, counts, val_per_class, seed)). The first ``val_per_class`` shuffled indices
    form the validation split, the next ``counts[c]`` the training split.

    Returns ``(train_idx, val_idx)``: int64 arrays grouped by class (class 0 first), each class's block in
    shuffled order. Raises ValueError naming the class if it has fewer than ``val_per_class + counts[c]``
    images, or if a label lies outside [0, num_classes).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"holdout_and_longtail: labels must be 1-D, got shape {labels.shape}")
    num_classes = int(num_classes)
    if len(counts) != num_classes:
        raise ValueError(
            f"holdout_and_longtail: counts has {len(counts)} entries but num_classes is {num_classes}"
        )
    if int(val_per_class) < 0:
        raise ValueError(f"holdout_and_longtail: val_per_class must be >= 0, got {val_per_class}")
    if any(int(n) < 0 for n in counts):
        raise ValueError(f"holdout_and_longtail: counts must be >= 0, got {list(counts)}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"holdout_and_longtail: labels must lie in [0, {num_classes}), found range "
            f"[{labels.min()}, {labels.max()}]"
        )
    val_per_class = int(val_per_class)
    rng = np.random.default_rng(seed)
    train_parts, val_parts = [], []
    for c, idx in enumerate(_class_pools(labels, num_classes)):
        need = val_per_class + int(counts[c])
        if idx.size < need:
            raise ValueError(
                f"holdout_and_longtail: class {c} has {idx.size} images, fewer than "
                f"val_per_class ({val_per_class}) + train count ({int(counts[c])}) = {need}"
            )
        idx = _drawn(idx, need, rng)
        val_parts.append(idx[:val_per_class])
        train_parts.append(idx[val_per_class:])
    empty = np.zeros(0, dtype=np.int64)
    train_idx = np.concatenate(train_parts).astype(np.int64) if train_parts else empty
    val_idx = np.concatenate(val_parts).astype(np.int64) if val_parts else empty
    return train_idx, val_idx


IDX_SPLIT_RULE = ("per class: numpy default_rng(seed) permutation; first val_per_class -> val, next n_c -> train; "
                  "train shard order default_rng([seed, 1]); test = official t10k set")


# ----------------------------------------------------------------------------------------- class order
CLASS_ORDER_RULE = ("class_order = numpy default_rng(class_order_seed).permutation(C) (label order 0..C-1 without a "
                    "seed); class class_order[r] gets the r-th count of the profile (r = 0: n_max), so "
                    "counts[class_order[r]] = int(n_max * (1/imbalance) ** (r / (C-1)))")


def class_order(num_classes: int, seed: Optional[int]) -> np.ndarray:
    """The classes from the most to the fewest training images: label order ``0 .. C-1`` when ``seed`` is None,
    else ``numpy.random.default_rng(seed).permutation(C)``. Only which class gets which count changes; the labels
    stay the source's."""
    num_classes = int(num_classes)
    if seed is None:
        return np.arange(num_classes, dtype=np.int64)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"--class-order-seed must be an integer >= 0, got {seed!r}")
    return np.random.default_rng(int(seed)).permutation(num_classes).astype(np.int64)


def counts_by_class(profile: Sequence[int], order: Sequence[int]) -> list[int]:
    """Per-class counts (indexed by label) when class ``order[r]`` gets ``profile[r]``; ``order`` must be a
    permutation of ``0 .. len(profile)-1``."""
    order = np.asarray(order, dtype=np.int64)
    if order.shape != (len(profile),) or not np.array_equal(np.sort(order), np.arange(len(profile))):
        raise ValueError(f"class order must be a permutation of 0..{len(profile) - 1}, got {order.tolist()}")
    counts = [0] * len(profile)
    for r, c in enumerate(order.tolist()):
        counts[c] = int(profile[r])
    return counts


# ----------------------------------------------------------------------------------------- idx pairs
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


# ----------------------------------------------------------------------------------------- hold-out
HOLDOUT_DEFAULTS = {"per_class": 5, "max_fraction": 0.1, "min_count": 10}


@dataclass(frozen=True)
class HoldoutPolicy:
    """How many validation images a class gives when they are held out of the training images (imagefolder,
    list, inat without a validation split): class c with n_c decodable training images gives

        v_c = 0                                          if n_c < min_count
        v_c = min(per_class, floor(max_fraction * n_c))  otherwise

    so a class under ``min_count`` images keeps them all, no class loses more than ``max_fraction`` of its
    images (at most half: every class keeps at least one), and no class gives more than ``per_class``.
    Defaults 5 / 0.1 / 10: classes of 10-19 images give 1 (the Few group stays in val), 20-29 give 2, 30-39 3,
    40-49 4, from 50 images up 5. ``per_class`` 0: no validation split.
    """

    per_class: int = HOLDOUT_DEFAULTS["per_class"]
    max_fraction: float = HOLDOUT_DEFAULTS["max_fraction"]
    min_count: int = HOLDOUT_DEFAULTS["min_count"]

    def __post_init__(self):
        _check_val_per_class(self.per_class)
        f = float(self.max_fraction)
        if not (0.0 <= f <= 0.5):  # NaN fails too
            raise ValueError(f"--val-max-fraction must lie in [0, 0.5] (a class keeps at least half of its "
                             f"images), got {self.max_fraction}")
        if isinstance(self.min_count, bool) or int(self.min_count) != self.min_count or int(self.min_count) < 1:
            raise ValueError(f"--val-min-count must be an integer >= 1, got {self.min_count!r}")

    @classmethod
    def from_options(cls, per_class: Optional[int] = None, max_fraction: Optional[float] = None,
                     min_count: Optional[int] = None) -> "HoldoutPolicy":
        """The policy with the given options (None: the default of that option)."""
        d = HOLDOUT_DEFAULTS
        return cls(int(d["per_class"] if per_class is None else per_class),
                   float(d["max_fraction"] if max_fraction is None else max_fraction),
                   int(d["min_count"] if min_count is None else min_count))

    def take(self, n: int) -> int:
        """Validation images of a class with ``n`` (decodable) training images."""
        n = int(n)
        if n < int(self.min_count):
            return 0
        return max(0, min(int(self.per_class), math.floor(float(self.max_fraction) * n + 1e-9), n - 1))

    def as_dict(self) -> dict:
        return {"per_class": int(self.per_class), "max_fraction": float(self.max_fraction),
                "min_count": int(self.min_count)}

    def rule(self, seed: int) -> str:
        """The rule as recorded in ``_info.json`` (``source.val_rule``)."""
        return (f"held out of the decodable training images (undecodable files removed first): class c with n_c "
                f"images gives 0 if n_c < {self.min_count}, else min({self.per_class}, floor({self.max_fraction:g} "
                f"* n_c)), drawn with numpy default_rng({seed}) class by class; train = the rest; "
                f"train + val = the official training set")


def holdout_per_class(labels: np.ndarray, num_classes: int, val_per_class: int, seed: int, *,
                      max_fraction: float = HOLDOUT_DEFAULTS["max_fraction"],
                      min_count: int = HOLDOUT_DEFAULTS["min_count"]) -> tuple[np.ndarray, np.ndarray]:
    """Hold out validation images per class by :class:`HoldoutPolicy` (``val_per_class``, ``max_fraction``,
    ``min_count``), drawn by one ``numpy.random.default_rng(seed)`` consumed class by class
    (:func:`draw_per_class`). Returns ``(train_idx, val_idx)``, both sorted (source order).
    """
    policy = HoldoutPolicy(int(val_per_class), max_fraction, min_count)
    labels = np.asarray(labels, dtype=np.int64)
    pools = _class_pools(labels, num_classes)
    val_mask = np.zeros(labels.size, dtype=bool)
    val_mask[draw_per_class(pools, [policy.take(p.size) for p in pools], seed)] = True
    return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)


def train_shuffle(n: int, seed: int) -> np.ndarray:
    """The seeded order in which the training split is written (so each shard mixes classes)."""
    return np.random.default_rng([int(seed), 1]).permutation(int(n))


def train_order_rule(seed: int, others: str = "source order") -> str:
    """How :func:`train_shuffle` orders the training split, as recorded in ``_info.json``."""
    return f"shuffled with numpy default_rng([{seed}, 1]); val and test in {others}"


class Holdout(NamedTuple):
    """A validation split still to be held out of the training split: :func:`bigltr.data.convert.convert` decodes
    every listed training image first and calls :meth:`apply` on the decodable ones, so undecodable files never
    take a validation slot and the policy counts only images that exist."""

    policy: HoldoutPolicy
    seed: int
    num_classes: int

    def apply(self, labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Positions (into ``labels``, the decodable training images in source order) of ``(train, val)``: train in
        :func:`train_shuffle` order, val in source order."""
        tr, va = holdout_per_class(np.asarray(labels, dtype=np.int64), self.num_classes, self.policy.per_class,
                                   self.seed, max_fraction=self.policy.max_fraction,
                                   min_count=self.policy.min_count)
        return tr[train_shuffle(tr.size, self.seed)], va


def _check_val_not_test(val: Optional[list], test: Optional[list], val_flag: str) -> None:
    """A validation split that shares images with the test split would select models on the test set."""
    if not val or not test:
        return

    def where(it):
        return os.path.normcase(os.path.normpath(os.fspath(it.src))) if isinstance(it.src, (str, os.PathLike)) else None

    test_at = {w: it for it in test if (w := where(it)) is not None}
    shared = [(it, test_at[w]) for it in val if (w := where(it)) is not None and w in test_at]
    if shared:
        v, t = shared[0]
        same = "the same images as" if len(shared) == len(val) == len(test) else f"{len(shared)} image(s) with"
        raise ValueError(f"the val split ({val_flag}) shares {same} the test split (first: {v.origin} = {t.origin}, "
                         f"{os.fspath(v.src)}): model selection would see the test set; give a validation set "
                         f"disjoint from the test set, or none (then one is held out of train)")


def split_items(train: list, val: Optional[list], test: Optional[list], num_classes: int, *,
                val_per_class: Optional[int], seed: int, val_flag: str, val_max_fraction: Optional[float] = None,
                val_min_count: Optional[int] = None) -> tuple[dict, dict, Optional[Holdout]]:
    """The splits of a source that may lack a validation split (imagefolder, list, inat).

    With ``val`` given, ``train`` is ordered by :func:`train_shuffle` and returned with it. Without, the validation
    split is held out of ``train`` by :class:`HoldoutPolicy` (``val_per_class``, ``val_max_fraction``,
    ``val_min_count``; None: the defaults), AFTER the conversion has removed undecodable files: ``train`` is then
    returned whole in source order with a :class:`Holdout` for :func:`bigltr.data.convert.convert`.
    ``val_per_class`` 0: no validation split. A val split sharing images with ``test`` is a ValueError.
    ``val_flag`` names the option that gives a validation split, for messages.
    Returns ``({split: records}, provenance notes for _info.json, Holdout or None)``.
    """
    listed = np.bincount(np.array([it.label for it in train], dtype=np.int64), minlength=num_classes).tolist()
    notes: dict = {"source_train_class_counts": listed}
    _check_val_not_test(val, test, val_flag)
    holdout = None
    if val is not None:
        given = [f for f, v in (("--val-per-class", val_per_class), ("--val-max-fraction", val_max_fraction),
                                ("--val-min-count", val_min_count)) if v is not None]
        if given:
            raise ValueError(f"{given[0]} holds a validation split out of train, but {val_flag} already "
                             f"gives one: pass only one of them")
        notes["val_rule"] = f"given by {val_flag}"
        train = [train[i] for i in train_shuffle(len(train), seed)]
    else:
        policy = HoldoutPolicy.from_options(val_per_class, val_max_fraction, val_min_count)
        notes["val_rule"] = policy.rule(seed) if policy.per_class else "none (--val-per-class 0)"
        notes["holdout_policy"] = policy.as_dict()
        if policy.per_class:
            holdout = Holdout(policy, int(seed), int(num_classes))
        else:
            train = [train[i] for i in train_shuffle(len(train), seed)]
    empty = [c for c, n in enumerate(listed) if n == 0]
    if empty:
        warn(f"{len(empty)} class(es) have no training image (first: {empty[:5]})")
    splits = {"train": train}
    if val:
        splits["val"] = val
    elif holdout is None:
        warn(f"no val split (give {val_flag} or --val-per-class K > 0): bigltr's trainer needs train, val and test")
    if test:
        splits["test"] = test
    else:
        warn("no test split: bigltr's trainer needs train, val and test")
    notes["train_order"] = train_order_rule(seed)
    return splits, notes, holdout


# ----------------------------------------------------------------------------------------- CIFAR-LT
def cifar_subset(labels: np.ndarray, counts: list[int], convention: str, ldam_seed: int = 0
                 ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Training indices of CIFAR-LT (grouped by class) and, per class, the unused indices (sorted).

    ldam: ``np.random.seed(ldam_seed)``, then per class 0..C-1 ``np.random.shuffle(idx)``, first n_c (LDAM-DRW).
    official: first n_c of each class in file order (ShadeAlsha/LTR-weight-balancing, no shuffle).
    """
    if convention not in ("ldam", "official"):
        raise ValueError(f"CIFAR-LT convention must be ldam or official, got {convention!r}")
    rs = np.random.RandomState(ldam_seed)  # the legacy global-seed stream LDAM-DRW uses
    train, rest = [], []
    for c, (n, idx) in enumerate(zip(counts, _class_pools(labels, len(counts)))):
        if idx.size < n:
            raise ValueError(f"class {c} has {idx.size} training images, fewer than the {n} the profile needs "
                             f"(lower --n-max)")
        if convention == "ldam":
            rs.shuffle(idx)
        train.append(idx[:n])
        rest.append(np.sort(idx[n:]))
    return np.concatenate(train), rest


def cifar_subset_rule(convention: str, ldam_seed: int) -> str:
    if convention == "ldam":
        return (f"ldam: numpy.random.seed({ldam_seed}), per class 0..C-1 np.random.shuffle(indices), first n_c "
                f"(LDAM-DRW)")
    return "official: first n_c images of each class in file order (LTR-weight-balancing)"


def val_from_unused(rest: Sequence[np.ndarray], val_per_class: int, seed: int) -> tuple[np.ndarray, str]:
    """CIFAR-LT validation: up to ``val_per_class`` images per class from the training images the long-tailed
    subset leaves unused (``rest``, per class), so the standard training set is unchanged. Returns the sorted
    indices and the rule as recorded in ``_info.json``."""
    k = _check_val_per_class(val_per_class)
    val_idx = draw_per_class(rest, [min(k, r.size) for r in rest], seed)
    short = [c for c, r in enumerate(rest) if r.size < k]
    if short and k:
        warn(f"val: {len(short)} class(es) have fewer than {k} unused training images and get fewer "
             f"validation images (class {short[0]}: {rest[short[0]].size})")
    if val_idx.size == 0:
        warn("no val split (--val-per-class 0): bigltr's trainer needs train, val and test")
    rule = (f"up to {k} per class from the training images the long-tailed subset leaves unused "
            f"(numpy default_rng({seed})), so the standard train set is unchanged; a class with "
            f"no unused image (n_c = pool size, e.g. class 0) gets no validation image")
    return val_idx, rule
