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
 12 LWS                          stage 2 from row 2: stage 1's classifier frozen, one scale per class trained with
                                 CE on class-balanced sampling (Kang et al.)
Row 11 needs a feature dimension >= classes - 1 (a simplex ETF): with a narrower backbone it is reported as "not
applicable" (checked before any row trains) and the other rows run.
Stage 2 uses cached backbone features (one disk cache shared by rows 5-7) unless --online is given (then every
stage-2 row runs the frozen backbone on the augmented images; cRT and LWS draw them class-balanced). A run whose
results.json is already complete is reused (an interrupted ablation resumes). Writes ablation.md, ablation.csv and
ablation.png in `out`.

Each row also says what reaching it cost, in CPU-hours (GPU-hours on GPU: wall seconds x processes / 3600), read
from the files (a reused row keeps its original cost): train (the row's own run: results.json wall_time_s x
world_size), stage 1 (the stage-1 run a post-hoc or stage-2 row starts from, shared by those rows and shown in each),
tune (the tau sweep, posthoc*.json's wall_s; the trials of the study its values came from, tune_trials.json's wall_s)
and total (their sum, a run counted once). The tuning of the stage-1 row a stage-2 row starts from is in that row's
tune, not repeated.

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
import difflib
import json
import sys
from pathlib import Path

from bigltr.ablation_cost import Row, posthoc_cost, study_cost
from bigltr.ablation_reuse import run_or_reuse, study_budget, study_trial, tuned_overrides
from bigltr.ablation_table import GROUPS, data_name, write_outputs

# --baselines rows that --skip can leave out, by the name of their run folder / sweep
SKIPPABLE = ("posthoc_la", "balanced_softmax", "crt", "one_stage_wb", "lws")
TAUS = [round(0.1 * i, 1) for i in range(0, 21)]  # tau-norm grid searched on validation (0 = plain classifier)


def one_stage_problem(argv: list[str]) -> str | None:
    """Why the one-stage WB row cannot run with `argv`'s model on its data (a simplex-ETF classifier needs a feature
    dimension >= classes - 1; bigltr.models.check_etf_fits, the trainer's own start-up check): the row's short
    "not applicable (...)" after printing the trainer's full message; None when it can run (or _info.json is not
    readable: row 1's trainer then says why)."""
    from bigltr.config import ConfigError, build_config
    from bigltr.models import check_etf_fits, feature_dim

    cfg = build_config(argv + ["stage1.classifier=etf", "stage=1"])
    try:
        num_classes = len(json.loads((Path(cfg.data.root) / "_info.json").read_text())["class_counts"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        check_etf_fits(cfg, num_classes)
    except ConfigError as e:
        print(f"[ablation] {e}")
        return (f"not applicable ({cfg.model.name} has {feature_dim(cfg.model.name, cfg.data.in_chans)}-dim "
                f"features; a simplex ETF of {num_classes} classes needs >= {num_classes - 1})")
    return None


def posthoc_rows(argv: list[str], checkpoint: Path, method: str = "tau_norm") -> dict:
    """Post-hoc classifiers of a stage-1 model (bigltr.evaluate.tau_sweep: tau_norm, la or mla) over the TAUS grid,
    tau picked by validation accuracy; for tau_norm also the L2-normalised classifier (tau 1). "wall_s": the sweep's
    seconds (one process; the rows' tuning cost)."""
    import time

    from bigltr.config import build_config
    from bigltr.distributed import resolve_device
    from bigltr.evaluate import tau_sweep

    cfg, t0 = build_config(argv), time.perf_counter()
    out = tau_sweep(cfg, checkpoint, TAUS, ("val", "test"), method=method)
    wall_s = time.perf_counter() - t0
    best_tau = max(TAUS, key=lambda t: out["val"][t]["all"])
    pick = lambda t: {s: out[s][t] for s in ("val", "test")}  # noqa: E731
    return {"l2": pick(1.0), "tau": pick(best_tau), "best_tau": best_tau,
            "tau_curve_val": {t: out["val"][t]["all"] for t in TAUS},
            "wall_s": round(wall_s, 2), "world_size": 1, "device": resolve_device(cfg.device).type}


def cached_posthoc(path: Path, argv: list[str], checkpoint: Path, method: str, own: bool = False) -> dict:
    """posthoc_rows, kept in `path` (an interrupted or repeated ablation does not sweep again, and still reports the
    sweep's time); its "l2" and "tau" rows as Rows with their cost (posthoc_cost; `own`: the checkpoint's run is the
    row's own training)."""
    if path.is_file():
        ph = json.loads(path.read_text())
    else:
        ph = posthoc_rows(argv, checkpoint, method)
        path.write_text(json.dumps(ph, indent=1))
    cost = posthoc_cost(ph, checkpoint, own)
    return {**ph, **{k: Row(ph[k], cost) for k in ("l2", "tau") if k in ph}}


def main(argv=None) -> list[tuple[str, dict]]:
    """Runs (or reuses) the seven rows; returns them as (row name, {"val": metrics, "test": metrics})."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--online", action="store_true",
                    help="stage 2 with online backbone features (augmented images every epoch; cRT / LWS: "
                         "class-balanced draws of single images)")
    ap.add_argument("--tuned", metavar="DIR", help="take rows 2 and 5-7 from a bigltr-tune output (tune_result.json)")
    ap.add_argument("--baselines", action="store_true",
                    help="also rows 8-12: post-hoc LA, LA loss / balanced softmax, cRT, one-stage WB, LWS "
                         "(docs/baselines.md)")
    ap.add_argument("--skip", metavar="ROW[,ROW]", default="",
                    help=f"with --baselines, leave these baseline rows out (not trained, not in the table): "
                         f"{', '.join(SKIPPABLE)}")
    ap.add_argument("--tuned-row5", metavar="DIR", help="row 5 from a phase-2 study tuned with MaxNorm off")
    ap.add_argument("--tuned-row6", metavar="DIR", help="row 6 from a phase-2 study tuned with stage-2 WD 0")
    ap.add_argument("--tuned-row7", metavar="DIR", help="row 7 from a phase-2 study of its own (stage-2 WD and radius)")
    ap.add_argument("--no-train", action="store_true",
                    help="only assemble the table from finished runs (studies' trials, earlier rows); a missing row "
                         "is an error naming it (the post-hoc rows 3-4 are still computed)")
    args, rest = ap.parse_known_args(argv)
    skip = {r.strip() for r in args.skip.split(",") if r.strip()}
    for r in sorted(skip - set(SKIPPABLE)):
        close = difflib.get_close_matches(r, SKIPPABLE, n=1)
        ap.error(f"--skip: unknown row {r!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                 + f"; rows: {', '.join(SKIPPABLE)}")
    if skip and not args.baselines:
        ap.error("--skip names --baselines rows: add --baselines")
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
    one_stage_na = (one_stage_problem(overrides + tuned[2]) if args.baselines and "one_stage_wb" not in skip
                    else None)  # before any row trains
    if one_stage_na:
        print(f"[ablation] one-stage WB row: {one_stage_na}; skipped, the other rows run")
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
    studies = {1: study_cost(args.tuned, 1), 4: study_cost(args.tuned_row5, 2), 5: study_cost(args.tuned_row6, 2),
               6: study_cost(args.tuned_row7 or args.tuned, 2)} if args.tuned else {}  # the cost columns' tune
    if args.baselines:
        tuning = tuning or {3: f"tau: best of {len(TAUS)} on val"}
        if skip:
            print(f"[ablation] --skip: rows {', '.join(sorted(skip))} left out")
        # cRT and LWS: stage 2 with CE on class-balanced sampling, no WD, no MaxNorm (they differ in the classifier)
        balanced2 = overrides + s2 + [f"stage1_checkpoint={ckpt}", "stage2.loss=ce", "stage2.sampler=class_balanced",
                                      "stage2.maxnorm.when=off", "stage2.weight_decay=0"]
        if "posthoc_la" not in skip:
            la = cached_posthoc(out / "posthoc_la.json", s1, ckpt, "la")
            rows.append((f"+ post-hoc logit adjustment (tau={la['best_tau']}, on val)", la["tau"]))
            tuning[len(rows) - 1] = f"tau: best of {len(TAUS)} on val"
        if "balanced_softmax" not in skip:
            rows.append(("LA loss = balanced softmax (stage 1)",
                         run_or_reuse(train, out / "s1_balanced_softmax", "1",
                                      s1 + ["stage1.loss=balanced_softmax"])[1]))
        if "crt" not in skip:
            rows.append(("cRT (stage 2: reinit, CE, class-balanced sampling)",
                         run_or_reuse(train, out / "s2_crt", "2", balanced2 + ["stage2.classifier_init=reinit"])[1]))
        if "one_stage_wb" in skip:
            pass  # left out by the user: no row
        elif one_stage_na:  # found before any row trained: a row without numbers, named with the reason
            rows.append((f"one-stage WB: {one_stage_na}", Row({k: dict.fromkeys(GROUPS) for k in ("val", "test")},
                                                              {"train_h": 0, "stage1_h": 0, "tune_h": 0})))
        else:
            wd_one = wd1 or 5e-3
            one_argv = s1 + ["stage1.classifier=etf", "stage1.feature_reg=0.01", f"stage1.weight_decay={wd_one:g}",
                             "stage=1"]
            one_run, _ = run_or_reuse(train, out / "s1_one_stage_wb", "1", one_argv)
            mla = cached_posthoc(out / "posthoc_mla.json", one_argv, RunDir(one_run).best(1), "mla", own=True)
            rows.append((f"one-stage WB (ETF + feature reg 0.01 + WD {wd_one:g}, MLA tau={mla['best_tau']} on val)",
                         mla["tau"]))
            tuning[len(rows) - 1] = f"tau: best of {len(TAUS)} on val"
        if "lws" not in skip:
            rows.append(("LWS (scales on class-balanced sampling)",
                         run_or_reuse(train, out / "s2_lws", "2", balanced2 + ["stage2.classifier=lws"])[1]))
    left_out = f"; rows left out (--skip): {', '.join(sorted(skip))}" if skip else ""
    table = write_outputs(rows, out, f"Ablation on {data_name(cfg.data.root)}, recipe {cfg.recipe} (balanced top-1 %, "
                                     f"best epoch on validation{left_out})", tuning, studies)
    print("\n" + table)
    return rows


def console_main() -> int:
    """The ``bigltr-ablation`` console script (its exit status: 0, or SystemExit's; main() returns the rows)."""
    main()
    return 0


if __name__ == "__main__":
    main()
