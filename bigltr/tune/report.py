"""The report of a tune folder: tune_summary.{csv,md} (one row per trial, for people), tune_trials.json (the same
trials, typed, for programs: bigltr.tune.folder reads it), tune_result.json (the selected trial per phase and the
refit command) and Optuna's plots."""
from __future__ import annotations

import csv
import io
import os
import shlex
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from bigltr.atomic import write_json_atomic, write_text_atomic
from bigltr.rundir import RunDir, default_out
from bigltr.tune.base import GROUPS, fmt, log
from bigltr.tune.folder import TRIALS_FILE, TRIALS_VERSION
from bigltr.tune.study import Tune, best_trial, phase2_name


def _num(v) -> str:
    # 4 decimals, the precision of the metrics: at 8,142 classes one class is worth 0.012 points of balanced accuracy
    return "" if v is None else f"{v:.4f}"


def studies(tune: Tune, storage) -> tuple[list[tuple[str, list]], dict]:
    """(study name, trials) in order, and the selected trial per phase."""
    names = optuna.get_all_study_names(storage)
    out = []
    for n in ["phase1"] + sorted(n for n in names if n.startswith("phase2")):
        if n in names:
            out.append((n, optuna.load_study(study_name=n, storage=storage).get_trials()))
    by = dict(out)
    best1 = best_trial(by.get("phase1", []))
    name2 = phase2_name(tune, best1)
    sel = {1: ("phase1", best1) if best1 else None}
    best2 = best_trial(by.get(name2, []))
    sel[2] = (name2, best2) if best2 else None
    return out, sel


def summary_rows(tune: Tune, storage) -> tuple[list[dict], dict]:
    rows, _, sel = _rows_and_records(tune, storage)
    return rows, sel


def _rows_and_records(tune: Tune, storage) -> tuple[list[dict], list[dict], dict]:
    """The summary's rows (text), the same trials as typed records (tune_trials.json), the selected trial per
    phase."""
    out, sel = studies(tune, storage)
    chosen = {(s, t.number) for s, t in filter(None, sel.values())}
    rows, records = [], []
    for name, trials in out:
        for t in trials:
            ua = t.user_attrs
            if ua.get("surplus"):
                continue
            val = ua.get("val") or {}
            note = ua.get("note") or ua.get("stale") or ""
            if ua.get("stale"):
                note += "; queued again" if ua.get("retried") else "; not retried"
            if ua.get("retry_of") is not None:
                note = f"retry of trial {ua['retry_of']}" + (f"; {note}" if note else "")
            params = ua.get("overrides") or t.params
            rows.append({"study": name, "trial": t.number, "state": t.state.name,
                         "params": " ".join(f"{k}={fmt(v)}" for k, v in params.items()),
                         **{f"val_{g}": _num(val.get(g)) for g in GROUPS},
                         "test_all_info_only": _num(ua.get("test_all")), "epochs": ua.get("epochs", ""),
                         "wall_s": ua.get("wall_s", ""), "note": note,
                         "selected": "yes" if (name, t.number) in chosen else "", "dir": ua.get("dir", "")})
            records.append({"study": name, "trial": t.number, "state": t.state.name, "params": dict(params),
                            "val": {g: val.get(g) for g in GROUPS}, "test_all_info_only": ua.get("test_all"),
                            "epochs": ua.get("epochs"), "wall_s": ua.get("wall_s"), "note": note,
                            "selected": (name, t.number) in chosen, "dir": ua.get("dir"),
                            "retry_of": ua.get("retry_of")})
    return rows, records, sel


def write_tables(tune: Tune, storage) -> tuple[list[dict], dict]:
    rows, records, sel = _rows_and_records(tune, storage)
    fields = ["study", "trial", "state", "params", *[f"val_{g}" for g in GROUPS], "test_all_info_only", "epochs",
              "wall_s", "note", "selected", "dir"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(tune.out / "tune_summary.csv", buf.getvalue())
    write_json_atomic(tune.out / TRIALS_FILE, {"version": TRIALS_VERSION, "trials": records})
    lines = [f"# bigltr-tune: recipe `{tune.recipe}`", "",
             f"Common overrides: `{shlex.join(tune.overrides) or '(none)'}`. Objective: balanced **validation** "
             "accuracy (results.json stageN.val.all); the test column is for information only. Selected trials are "
             "marked **\u2605**.", "",
             "| study | trial | state | params | val all | val many | val medium | val few | test all (info only) "
             "| epochs | wall s | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        star = " **\u2605**" if r["selected"] else ""
        lines.append(f"| {r['study']} | {r['trial']}{star} | {r['state']} | `{r['params']}` | {r['val_all']} | "
                     f"{r['val_many']} | {r['val_medium']} | {r['val_few']} | {r['test_all_info_only']} | "
                     f"{r['epochs']} | {r['wall_s']} | {r['note'].replace('|', '/')} |")
    failed = [(n, t) for n, ts in studies(tune, storage)[0] for t in ts if t.user_attrs.get("stderr_tail")]
    if failed:
        lines += ["", "## Failed trials", ""]
        for n, t in failed:
            lines += [f"{n} trial {t.number} ({t.user_attrs.get('note')}), last lines of "
                      f"`{t.user_attrs.get('dir')}/stderr.log`:", "", "```",
                      "\n".join(t.user_attrs["stderr_tail"].splitlines()[-10:]), "```", ""]
    write_text_atomic(tune.out / "tune_summary.md", "\n".join(lines) + "\n")
    return rows, sel


def _selected(tune: Tune, sel) -> dict | None:
    if sel is None:
        return None
    name, t = sel
    ua = t.user_attrs
    out = {"study": name, "trial": t.number, "params": ua.get("overrides") or t.params, "val": ua.get("val"),
           "test_all_info_only": ua.get("test_all"), "dir": ua.get("dir")}
    if name == "phase1":
        out["checkpoint"] = str(RunDir(ua.get("dir", "")).best(1))
    return out


def final_command(tune: Tune, params: dict) -> str:
    """The refit (docs/reproduce.md "Protocol"): the tuned values, trained on the whole official training set (train
    + the val held out of it, where the data holds one out), the fixed schedule, the last epoch kept."""
    return shlex.join(["python", "-m", "bigltr.train", f"recipe={tune.recipe}",
                       f"out={default_out(tune.recipe)}_refit", "protocol=refit", *tune.overrides,
                       *[f"{k}={fmt(v)}" for k, v in params.items()]])


def plot_study(study: optuna.Study, out: Path) -> list[str]:
    """Optuna's matplotlib plots of one study; a plot Optuna cannot draw is skipped with a note."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return []
    nparams = len({k for t in complete for k in t.params})
    plots = {"history": lambda: ovm.plot_optimization_history(study, target_name="val all (%)"),
             "slice": lambda: ovm.plot_slice(study, target_name="val all (%)")}
    if nparams >= 2 and len(complete) >= 4:
        plots["importance"] = lambda: ovm.plot_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(),  # fANOVA would need scikit-learn
            target_name="val all (%)")
    if any(t.intermediate_values for t in trials):
        plots["intermediate"] = lambda: ovm.plot_intermediate_values(study)
    written = []
    out.mkdir(parents=True, exist_ok=True)
    for kind, make in plots.items():
        path = out / f"{study.study_name}_{kind}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # matplotlib's notes on degenerate axes (one trial, one value)
                ax = make()
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.savefig(f"{path}.tmp.png", dpi=100, bbox_inches="tight")
            os.replace(f"{path}.tmp.png", path)
            written.append(str(path))
        except Exception as e:  # noqa: BLE001 - a plot is never worth failing the study for
            log(f"plot {path.name} skipped: {type(e).__name__}: {e}")
        finally:
            plt.close("all")
    return written


def report(tune: Tune, storage, plots: bool = True, show: bool = True) -> int:
    rows, sel = write_tables(tune, storage)
    s1, s2 = _selected(tune, sel[1]), _selected(tune, sel[2])
    params = {**((s1 or {}).get("params") or {}), **((s2 or {}).get("params") or {})}
    result = {"recipe": tune.recipe, "overrides": tune.overrides,
              "selected_on": "balanced validation accuracy (results.json stageN.val.all); test is information only",
              "phase1": s1, "phase2": s2, "stage1_checkpoint": tune.checkpoint or (s1 or {}).get("checkpoint"),
              "command": final_command(tune, params) if params else None, "plots": []}
    if plots:
        for name, _ in studies(tune, storage)[0]:
            result["plots"] += plot_study(optuna.load_study(study_name=name, storage=storage), tune.out / "plots")
    write_json_atomic(tune.out / "tune_result.json", result)
    if not show:
        return 0
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    print((tune.out / "tune_summary.md").read_text(), flush=True)
    log(f"trials: {', '.join(f'{n} {k}' for k, n in sorted(counts.items())) or 'none'}; summary "
        f"{tune.out / 'tune_summary.md'}, result {tune.out / 'tune_result.json'}")
    for ph, s in ((1, s1), (2, s2)):
        if s:
            test = s["test_all_info_only"]
            log(f"phase {ph} best: {' '.join(f'{k}={fmt(v)}' for k, v in s['params'].items())} ({s['study']} trial "
                f"{s['trial']}, val all {s['val']['all']:.4f}; test all {_num(test) or '-'}, for information only)")
    if not params:
        log("no trial finished: nothing selected")
        return 1
    if tune.checkpoint and s2:
        log(f"phase 2 tuned from {tune.checkpoint}: give the full run the stage-1 settings of that checkpoint")
    print(f"run this (the refit: tuned values, whole training set, last epoch):\n  {result['command']}", flush=True)
    return 0
