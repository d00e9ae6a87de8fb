"""The long-tail profile and the split rules of the dataset converters (used by all of ``bigltr.data.sources``).

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
* CIFAR-LT: the subset by the ``ldam`` or ``official`` convention (:func:`cifar_subset`), validation from the
  training images the subset leaves unused (:func:`val_from_unused`).
* The seeded order the training split is written in (:func:`train_shuffle`); val and test keep source order.

Two rule sets live in modules of their own, built on this one's draws: idx pairs (C x C classes of ordered pairs of
source items, :mod:`bigltr.data.pairs`) and the hold-out of sources without a validation split (imagefolder, list,
inat: :class:`bigltr.data.holdout.HoldoutPolicy`, :func:`bigltr.data.holdout.split_items`).

Every random hold-out draws with one ``numpy.random.default_rng(seed)`` consumed class by class
(:func:`draw_per_class`), so a result depends only on its inputs and the seed.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import numpy as np

__all__ = ["LONGTAIL_FORMULA", "IDX_SPLIT_RULE", "longtail_counts", "holdout_and_longtail", "draw_per_class",
           "cifar_subset", "cifar_subset_rule", "val_from_unused", "train_shuffle", "train_order_rule", "warn",
           "CLASS_ORDER_RULE", "class_order", "counts_by_class"]

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


def train_shuffle(n: int, seed: int) -> np.ndarray:
    """The seeded order in which the training split is written (so each shard mixes classes)."""
    return np.random.default_rng([int(seed), 1]).permutation(int(n))


def train_order_rule(seed: int, others: str = "source order") -> str:
    """How :func:`train_shuffle` orders the training split, as recorded in ``_info.json``."""
    return f"shuffled with numpy default_rng([{seed}, 1]); val and test in {others}"



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
