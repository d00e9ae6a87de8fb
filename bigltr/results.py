"""A run's results as the commands that look at other runs read them (bigltr-tune, bigltr-ablation, bigltr-export,
and the trainer itself on resume): one reader of `RUN/results.json`, one rule for "this stage has finished", one
reader of a growing `RUN/stageN/summary.csv`.

`results.json` is written by bigltr.engine.run (atomically, after each stage): `{"classes", "class_counts",
"groups", "world_size", "device" ("cpu"/"cuda"), "stage1": {...}, "stage2": {...}}`, a stage's entry holding its "val"
and "test" metrics (`{"all", "many", "medium", "few", "per_class", ...}`) and its "wall_time_s". A stage has finished
when its entry is there with a validation accuracy. "groups": `{"many_thr", "few_thr", "many", "medium", "few"}`
(thresholds, classes per group).

Per-class data stays small at 100,000 classes: one array per quantity, rounded, never an object per class:
`"per_class": {"accuracy": [% rounded to 2 decimals, or null: no sample], "count": [evaluated samples]}`. Runs
written before held a bare list of accuracies (`"per_class": [%...]`, 4 decimals); `per_class_accuracy` and
`per_class_count` read both forms, and every consumer goes through them.

Foundation level (docs/architecture.md): imports only bigltr.config and bigltr.rundir (where the files are), so
bigltr.tune can use it without torch.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from bigltr.config import ConfigError
from bigltr.rundir import RunDir, StageDir

ACC_DECIMALS = 2  # per-class accuracy in %: the table's precision; 100k classes stay at about 0.6 MB a list
GROUPS = ("many", "medium", "few")


def read_results(run: str | os.PathLike) -> dict:
    """`run`/results.json as a dict; {} when the run has none yet. A file that is not readable JSON, or not a JSON
    object: ConfigError, in one line that says what to do."""
    path = RunDir(run).results
    if not path.exists():
        return {}
    try:
        results = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path} is not readable JSON ({e}); it is rewritten atomically, so something else "
                          f"damaged it: remove it, and resume=auto re-evaluates the finished stages from their "
                          f"checkpoints") from None
    if not isinstance(results, dict):
        raise ConfigError(f"{path} does not hold a JSON object; remove it (see above)")
    return results


def finished_stage(results: dict, stage: int | str) -> dict | None:
    """The entry of stage `stage` (1, 2, "1" or "2") in `results` (read_results) when that stage has finished (the
    entry holds its validation accuracy, val.all), else None."""
    s = results.get(f"stage{stage}")
    if isinstance(s, dict) and isinstance(s.get("val"), dict) and s["val"].get("all") is not None:
        return s
    return None


def _number(v) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def read_epochs(path: str | os.PathLike) -> list[dict]:
    """The complete rows of a (growing) summary.csv, as text: a line still being written, a row without an epoch
    number or a val_all value are skipped; a missing or unreadable file gives []."""
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    try:
        rows = list(csv.DictReader(io.StringIO("".join(lines))))
    except csv.Error:
        return []
    return [r for r in rows if str(r.get("epoch", "")).isdigit() and _number(r.get("val_all"))]


# ------------------------------------------------------------------------------------------------ per-class arrays
def pack_per_class(accuracy, count) -> dict:
    """The stored form of per-class results: `{"accuracy": [...], "count": [...]}`. `accuracy`: % per class (None
    or NaN: no sample), rounded to ACC_DECIMALS; `count`: evaluated samples per class (a list, or anything with
    .tolist())."""
    count = count.tolist() if hasattr(count, "tolist") else list(count)
    acc = accuracy.tolist() if hasattr(accuracy, "tolist") else accuracy
    if len(acc) != len(count):
        raise ValueError(f"per-class accuracy has {len(acc)} entries, count {len(count)}")
    return {"accuracy": [None if a is None or a != a else round(a, ACC_DECIMALS) for a in acc],
            "count": [int(n) for n in count]}


def _per_class(metrics: dict):
    pc = metrics.get("per_class") if isinstance(metrics, dict) else None
    if pc is None:
        raise KeyError("these metrics have no per_class entry")
    return pc


def per_class_accuracy(metrics: dict) -> list:
    """Per-class accuracy (%, None: a class without samples) of one metrics entry (e.g. results["stage1"]["test"]),
    in either form: the arrays `{"accuracy", "count"}` or the older bare list."""
    pc = _per_class(metrics)
    if isinstance(pc, dict):
        return list(pc["accuracy"])
    if isinstance(pc, list):
        return list(pc)
    raise ValueError(f"per_class is neither the array form nor a list: {type(pc).__name__}")


def per_class_count(metrics: dict) -> list[int] | None:
    """Evaluated samples per class of one metrics entry; None for the older form, which did not store them."""
    pc = _per_class(metrics)
    return [int(n) for n in pc["count"]] if isinstance(pc, dict) and "count" in pc else None


def group_sizes(class_counts, many_thr: int, few_thr: int) -> dict:
    """`{"many_thr", "few_thr", "many", "medium", "few"}`: classes per group by training count (bigltr.metrics'
    rule: Many > many_thr, Few < few_thr, Medium the rest)."""
    many = sum(1 for n in class_counts if n > many_thr)
    few = sum(1 for n in class_counts if n < few_thr)
    return {"many_thr": many_thr, "few_thr": few_thr, "many": many, "medium": len(class_counts) - many - few,
            "few": few}


def read_weight_norms(stage_dir: str | os.PathLike) -> dict | None:
    """A stage folder's weight_norms.json with "per_epoch" ([epochs][classes] row norms) filled in: from
    weight_norms.npy (the JSON's "per_epoch_file") or from the JSON itself (older runs). None when the stage wrote
    none."""
    stage_dir = StageDir(stage_dir)
    f = stage_dir.weight_norms
    if not f.is_file():
        return None
    wn = json.loads(f.read_text())
    if "per_epoch" not in wn and wn.get("per_epoch_file"):
        import numpy as np

        wn["per_epoch"] = np.load(stage_dir.path / wn["per_epoch_file"])
    return wn
