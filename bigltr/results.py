"""A run's results as the commands that look at other runs read them (bigltr-tune, bigltr-ablation, bigltr-export,
and the trainer itself on resume): one reader of `RUN/results.json`, one rule for "this stage has finished", one
reader of a growing `RUN/stageN/summary.csv`.

`results.json` is written by bigltr.engine.run (atomically, after each stage): `{"classes", "class_counts",
"world_size", "stage1": {...}, "stage2": {...}}`, a stage's entry holding its "val" and "test" metrics
(`{"all", "many", "medium", "few", ...}`). A stage has finished when its entry is there with a validation accuracy.

Foundation level (docs/architecture.md): imports only bigltr.config, so bigltr.tune can use it without torch.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from bigltr.config import ConfigError

RESULTS_NAME = "results.json"
SUMMARY_NAME = "summary.csv"


def read_results(run: str | os.PathLike) -> dict:
    """`run`/results.json as a dict; {} when the run has none yet. A file that is not readable JSON, or not a JSON
    object: ConfigError, in one line that says what to do."""
    path = Path(run) / RESULTS_NAME
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
