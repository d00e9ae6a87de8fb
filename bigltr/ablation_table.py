"""bigltr-ablation's outputs (bigltr.ablation): ablation.md, ablation.csv and ablation.png in `out`
(`write_outputs`, the cost columns from bigltr.ablation_cost) and the name of the data the rows ran on (`data_name`)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from bigltr.ablation_cost import cost_unit, row_costs

GROUPS = ("many", "medium", "few", "all")


def data_name(root: str) -> str:
    """The data an ablation ran on: `_info.json`'s name, and the folder's when it differs (data.root may point
    anywhere, whatever the recipe's name says)."""
    folder = Path(root).resolve().name
    try:
        name = json.loads((Path(root) / "_info.json").read_text())["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return folder
    return name if name == folder else f"{name} (in {folder}/)"


def write_outputs(rows: list[tuple[str, dict]], out: Path, title: str, tuning: dict[int, str] | None = None,
                  studies: dict[int, dict | None] | None = None) -> str:
    """ablation.md / .csv / .png; `tuning`: row index -> what choosing its values on validation cost (a column);
    `studies`: row index -> the study_cost its values came from. The cost columns (row_costs) come from the rows'
    Row.cost and `studies`, in CPU- or GPU-hours (cost_unit)."""
    def f(v):
        return "-" if v is None else f"{v:.2f}"

    def h(v):  # hours: "-" none (no such run), "?" not recorded in the run's files
        return "?" if v is None else "-" if v == 0 else f"{v:.3g}"

    tuning, studies = tuning or {}, studies or {}
    costs = [row_costs(m, studies.get(i)) for i, (_, m) in enumerate(rows)]
    unit = cost_unit(set().union(*(c["devices"] for c in costs)) if costs else set())
    cols = ("train_h", "stage1_h", "tune_h", "total_h")
    lines = [f"### {title}", "",
             "| row | val Many | val Med | val Few | val All | test Many | test Med | test Few | test All |"
             + (" tuning (on val) |" if tuning else "")
             + f" train {unit} | stage 1 {unit} | tune {unit} | total {unit} |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if tuning else "") + "---|" * 4]
    with open(out / "ablation.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["row"] + [f"{s}_{g}" for s in ("val", "test") for g in GROUPS] + ["tuning"] * bool(tuning)
                   + ["cost_unit", *cols])
        for i, (name, m) in enumerate(rows):
            vals = [m[s][g] for s in ("val", "test") for g in GROUPS]
            extra = [tuning.get(i, "")] if tuning else []
            c = [costs[i][k] for k in cols]
            w.writerow([name] + ["" if v is None else v for v in vals] + extra
                       + [unit] + ["" if v is None else round(v, 6) for v in c])
            lines.append(f"| {name} | " + " | ".join([f(v) for v in vals] + [e or "-" for e in extra]
                                                      + [h(v) for v in c]) + " |")
    lines += ["", f"Cost in {unit} (wall seconds x processes / 3600, from the runs' files): train = the row's own "
                  "training run; stage 1 = the stage-1 run a post-hoc or stage-2 row starts from; tune = choosing "
                  "its values on val (tau sweep, tuning study); total = their sum, each run once."]
    table = "\n".join(lines)
    (out / "ablation.md").write_text(table + "\n")

    from bigltr.plots import plot_ablation

    plot_ablation([(name, m["test"]) for name, m in rows], out / "ablation.png", title, GROUPS)
    return table
