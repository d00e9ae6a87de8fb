"""The paper's ablation (Table 1 rows) on one recipe, reusing stage-1 checkpoints across rows.

    bigltr-ablation recipe=fmnist_lt out=runs/ablation [key=value ...]      (or: python tools/ablation.py ...)

Rows (as in the paper):
  1 naive CE (WD 0)              stage 1 with stage1.weight_decay=0
  2 CE + WD                      stage 1 with the recipe's weight decay
  3 + L2-normalised classifier   row 2's model, classifier rows scaled to unit norm (post hoc)
  4 + tau-norm                   row 2's model, w_c / ||w_c||^tau with tau chosen on VALIDATION
  5 + stage 2 CB & WD            stage 2 from row 2, MaxNorm off
  6 + stage 2 CB & MaxNorm       stage 2 from row 2, stage2.weight_decay=0
  7 + stage 2 CB & WD & MaxNorm  the full method
With --baselines, the standard long-tailed baselines follow on the same data, backbone and schedule
(docs/baselines.md), every tau chosen on VALIDATION:
  8 + post-hoc logit adjustment  row 2's model, logits - tau log prior (Menon et al.)
  9 LA loss / balanced softmax   stage 1 with stage1.loss=balanced_softmax (the LA loss with tau 1, Ren et al.)
 10 cRT                          stage 2 from row 2: re-initialised classifier, CE, class-balanced sampling
 11 one-stage WB                 stage 1 with a fixed simplex-ETF classifier, feature-norm penalty 0.01 and WD
                                 (stage1.weight_decay, else 5e-3), then post-hoc multiplicative LA (Hasegawa & Sato)
Stage 2 uses cached backbone features (one disk cache shared by rows 5-7) unless --online is given. A run whose
results.json is already complete is reused (an interrupted ablation resumes). Writes ablation.md, ablation.csv and
ablation.png in `out`.

With --tuned DIR (a bigltr-tune output, DIR/tune_result.json) the rows use the values tuned on validation: row 2
(and row 1, with WD 0) the phase-1 best, row 7 the phase-2 best, row 5 its values without the MaxNorm ones, row 6
without the stage-2 weight decay. --tuned-row5 DIR / --tuned-row6 DIR take rows 5 / 6 from studies tuned for that
row (MaxNorm off / WD 0), --tuned-row7 DIR row 7 from a phase-2 study of its own; docs/tuning.md has the commands.
A row whose run the studies already hold is not trained again: row 2 is the phase-1 best trial, row 1 the phase-1
trial with the same values and WD 0 (if the study ran one), rows 5-7 the studies' phase-2 best trials when they
started from row 2's checkpoint. Then only the missing rows and the post-hoc rows 3-4 are computed.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

GROUPS = ("many", "medium", "few", "all")
TAUS = [round(0.1 * i, 1) for i in range(0, 21)]  # tau-norm grid searched on validation (0 = plain classifier)


def _finished(run: Path, stage: str) -> dict | None:
    """The run's stage-`stage` results when that stage has finished (bigltr.results' rule), else None."""
    from bigltr.config import ConfigError
    from bigltr.results import finished_stage, read_results

    try:
        return finished_stage(read_results(run), stage)
    except ConfigError as e:  # a damaged results.json: one line, what to do
        raise SystemExit(f"[ablation] {e}") from None


def run_or_reuse(train, run: Path, stage: str, argv: list[str], trial: Path | None = None) -> tuple[Path, dict]:
    """(run folder, results): the finished results of `trial` (a tuning study's run, when its config is this row's)
    or of `run` (this ablation's own folder, which must hold this row's config); else train `run` (train=None:
    --no-train, an error saying which row is missing)."""
    res = _finished(trial, stage) if trial is not None else None
    why = reuse_problem(trial, argv, stage) if res is not None else None
    if res is not None and not why:
        print(f"[ablation] reusing {trial}")
        return trial, res
    if why:
        print(f"[ablation] not reusing {trial}: {why}")
    res = _finished(run, stage)
    if res is not None:
        other = reuse_problem(run, argv, stage)
        if other:
            raise SystemExit(f"[ablation] {run} holds another run ({other}): give this ablation its own out=DIR")
        print(f"[ablation] reusing {run}")
        return run, res
    if train is None:
        raise SystemExit(f"[ablation] --no-train: no finished run for {run.name}"
                         + (f" ({trial} is not it: {why})" if why else "") + f"; it would train {' '.join(argv)}")
    rc = train(argv + [f"stage={stage}", f"out={run}"])
    if rc != 0:
        raise SystemExit(f"[ablation] run {run} failed with exit code {rc}")
    res = _finished(run, stage)
    if res is None:
        raise SystemExit(f"[ablation] run {run} exited 0 but its results.json has no finished stage{stage}")
    return run, res


def _same(a: str, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a).lower() == str(b).lower()


def study_trial(d: str | None, phase: int, params: dict | None = None) -> Path | None:
    """The run folder of a finished trial in bigltr-tune output `d`: the phase's best trial, or (`params` given) the
    COMPLETE trial of the phase's study whose values are exactly `params` (bigltr.tune.TuneFolder: tune_trials.json,
    or an older folder's tune_summary.csv). None when there is none."""
    from bigltr.tune.folder import TuneFolder

    if not d:
        return None
    folder = TuneFolder(d)
    try:
        sel = folder.selected(phase)
    except (OSError, ValueError):
        return None
    if not sel:
        return None
    if params is None:
        return Path(sel["dir"]) if sel.get("dir") else None
    try:
        trials = folder.trials(phase)
    except (OSError, ValueError):
        return None
    for t in trials:
        if t.state == "COMPLETE" and t.params.keys() == params.keys() and \
                all(_same(t.params[k], v) for k, v in params.items()):
            return t.folder
    return None


def study_budget(d: str | None, phase: int) -> str:
    """What tuning the phase's study of bigltr-tune output `d` cost: its trials (by state) and their summed wall
    time (bigltr.tune.TuneFolder); "" when there is no such study."""
    from bigltr.tune.folder import TuneFolder

    if not d:
        return ""
    try:
        trials = TuneFolder(d).trials(phase)
    except (OSError, ValueError):
        return ""
    if not trials:
        return ""
    states = {st: sum(t.state == st for t in trials) for st in ("COMPLETE", "PRUNED", "FAIL")}
    wall = sum(t.wall_s or 0 for t in trials)
    extra = ", ".join(f"{n} {st.lower()}" for st, n in states.items() if n and st != "COMPLETE")
    return f"{len(trials)} trial{'s' * (len(trials) != 1)}{f' ({extra})' if extra else ''}, {wall / 60:.1f} min"


# Keys that do not change a run's numbers: where and how it ran. Everything else must be equal for a study's trial to
# stand in for an ablation row (a trial of another dataset, schedule or evaluation is never reused silently).
REUSE_IGNORED = ("recipe", "out", "resume", "stage", "device", "log_every", "ckpt_every_steps", "preempt_check_every",
                 "data.num_workers", "data.pin_memory", "stage2.cache.location", "stage2.cache.dir", "dist.", "log.")


def reuse_problem(run: Path, argv: list[str], stage: str) -> str | None:
    """Why `run` (its config.yaml) is not the stage-`stage` run that `argv` describes; None when it is. The first
    key that differs (bigltr.config.config_diff, in the config's key order) is named; the other stage's keys do not
    count, nor (for stage 1) stage1_checkpoint."""
    import yaml

    from bigltr.config import build_config, config_diff, flatten, to_dict
    from bigltr.rundir import RunDir

    try:
        saved = flatten(RunDir(run).read_config() or {})
    except (OSError, yaml.YAMLError, AttributeError) as e:
        return f"its config.yaml is unreadable ({e})"
    ignore = REUSE_IGNORED + (("stage2.", "stage1_checkpoint") if stage == "1" else ("stage1.",))
    diffs = config_diff(saved, to_dict(build_config(argv)), ignore, same=_same_setting)
    if diffs:
        key, have, want = diffs[0]
        return f"it ran with {key}={have!r}, this row needs {want!r}"
    return None


def _same_setting(key: str, have, want) -> bool:
    """Whether a run's saved value `have` of `key` is the wanted one: paths (data.root, stage1_checkpoint) that
    resolve to the same place, lists equal, anything else equal or `_same` (numbers by value, text by case)."""
    if key in ("data.root", "stage1_checkpoint"):
        return bool(have) == bool(want) and (not want or Path(have).resolve() == Path(want).resolve())
    return have == want if isinstance(want, (list, dict)) else (have == want or _same(str(have), want))


def tuned_overrides(tuned: str | None, row5: str | None = None, row6: str | None = None,
                    row7: str | None = None) -> dict[int, list[str]]:
    """key=value overrides per ablation row (2, 5, 6, 7) from bigltr-tune's tune_result.json files."""
    def load(d: str, phase: int) -> dict | None:
        from bigltr.tune.folder import TuneFolder

        try:
            sel = TuneFolder(d).selected(phase)
        except OSError as e:
            raise SystemExit(f"[ablation] {e.filename} not readable ({e.strerror}): run bigltr-tune with out={d} "
                             "first") from None
        except ValueError as e:
            raise SystemExit(f"[ablation] {d}: damaged tune_result.json ({e})") from None
        return sel["params"] if sel else None

    def kv(params: dict) -> list[str]:
        return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in params.items()]

    rows: dict[int, list[str]] = {2: [], 5: [], 6: [], 7: []}
    if tuned:
        rows[2] = kv(load(tuned, 1) or {})
        p2 = load(tuned, 2) or {}
        rows[7] = kv(p2)
        rows[5] = kv({k: v for k, v in p2.items() if not k.startswith("stage2.maxnorm.")})
        rows[6] = kv({k: v for k, v in p2.items() if k != "stage2.weight_decay"})
    for row, d in ((5, row5), (6, row6), (7, row7)):
        if d:
            params = load(d, 2)
            if params is None:
                raise SystemExit(f"[ablation] {d}/tune_result.json has no phase-2 result for row {row}")
            rows[row] = kv(params)
    return rows


def posthoc_rows(argv: list[str], checkpoint: Path, method: str = "tau_norm") -> dict:
    """Post-hoc classifiers of a stage-1 model (bigltr.evaluate.tau_sweep: tau_norm, la or mla) over the TAUS grid,
    tau picked by validation accuracy; for tau_norm also the L2-normalised classifier (tau 1)."""
    from bigltr.config import build_config
    from bigltr.evaluate import tau_sweep

    out = tau_sweep(build_config(argv), checkpoint, TAUS, ("val", "test"), method=method)
    best_tau = max(TAUS, key=lambda t: out["val"][t]["all"])
    pick = lambda t: {s: out[s][t] for s in ("val", "test")}  # noqa: E731
    return {"l2": pick(1.0), "tau": pick(best_tau), "best_tau": best_tau,
            "tau_curve_val": {t: out["val"][t]["all"] for t in TAUS}}


def cached_posthoc(path: Path, argv: list[str], checkpoint: Path, method: str) -> dict:
    """posthoc_rows, kept in `path` (an interrupted or repeated ablation does not sweep again)."""
    if path.is_file():
        return json.loads(path.read_text())
    ph = posthoc_rows(argv, checkpoint, method)
    path.write_text(json.dumps(ph, indent=1))
    return ph


def data_name(root: str) -> str:
    """The data an ablation ran on: `_info.json`'s name, and the folder's when it differs (data.root may point
    anywhere, whatever the recipe's name says)."""
    folder = Path(root).resolve().name
    try:
        name = json.loads((Path(root) / "_info.json").read_text())["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return folder
    return name if name == folder else f"{name} (in {folder}/)"


def write_outputs(rows: list[tuple[str, dict]], out: Path, title: str, tuning: dict[int, str] | None = None) -> str:
    """ablation.md / .csv / .png; `tuning`: row index -> what choosing its values on validation cost (a column)."""
    def f(v):
        return "-" if v is None else f"{v:.2f}"

    tuning = tuning or {}
    lines = [f"### {title}", "",
             "| row | val Many | val Med | val Few | val All | test Many | test Med | test Few | test All |"
             + (" tuning (on val) |" if tuning else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if tuning else "")]
    with open(out / "ablation.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["row"] + [f"{s}_{g}" for s in ("val", "test") for g in GROUPS] + ["tuning"] * bool(tuning))
        for i, (name, m) in enumerate(rows):
            vals = [m[s][g] for s in ("val", "test") for g in GROUPS]
            extra = [tuning.get(i, "")] if tuning else []
            w.writerow([name] + ["" if v is None else v for v in vals] + extra)
            lines.append(f"| {name} | " + " | ".join([f(v) for v in vals] + [e or "-" for e in extra]) + " |")
    table = "\n".join(lines)
    (out / "ablation.md").write_text(table + "\n")

    from bigltr.plots import plot_ablation

    plot_ablation([(name, m["test"]) for name, m in rows], out / "ablation.png", title, GROUPS)
    return table


def main(argv=None) -> list[tuple[str, dict]]:
    """Runs (or reuses) the seven rows; returns them as (row name, {"val": metrics, "test": metrics})."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--online", action="store_true", help="stage 2 with online backbone features")
    ap.add_argument("--tuned", metavar="DIR", help="take rows 2 and 5-7 from a bigltr-tune output (tune_result.json)")
    ap.add_argument("--baselines", action="store_true",
                    help="also rows 8-11: post-hoc LA, LA loss / balanced softmax, cRT, one-stage WB "
                         "(docs/baselines.md)")
    ap.add_argument("--tuned-row5", metavar="DIR", help="row 5 from a phase-2 study tuned with MaxNorm off")
    ap.add_argument("--tuned-row6", metavar="DIR", help="row 6 from a phase-2 study tuned with stage-2 WD 0")
    ap.add_argument("--tuned-row7", metavar="DIR", help="row 7 from a phase-2 study of its own (stage-2 WD and radius)")
    ap.add_argument("--no-train", action="store_true",
                    help="only assemble the table from finished runs (studies' trials, earlier rows); a missing row "
                         "is an error naming it (the post-hoc rows 3-4 are still computed)")
    args, rest = ap.parse_known_args(argv)
    from bigltr.config import split_override  # the key=value parser every bigltr command uses
    from bigltr.config import ConfigError

    overrides, outs = [], []
    for a in rest:
        try:
            key, value = split_override(a)
        except ConfigError as e:
            ap.error(str(e))
        if key == "out":
            outs.append(value)
        else:
            overrides.append(a)
    if not any(split_override(a)[0] == "recipe" for a in overrides):
        ap.error("recipe=NAME is required")
    out = Path(outs[0] if outs else "runs/ablation")
    out.mkdir(parents=True, exist_ok=True)

    from bigltr.config import build_config
    from bigltr.rundir import RunDir
    from bigltr.train import main as train_main
    from bigltr.tune.folder import TuneFolder

    train = None if args.no_train else train_main

    tuned = tuned_overrides(args.tuned, args.tuned_row5, args.tuned_row6, args.tuned_row7)
    cfg = build_config(overrides + tuned[2])  # fail fast on a typo, before any training
    for row in (5, 6, 7):
        build_config(overrides + tuned[row])
    wd1 = cfg.stage1.weight_decay
    wd2 = build_config(overrides + tuned[5]).stage2.weight_decay
    radius = build_config(overrides + tuned[6]).stage2.maxnorm.radius
    tag = ", tuned" if args.tuned else ""
    if wd1 == 0 and not (args.tuned or args.baselines):
        raise SystemExit("[ablation] the recipe's stage1.weight_decay is 0: row 2 (CE + WD) needs a tuned value")
    # Runs the studies already hold (validation picked them; reusing them changes no number, it saves the CPU time)
    p1 = TuneFolder(args.tuned).selected(1) if args.tuned else None
    trial2 = study_trial(args.tuned, 1)
    trial1 = study_trial(args.tuned, 1, {**p1["params"], "stage1.weight_decay": 0}) if p1 else None
    s2 = [] if args.online else ["stage2.features=cached", "stage2.cache.location=disk",
                                 f"stage2.cache.dir={out / 'feature_cache'}"]

    rows = []
    s1 = overrides + tuned[2]
    naive = run_or_reuse(train, out / "s1_naive", "1", s1 + ["stage1.weight_decay=0"], trial1)
    rows.append(("naive CE (WD 0)", naive[1]))
    # a weight decay tuned to 0 (the demo recipe's): row 2 is row 1's run
    s1_run, res2 = naive if wd1 == 0 else run_or_reuse(train, out / "s1_wd", "1", s1, trial2)
    rows.append((f"CE + WD ({wd1:g}{tag})", res2))
    ckpt = RunDir(s1_run).best(1)
    ph = cached_posthoc(out / "posthoc.json", s1, ckpt, "tau_norm")
    rows.append(("+ L2-normalised classifier", ph["l2"]))
    rows.append((f"+ tau-norm (tau={ph['best_tau']}, on val)", ph["tau"]))
    base2 = overrides + s2 + [f"stage1_checkpoint={ckpt}"]

    rows.append((f"+ stage 2 CB & WD ({wd2:g}{tag})",
                 run_or_reuse(train, out / "s2_cb_wd", "2", base2 + tuned[5] + ["stage2.maxnorm.when=off"],
                              study_trial(args.tuned_row5, 2))[1]))
    rows.append((f"+ stage 2 CB & MaxNorm{f' (radius {radius:g}{tag})' if args.tuned else ''}",
                 run_or_reuse(train, out / "s2_cb_maxnorm", "2", base2 + tuned[6] + ["stage2.weight_decay=0"],
                              study_trial(args.tuned_row6, 2))[1]))
    c7 = build_config(overrides + tuned[7]).stage2
    full = f" (WD {c7.weight_decay:g}, radius {c7.maxnorm.radius:g}{tag})" if args.tuned else ""
    rows.append((f"+ stage 2 CB & WD & MaxNorm (full){full}",
                 run_or_reuse(train, out / "s2_full", "2", base2 + tuned[7],
                              study_trial(args.tuned_row7 or args.tuned, 2))[1]))
    tuning = {1: study_budget(args.tuned, 1), 3: f"tau: best of {len(TAUS)} on val",
              4: study_budget(args.tuned_row5, 2), 5: study_budget(args.tuned_row6, 2),
              6: study_budget(args.tuned_row7 or args.tuned, 2)} if args.tuned else None
    if args.baselines:
        tuning = tuning or {3: f"tau: best of {len(TAUS)} on val"}
        la = cached_posthoc(out / "posthoc_la.json", s1, ckpt, "la")
        rows.append((f"+ post-hoc logit adjustment (tau={la['best_tau']}, on val)", la["tau"]))
        tuning[len(rows) - 1] = f"tau: best of {len(TAUS)} on val"
        rows.append(("LA loss = balanced softmax (stage 1)",
                     run_or_reuse(train, out / "s1_balanced_softmax", "1", s1 + ["stage1.loss=balanced_softmax"])[1]))
        rows.append(("cRT (stage 2: reinit, CE, class-balanced sampling)",
                     run_or_reuse(train, out / "s2_crt", "2", overrides + s2 + [
                         f"stage1_checkpoint={ckpt}", "stage2.classifier_init=reinit", "stage2.loss=ce",
                         "stage2.sampler=class_balanced", "stage2.maxnorm.when=off", "stage2.weight_decay=0"])[1]))
        wd_one = wd1 or 5e-3
        one_argv = s1 + ["stage1.classifier=etf", "stage1.feature_reg=0.01", f"stage1.weight_decay={wd_one:g}",
                         "stage=1"]
        one_run, _ = run_or_reuse(train, out / "s1_one_stage_wb", "1", one_argv)
        mla = cached_posthoc(out / "posthoc_mla.json", one_argv, RunDir(one_run).best(1), "mla")
        rows.append((f"one-stage WB (ETF + feature reg 0.01 + WD {wd_one:g}, MLA tau={mla['best_tau']} on val)",
                     mla["tau"]))
        tuning[len(rows) - 1] = f"tau: best of {len(TAUS)} on val"
    table = write_outputs(rows, out, f"Ablation on {data_name(cfg.data.root)}, recipe {cfg.recipe} (balanced top-1 %, "
                                     f"best epoch on validation)", tuning)
    print("\n" + table)
    return rows


def console_main() -> int:
    """The ``bigltr-ablation`` console script (its exit status: 0, or SystemExit's; main() returns the rows)."""
    main()
    return 0


if __name__ == "__main__":
    main()
