"""What a stage writes besides checkpoints: a summary.csv row per epoch (CsvLog), the classifier's row norms per
epoch (weight_norms.npy / .json), and what the stage's end reports (Final). bigltr.engine.loop.StageLoop writes them.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from bigltr.atomic import write_bytes_atomic, write_json_atomic
from bigltr.rundir import StageDir


@dataclass
class Final:
    """The stage's end: val/test metrics of the best epoch's weights (`metrics`: results.json's val, test and
    posthoc entries) and what the stage reports with them."""
    metrics: dict
    best_epoch: int
    peak_memory_mib: float  # measured after the final evaluation: the stage's peak, evaluation included
    weight_norms: list[float]  # classifier row norms of the best epoch's weights
    eval_s: float  # seconds of the final val/test evaluation
    val_s: float  # seconds of the per-epoch validation
    val_reused: bool = False  # val metrics taken from best.pt (its epoch's validation), no second val pass


def val_text(val: dict | None) -> str:
    """The log's validation field: "val_all 74.90", or "no val" (protocol refit trains on val)."""
    return "no val" if val is None else f"val_all {val['all']:.2f}"


def write_weight_norms(out: Path, per_epoch: list, class_counts: list[int], extra: dict) -> None:
    """In stage folder `out`: weight_norms.npy, the classifier row norms of every epoch, float32 [epochs, classes]
    (36 MB at 100,000 classes x 90 epochs, where JSON took 89 MB); weight_norms.json, what they are, with a
    per-epoch summary (min / median / max) that reads at any class count. `bigltr.results.read_weight_norms` reads
    both forms."""
    import numpy as np

    stage_dir = StageDir(out)
    array = stage_dir.weight_norms_array
    a = np.stack([np.asarray(n, dtype=np.float32) for n in per_epoch]) if per_epoch else np.zeros((0, 0), np.float32)
    buf = io.BytesIO()
    np.save(buf, a)
    write_bytes_atomic(array, buf.getvalue())
    summary = [{"min": round(float(r.min()), 6), "median": round(float(np.median(r)), 6), "max": round(float(r.max()), 6)}
               for r in a]
    write_json_atomic(stage_dir.weight_norms, {"class_counts": class_counts, "per_epoch_file": array.name,
                                               "shape": list(a.shape), "per_epoch_summary": summary, **extra})


class CsvLog:
    """summary.csv, one row per epoch; the header is fixed by the first row (timm's summary.csv convention)."""

    def __init__(self, path: str | os.PathLike, resume: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume and self.path.exists():
            self.path.unlink()

    def write(self, row: dict) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
