"""The long-tailed class counts of ``bigltr-rehearsal`` (:mod:`bigltr.data.rehearsal`): the real datasets' shapes
(:data:`SPECS`), their real per-class profile by rank (:func:`real_profile`) and that profile sampled and scaled
(:func:`scaled_counts`). See the rehearsal's module docstring, "Counts", for the rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = ["Spec", "SPECS", "real_profile", "scaled_counts"]


@dataclass(frozen=True)
class Spec:
    classes: int  # real class count
    n_max: int
    n_min: int
    total: int  # real training images
    val_per_class: int  # 0: no val split in the source (the converter holds one out)
    test_per_class: int
    recipe: str
    groups: tuple  # classes with > 100, 20-100, < 20 training images (the commonly cited Many / Medium / Few sizes)
    tiny: int = 0  # rarest classes with 2 or 3 images (half each)


SPECS = {
    "inat2018": Spec(8142, 1000, 2, 437_513, 0, 3, "inat2018", (842, 4076, 3224), 2000),
    "imagenet_lt": Spec(1000, 1280, 5, 115_846, 20, 50, "imagenet_lt", (385, 479, 136)),
    "places_lt": Spec(365, 4980, 5, 62_500, 20, 100, "places_lt", (131, 163, 71)),
}


# ----------------------------------------------------------------------------------------------- counts
def _fix_total(counts: np.ndarray, total: int, n_max: int) -> np.ndarray:
    """Add/remove one image to/from classes of rank 1, 2, ... (never the top class, never above n_max or below the
    next rank's count) until the sum is ``total``; returns the counts sorted descending."""
    c = counts.astype(np.int64).copy()
    diff = int(total - c.sum())
    step = 1 if diff > 0 else -1
    r = 1
    guard = 0
    while diff != 0 and guard < 50 * len(c):
        guard += 1
        nxt = c[r + 1] if r + 1 < len(c) else 0
        if step > 0 and c[r] + 1 <= min(n_max, c[r - 1]):
            c[r] += 1
            diff -= 1
        elif step < 0 and c[r] - 1 >= max(nxt, 1) and c[r] > c[-1]:
            c[r] -= 1
            diff += 1
        r = r + 1 if r + 1 < len(c) else 1
    return np.sort(c)[::-1]


def _bisect(f, lo: float, hi: float, target: float, iters: int = 60) -> float:
    """x in [lo, hi] with f(x) ~ target, f increasing."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _group_profile(spec: Spec) -> np.ndarray:
    """log n piecewise linear in rank through the group boundaries (n_max -> 101 | 100 -> 20 | 19 -> n_min, the
    last ``tiny`` classes at 3 and 2), the head segment bent (log n linear in t ** p) so that the sum is the real
    total."""
    C = spec.classes
    many, med, few = spec.groups
    assert many + med + few == C
    r = np.arange(C, dtype=np.float64)

    def build(p_head: float) -> np.ndarray:
        n = np.zeros(C)

        def seg(lo, hi, a, b, p):  # log n from log a (rank lo) to log b (rank hi), along t ** p
            t = (r[lo:hi + 1] - lo) / max(1, hi - lo)
            n[lo:hi + 1] = np.exp(np.log(a) + (np.log(b) - np.log(a)) * t ** p)

        seg(0, many - 1, spec.n_max, 101, p_head)
        seg(many, many + med - 1, 100, 20, 1.0)
        tail = C - spec.tiny
        seg(many + med, tail - 1, 19, max(spec.n_min, 4 if spec.tiny else spec.n_min), 1.0)
        out = np.floor(n + 1e-9).astype(np.int64)
        out[tail:tail + spec.tiny // 2] = 3
        out[tail + spec.tiny // 2:] = 2
        return out

    p = _bisect(lambda x: build(x).sum(), 0.01, 5.0, spec.total)
    return _fix_total(build(p), spec.total, spec.n_max)


def real_profile(dataset: str) -> np.ndarray:
    """Training images per class of the real dataset, by rank (descending), summing to its real total."""
    return _group_profile(SPECS[dataset])


def scaled_counts(dataset: str, classes: Optional[int] = None, scale: float = 1.0) -> np.ndarray:
    """The real profile sampled at ``classes`` evenly spaced ranks, then ``max(2, round(n * scale))`` (capped at n
    when scale <= 1); descending."""
    prof = real_profile(dataset)
    C = len(prof) if classes is None else int(classes)
    if C < 2:
        raise ValueError(f"--classes must be >= 2, got {C}")
    if not scale > 0:
        raise ValueError(f"--scale must be > 0, got {scale}")
    ranks = np.minimum(len(prof) - 1, (np.arange(C) * len(prof)) // C)
    n = prof[ranks]
    out = np.maximum(2, np.round(n * float(scale))).astype(np.int64)
    if scale <= 1:
        out = np.minimum(out, np.maximum(n, 2))
    return out
