"""The validation hold-out of sources without a validation split (imagefolder, list, inat).

A hold-out that never starves the tail (:class:`HoldoutPolicy`: nothing from a class under 10 images, at most 10%
and at most K=5 of any class), drawn from the decodable training images only: :func:`split_items` defers it to
:func:`bigltr.data.convert.convert` through a :class:`Holdout`. A given validation split that shares images with the
test split is refused. The per-class draws are :func:`bigltr.data.longtail.draw_per_class`'s.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import numpy as np

from .longtail import _check_val_per_class, _class_pools, draw_per_class, train_order_rule, train_shuffle, warn

__all__ = ["HOLDOUT_DEFAULTS", "HoldoutPolicy", "holdout_per_class", "Holdout", "split_items"]

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

