"""Long-tailed class profiles and the balanced-validation / long-tailed-train split.

The profile follows the LDAM-DRW convention used by CIFAR-LT and by the weight-balancing paper:
``n_c = int(n_max * (1 / imbalance) ** (c / (C - 1)))`` for c = 0 .. C-1, i.e. exponential decay from
``n_max`` (class 0) to ``n_max / imbalance`` (class C-1). It is written with ``1 / imbalance`` raised to a
positive power exactly as the LDAM-DRW code does (``img_max * imb_factor ** (c / (C - 1.0))``), so the
integer truncation matches theirs (CIFAR-100 IF 100/50/10: 10,847 / 12,608 / 19,573 images).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["longtail_counts", "holdout_and_longtail"]


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
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        need = val_per_class + int(counts[c])
        if idx.size < need:
            raise ValueError(
                f"holdout_and_longtail: class {c} has {idx.size} images, fewer than "
                f"val_per_class ({val_per_class}) + train count ({int(counts[c])}) = {need}"
            )
        idx = idx[rng.permutation(idx.size)]
        val_parts.append(idx[:val_per_class])
        train_parts.append(idx[val_per_class:need])
    empty = np.zeros(0, dtype=np.int64)
    train_idx = np.concatenate(train_parts).astype(np.int64) if train_parts else empty
    val_idx = np.concatenate(val_parts).astype(np.int64) if val_parts else empty
    return train_idx, val_idx
