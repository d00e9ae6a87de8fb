"""bigltr-tune: the paper's hyper-parameter tuning as an Optuna study (the command's help: bigltr.tune.cli;
documentation: docs/tuning.md; the modules and their import order: docs/architecture.md).

Modules, leaf first (each imports only those before it): base (constants, errors, log, fmt), space (--space, Param),
folder (TuneFolder: the reader of a tune folder), study (Tune, storage, journal check, sampler, pruner, studies),
trial (a trial's process, PDEATHSIG, pruning watch, results), recovery (stale and orphaned trials, retry), report
(summary, tune_trials.json, tune_result.json, plots), worker (trials, phases, workers, exit status), cli (argparse,
make_tune, main). This package re-exports the public names of the former single module bigltr/tune.py (__all__;
report() is bigltr.tune.report.report). Whether a pid is alive: bigltr.procs.pid_alive.
"""
from __future__ import annotations

import sys
import types

from bigltr.results import read_epochs
from bigltr.tune import base, cli, folder, recovery, report, space, study, trial, worker
from bigltr.tune.base import (COUNTED, EX_STOPPED, EX_UNFINISHED, EXIT_MEANING, GROUPS, HOST, OWNED, RADIUS, ROOT,
                              S1_WD, S2_WD, JournalError, TuneError, fmt, log, set_log_prefix)
from bigltr.tune.cli import build_parser, main, make_tune, validate
from bigltr.tune.folder import TrialRecord, TuneFolder
from bigltr.tune.recovery import fail_stale, record_finished, retire, stop_orphan
from bigltr.tune.report import final_command, plot_study, studies, summary_rows, write_tables
from bigltr.tune.space import Param, default_space, parse_param
from bigltr.tune.study import (GridSampler, Tune, best_trial, check_journal, counted, enqueue_grid, make_pruner,
                               make_sampler, open_study, phase2_name, phase_study, study_trials, trial_dir)
from bigltr.tune.trial import PR_SET_PDEATHSIG, die_with_parent, run_trial, stderr_tail, trial_results
from bigltr.tune.worker import STOP_SIGNALS, one_trial, run_study, run_worker, same_as_complete, study_finished, \
    work_phase

__all__ = [
    "COUNTED", "EX_STOPPED", "EX_UNFINISHED", "EXIT_MEANING", "GROUPS", "HOST", "OWNED", "RADIUS", "ROOT", "S1_WD",
    "S2_WD", "JournalError", "TuneError", "fmt", "log", "set_log_prefix", "build_parser", "main", "make_tune",
    "validate", "TrialRecord", "TuneFolder", "fail_stale", "record_finished", "retire", "stop_orphan",
    "final_command", "plot_study", "studies", "summary_rows", "write_tables", "Param", "default_space",
    "parse_param", "GridSampler", "Tune", "best_trial", "check_journal", "counted", "enqueue_grid", "make_pruner",
    "make_sampler", "open_study", "phase2_name", "phase_study", "study_trials", "trial_dir", "PR_SET_PDEATHSIG",
    "die_with_parent", "run_trial", "stderr_tail", "trial_results", "STOP_SIGNALS", "one_trial", "run_study",
    "run_worker", "same_as_complete", "study_finished", "work_phase", "read_epochs",
]
_MODULES = (base, space, folder, study, trial, recovery, report, worker, cli)
# `report` is the module (the single module's function report() is bigltr.tune.report.report): a package attribute
# that is not its submodule of the same name would break `import bigltr.tune.report as r`


class _Package(types.ModuleType):
    """Setting a name of this package (a test's monkeypatch.setattr(tune, "trial_dir", ...)) also sets it in the
    modules of the package that hold the same object, so that it takes effect where it is called, as it did when
    bigltr.tune was one module."""

    def __setattr__(self, name: str, value) -> None:
        old = self.__dict__.get(name, _Package)
        if old is not _Package and not isinstance(old, types.ModuleType):
            for mod in _MODULES:
                if mod.__dict__.get(name, _Package) is old:
                    setattr(mod, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
