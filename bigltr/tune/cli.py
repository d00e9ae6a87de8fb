"""bigltr-tune: the paper's hyper-parameter tuning (stage-1 weight decay, then stage-2 weight decay and the MaxNorm
radius) as an Optuna study, selected on the balanced VALIDATION accuracy.

    bigltr-tune recipe=NAME out=DIR [key=value ...] --trials N [--workers K] [--sampler tpe|random|grid]
                [--pruner none|median|sh|hyperband] [--phase 1|2|both] [--storage URL] [--space KEY=KIND:ARGS ...]

Phase 1 runs stage 1 only (default space: stage1.weight_decay=log:1e-5:1e-1); phase 2 runs stage 2 only from the
best phase-1 trial's stage1/best.pt (default space: stage2.weight_decay=log0:1e-4:1 and, with a relative radius,
stage2.maxnorm.radius=float:0:0.5). A trial is one ordinary training run in its own process
(`python -m bigltr.train recipe=NAME out=DIR/trials/<study>/<number> stage=N ...`); its summary.csv is read while
it runs, each epoch's val_all is reported to Optuna, and a pruned trial's process is stopped. Optuna does the
search (TPE, random or grid), the pruning decisions, the shared storage (a journal file DIR/study.journal by
default, or an RDB URL) and the plots; this module runs the trial processes and writes the summary. Phase-2 trials
get stage2.cache.dir=DIR/feature_cache unless the recipe or the command line sets one: with
stage2.features=cached and stage2.cache.location=disk, the first trial computes the frozen backbone's features
and the others from the same stage-1 checkpoint reuse them (the cache key does not involve the searched values).

Space syntax (--space, repeatable; keys under stage2. belong to phase 2, all others to phase 1; giving any key for
a phase replaces that phase's default space):
    log:LO:HI       log-uniform float             float:LO:HI[:STEP]   uniform float
    log0:LO:HI      0, or log-uniform in [LO,HI]  int:LO:HI[:STEP]     integer
    cat:A,B,...     categorical                    grid:A,B,...         the values of --sampler grid (else categorical)

Outputs in DIR: tune_summary.{csv,md}, tune_result.json (best values per phase and the command for the full run),
plots/<study>_{history,slice,importance,intermediate}.png. Documentation: docs/tuning.md.

Exit status: 0 the study finished (every budget used, nothing running or queued, a trial selected); 2 bad input (the
command, the space, a damaged journal: one line on stderr, nothing run); 75 stopped by SIGTERM/SIGINT/SIGUSR1 (the
running trials are queued again: rerun the same command); 1 the study did not finish, or no trial finished.
A trial's trainer dies with its worker (PR_SET_PDEATHSIG); a trainer that outlived its worker is stopped, or its
finished result recorded, by the next worker on the same host; a torn last journal record is removed at start.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import warnings
from pathlib import Path

import optuna

from bigltr.config import EXAMPLE, ConfigError, build_config, split_override
from bigltr.rundir import RunDir
from bigltr.tune.base import OWNED, JournalError, TuneError, fmt
from bigltr.tune.report import report
from bigltr.tune.space import default_space, parse_param
from bigltr.tune.study import Tune, check_journal
from bigltr.tune.worker import run_study


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bigltr-tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe=NAME and out=DIR (required), then overrides passed to every trial")
    s = p.add_argument_group("search")
    s.add_argument("--trials", type=int, help="trial budget per phase: COMPLETE + PRUNED + FAIL trials of the study "
                   "(a restart continues, it does not add N more); default for --sampler grid: the grid size")
    s.add_argument("--trials2", type=int, help="phase-2 budget, if different from --trials")
    s.add_argument("--phase", choices=["1", "2", "both"], default="1",
                   help="1: stage-1 search (default); 2: stage-2 search from the best phase-1 trial (or from "
                        "stage1_checkpoint=PATH); both: phase 1, then phase 2")
    s.add_argument("--space", action="append", default=[], metavar="KEY=KIND:ARGS",
                   help="a searched key (repeatable): log:LO:HI, log0:LO:HI, float:LO:HI[:STEP], int:LO:HI[:STEP], "
                        "cat:A,B, grid:A,B")
    s.add_argument("--sampler", choices=["tpe", "random", "grid"], default="tpe")
    s.add_argument("--seed", type=int, default=0, help="sampler seed (worker i uses seed + 1000 i)")
    s.add_argument("--pruner", choices=["none", "median", "sh", "hyperband"], default="none")
    s.add_argument("--prune-startup", type=int, default=5, help="median: trials finished before pruning starts")
    s.add_argument("--prune-warmup", type=int, default=0, help="median: epochs of a trial before it can be pruned")
    r = p.add_argument_group("running")
    r.add_argument("--workers", type=int, default=1, help="local worker processes sharing the study (default 1)")
    r.add_argument("--worker-only", action="store_true",
                   help="be one worker of the study (a Slurm array task: slurm/tune.sh); writes the report at the end")
    r.add_argument("--storage", help="journal file path (default DIR/study.journal) or an RDB URL (sqlite:///x.db)")
    r.add_argument("--launch", default=f"{shlex.quote(sys.executable)} -m",
                   help="prefix of a trial's command, followed by bigltr.train ARGS (default: this python -m; "
                        "e.g. 'torchrun --standalone --nproc_per_node 2 -m')")
    r.add_argument("--poll", type=float, default=10.0, help="seconds between reads of a trial's summary.csv")
    r.add_argument("--grace", type=float, default=60.0, help="seconds between SIGTERM and SIGKILL of a trial")
    r.add_argument("--heartbeat", type=float, default=60.0, help="seconds between a worker's heartbeats")
    r.add_argument("--stale-after", type=float, default=900.0,
                   help="a RUNNING trial without heartbeat for this long is failed and queued again")
    r.add_argument("--max-retry", type=int, default=3, help="times a stale or stopped trial is queued again")
    r.add_argument("--report", action="store_true", help="only write the summary, plots and result (no trial)")
    r.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    return p


def make_tune(args) -> Tune:
    pairs = []  # (key, raw value) of each key=value, read by the parser every command shares (bigltr.cli)
    for a in args.overrides:
        try:
            pairs.append(split_override(a))
        except ConfigError:
            raise TuneError(f"argument {a!r} is neither a --flag nor key=value (e.g. {EXAMPLE})") from None
    kv = dict(pairs)
    recipe, out = kv.pop("recipe", ""), kv.pop("out", "")
    if not recipe:
        raise TuneError("recipe=NAME is required (a name in recipes/ or a path)")
    if not out:
        raise TuneError("out=DIR is required (the study folder; trials go to DIR/trials/<study>/<number>)")
    phases = {"1": [1], "2": [2], "both": [1, 2]}[args.phase]
    checkpoint = kv.pop("stage1_checkpoint", "")
    if checkpoint and phases != [2]:
        raise TuneError("stage1_checkpoint=PATH goes with --phase 2 (otherwise phase 2 starts from the best "
                        "phase-1 trial)")
    for k in kv:
        if k in OWNED:
            raise TuneError(f"'{k}' cannot be overridden here: {OWNED[k]}")
    overrides = [a for a, (k, _) in zip(args.overrides, pairs) if k not in ("recipe", "out", "stage1_checkpoint")]
    try:
        cfg = build_config([f"recipe={recipe}", *overrides])
    except ConfigError as e:
        raise TuneError(f"config error: {e}") from None

    given = [parse_param(s) for s in args.space]
    spaces = {ph: [q for q in given if q.phase == ph] or default_space(ph, cfg) for ph in (1, 2)}
    for ph in phases:
        keys = [q.key for q in spaces[ph]]
        if len(set(keys)) != len(keys):
            raise TuneError(f"phase {ph}: a key is given twice in --space ({', '.join(keys)})")
        for q in spaces[ph]:
            if q.key in kv or q.key in OWNED or q.key in ("recipe", "stage1_checkpoint"):
                raise TuneError(f"'{q.key}' is searched (--space {q.spec()}): do not also set it as key=value")
            if args.sampler == "grid" and q.kind != "grid":
                raise TuneError(f"--sampler grid needs every key as grid:A,B,... (got --space {q.spec()})")
            inert = inert_knob(q.key, cfg, {p.key for p in spaces[ph]})
            if inert:
                raise TuneError(f"--space {q.spec()}: {inert}")
    for flag, v in (("--trials", args.trials), ("--trials2", args.trials2)):
        if v is not None and v < 1:  # one rule for every sampler (a grid's default is its size: leave --trials out)
            raise TuneError(f"{flag} must be >= 1 (got {v})" + (
                "; leave it out to run the whole grid" if args.sampler == "grid" else ""))
    trials = {}
    for ph in (1, 2):
        n = args.trials2 if ph == 2 and args.trials2 is not None else args.trials
        grid = math.prod(len(q.choices) for q in spaces[ph]) if args.sampler == "grid" else None
        n = min(n, grid) if n and grid else (n or grid)
        if ph in phases and not args.report and (n is None or n < 1):
            raise TuneError("--trials N (N >= 1) is required: the number of trials per phase")
        trials[ph] = n or 0
    if args.workers < 1:
        raise TuneError("--workers must be >= 1")
    out_dir = Path(out).expanduser().resolve()
    tune = Tune(recipe=recipe, out=out_dir, overrides=overrides, phases=phases,
                spaces=spaces, trials=trials, checkpoint=checkpoint,
                epochs={1: cfg.stage1.epochs, 2: cfg.stage2.epochs}, args=args,
                feature_cache="" if cfg.stage2.cache.dir else str(out_dir / "feature_cache"))
    if not args.report:
        validate(tune, cfg)
    return tune


def inert_knob(key: str, cfg, searched: set[str]) -> str | None:
    """Why searching `key` cannot move the objective (a trial's val accuracy), None when it can: a post-hoc tau is
    applied after training and not in the objective (it is chosen by a sweep of one checkpoint), the LA tau only
    counts with loss=la_ce."""
    if key.startswith("eval.posthoc"):
        return ("the objective is the stage's val accuracy without the post-hoc rule, and every trial would train "
                "again for it: choose the post-hoc tau on val with one sweep of the checkpoint "
                "(bigltr.evaluate.tau_sweep; bigltr-ablation --baselines does it), docs/tuning.md")
    stage, _, name = key.partition(".")
    if name == "la_tau" and stage in ("stage1", "stage2") and f"{stage}.loss" not in searched \
            and getattr(cfg, stage).loss != "la_ce":
        return f"{key} only acts with {stage}.loss=la_ce (this study has {stage}.loss={getattr(cfg, stage).loss})"
    return None


def validate(tune: Tune, cfg) -> None:
    """Every key and every range end of each phase's space goes through the config before anything runs, and every
    searched key through Optuna's suggest (in memory), so no trial of the study can fail on its space."""
    placeholder = tune.checkpoint or str(RunDir(tune.trial_folder("phase1", 0)).best(1))
    for ph in tune.phases:
        space = tune.spaces[ph]
        for q in space:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    q.suggest(optuna.create_study(direction="maximize").ask())
            except ValueError as e:
                raise TuneError(f"--space {q.spec()}: {e}") from None
        first = {q.key: q.examples()[0] for q in space}
        checks = [first] + [{**first, q.key: v} for q in space for v in q.examples()[1:]]
        for values in checks:
            try:
                build_config(tune.trial_argv(ph, tune.trial_folder("check", 0), values, placeholder))
            except ConfigError as e:
                raise TuneError(f"config error in phase {ph} (" + " ".join(f"{k}={fmt(v)}" for k, v in values.items())
                                + f"): {e}") from None
    if tune.checkpoint and not Path(tune.checkpoint).is_file():
        raise TuneError(f"stage1_checkpoint {tune.checkpoint} does not exist")
    if not (Path(cfg.data.root) / "_info.json").is_file():
        raise TuneError(f"data.root {cfg.data.root} has no _info.json (make shards with tools/make_shards.py); "
                        "every trial would fail")


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 the study finished (its budget used, nothing running or queued, a trial selected); 2 bad
    input (a usage error, a damaged journal); 75 stopped by SIGTERM/SIGINT/SIGUSR1 (trials queued again); 1 the
    study did not finish or no trial finished (rerun the same command to continue)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_intermixed_args(argv)
    try:
        return _main(args, argv)
    except TuneError as e:
        print(f"bigltr-tune: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # the journal was damaged while this command ran: say where, in one line
        path = _journal_of(args)
        try:
            if path is not None:
                check_journal(path)
        except JournalError as je:
            print(f"bigltr-tune: error: {je}", file=sys.stderr)
            return 2
        raise e


def _journal_of(args) -> Path | None:
    try:
        return make_tune(args).journal_path()
    except TuneError:
        return None


def _main(args, argv: list[str]) -> int:
    tune = make_tune(args)
    journal = tune.journal_path()
    if journal is not None:
        check_journal(journal)
    tune.out.mkdir(parents=True, exist_ok=True)
    tune.storage_obj = tune.storage()
    if args.report:
        return report(tune, tune.storage_obj)
    return run_study(tune, args, argv)
