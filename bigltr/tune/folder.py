"""The reader of a bigltr-tune output folder, for programs (bigltr.ablation): TuneFolder(path).result() is its
tune_result.json, .selected(phase) the phase's selected trial there, .trials(phase) the trials of that phase's study,
typed, from tune_trials.json (written with the summary since version 1 of its format), or, for a folder written
before it, from tune_summary.csv (its params column parsed back: `key=value` words, values as bigltr.tune.space
reads a categorical value, the inverse of fmt).

tune_trials.json: {"version": 1, "trials": [{"study", "trial" (number), "state" (COMPLETE, PRUNED, FAIL, RUNNING,
WAITING), "params" ({key: value} as the trainer got them), "val" ({all, many, medium, few}: float or null),
"test_all_info_only", "epochs", "wall_s", "note", "selected" (bool), "dir", "retry_of" (null or a number)}, ...]}
in the order of tune_summary.csv."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from bigltr.tune.base import GROUPS
from bigltr.tune.space import _scalar

TRIALS_FILE = "tune_trials.json"
TRIALS_VERSION = 1


@dataclass(frozen=True)
class TrialRecord:
    """One trial of a tune folder."""
    study: str
    number: int
    state: str
    params: dict = field(default_factory=dict)
    folder: Path | None = None
    wall_s: float | None = None
    val: dict = field(default_factory=dict)
    epochs: int | None = None
    note: str = ""
    selected: bool = False


def _number(v, conv):
    try:
        return None if v in (None, "") else conv(v)
    except (TypeError, ValueError):
        return None


def parse_params(text: str) -> dict:
    """tune_summary.csv's params column (`key=value ...`, the values written by fmt) as typed values."""
    return {k: _scalar(v) for k, _, v in (w.partition("=") for w in (text or "").split()) if _}


class TuneFolder:
    """A bigltr-tune output folder (out=DIR). The methods raise OSError when a file is missing or unreadable and
    ValueError when it is damaged."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def result(self) -> dict:
        """tune_result.json (selected trials per phase, stage1_checkpoint, the refit command, plots)."""
        out = json.loads((self.path / "tune_result.json").read_text())
        if not isinstance(out, dict):
            raise ValueError(f"{self.path / 'tune_result.json'}: not a JSON object")
        return out

    def selected(self, phase: int) -> dict | None:
        """The phase's selected trial in tune_result.json (study, trial, params, val, dir, ...), None if none."""
        return self.result().get(f"phase{phase}") or None

    def trials(self, phase: int | None = None, study: str | None = None) -> list[TrialRecord]:
        """The trials of the study selected for `phase` in tune_result.json ([] when the phase has none), of the
        study named `study`, or (neither given) all of them."""
        if phase is not None:
            sel = self.selected(phase)
            if not sel:
                return []
            study = sel.get("study")
            if study is None:
                return []
        return [t for t in self._all() if study is None or t.study == study]

    def _all(self) -> list[TrialRecord]:
        f = self.path / TRIALS_FILE
        if f.is_file():
            data = json.loads(f.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("trials"), list):
                raise ValueError(f"{f}: not a bigltr-tune trial list")
            return [TrialRecord(study=r["study"], number=int(r["trial"]), state=r["state"],
                                params=dict(r.get("params") or {}),
                                folder=Path(r["dir"]) if r.get("dir") else None,
                                wall_s=_number(r.get("wall_s"), float), val=dict(r.get("val") or {}),
                                epochs=_number(r.get("epochs"), int), note=r.get("note") or "",
                                selected=bool(r.get("selected"))) for r in data["trials"]]
        with open(self.path / "tune_summary.csv", newline="") as fh:  # a folder written before tune_trials.json
            rows = list(csv.DictReader(fh))
        return [TrialRecord(study=r.get("study") or "", number=_number(r.get("trial"), int), state=r.get("state") or "",
                            params=parse_params(r.get("params") or ""),
                            folder=Path(r["dir"]) if r.get("dir") else None,
                            wall_s=_number(r.get("wall_s"), float),
                            val={g: _number(r.get(f"val_{g}"), float) for g in GROUPS},
                            epochs=_number(r.get("epochs"), int), note=r.get("note") or "",
                            selected=r.get("selected") == "yes") for r in rows]
