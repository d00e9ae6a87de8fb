"""``OUT/conversion_report.json``: per-split counts and the skipped (undecodable) images of a conversion, and the
two limits that stop it (:class:`SkipLimitExceeded`: more than ``--max-skip-fraction`` of a split skipped;
:class:`EmptiedClassError`: every listed training image of a class skipped). Kept by
:func:`bigltr.data.convert.convert`.
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from bigltr.atomic import write_json_atomic

from .writer import REPORT_NAME

if TYPE_CHECKING:
    from .convert import Item

__all__ = ["SkipLimitExceeded", "EmptiedClassError", "ConversionReport"]


class SkipLimitExceeded(ValueError):
    """More than ``max_skip_fraction`` of a split's images could not be decoded."""


class EmptiedClassError(ValueError):
    """Every listed training image of a class could not be decoded: the class would have no training image."""


class ConversionReport:
    """Per-split counts and the skipped images; saved as ``OUT/conversion_report.json``.

    ``describe(c)``: how messages name class c (e.g. ``"'Aves sp.', category_id 4521"``).
    """

    def __init__(self, max_skip_fraction: float, extra: Optional[dict] = None,
                 describe: Optional[Callable[[int], str]] = None):
        self.max_skip_fraction = float(max_skip_fraction)
        self.splits: dict[str, dict[str, int]] = {}
        self.skipped: list[dict[str, str]] = []
        self.extra = dict(extra or {})  # further top-level keys (after the standard ones)
        self.describe = describe or (lambda c: "")
        self._class_left: dict[str, dict[int, int]] = {}  # split -> class -> listed images not yet skipped

    def start(self, split: str, listed: int, labels: Optional[Sequence[int]] = None) -> None:
        """``labels`` (the training split's): a class all of whose listed images are skipped is an error."""
        self.splits[split] = {"listed": int(listed), "written": 0, "skipped": 0}
        if labels is not None:
            left: dict[int, int] = {}
            for lab in labels:
                left[int(lab)] = left.get(int(lab), 0) + 1
            self._class_left[split] = left

    def allowed(self, split: str) -> int:
        return int(math.floor(self.max_skip_fraction * self.splits[split]["listed"] + 1e-9))

    def skip(self, split: str, item: Item, error: str) -> None:
        self.splits[split]["skipped"] += 1
        where = os.fspath(item.src) if isinstance(item.src, (str, os.PathLike)) else None
        self.skipped.append({"split": split, "key": item.key, "file": where, "origin": item.origin,
                             "label": int(item.label), "error": error})
        s = self.splits[split]
        left = self._class_left.get(split)
        if left is not None:
            c = int(item.label)
            left[c] -= 1
            if left[c] == 0:
                n = sum(1 for r in self.skipped if r["split"] == split and r["label"] == c)
                name = self.describe(c)
                raise EmptiedClassError(
                    f"class {c}{f' ({name})' if name else ''}: all {n} of its listed training image(s) could not "
                    f"be decoded (last: {item.origin}: {error}); the class would have no training image. Replace "
                    f"or remove the files (listed in {REPORT_NAME}) or remove the class from the source")
        if s["skipped"] > self.allowed(split):
            raise SkipLimitExceeded(
                f"split '{split}': {s['skipped']} of {s['listed']} images could not be decoded (last: "
                f"{item.origin}: {error}), more than --max-skip-fraction {self.max_skip_fraction:g} allows "
                f"({self.allowed(split)}); stopped. The skipped files are listed in {REPORT_NAME}"
            )

    def as_dict(self, status: str, message: str = "") -> dict:
        return {"status": status, "message": message, "max_skip_fraction": self.max_skip_fraction,
                "splits": self.splits, "skipped": self.skipped, **self.extra}

    def write(self, out_dir: str, status: str, message: str = "") -> str:
        path = os.path.join(out_dir, REPORT_NAME)
        write_json_atomic(path, self.as_dict(status, message))
        return path

