"""The tuner's constants, errors and log line, shared by every module of bigltr.tune (the leaf: imports no other
module of the package). Importing it quiets Optuna (warnings only, no experimental-feature notes)."""
from __future__ import annotations

import socket
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from bigltr.cli import format_value

ROOT = Path(__file__).resolve().parent.parent.parent  # the checkout (PYTHONPATH of trial and worker processes)
S1_WD, S2_WD, RADIUS = "stage1.weight_decay", "stage2.weight_decay", "stage2.maxnorm.radius"
GROUPS = ("all", "many", "medium", "few")
EX_STOPPED = 75  # a worker stopped by a signal (its trial is queued again); also the trainer's preemption exit
OWNED = {"stage": "each phase sets it (phase 1: stage=1, phase 2: stage=2)",
         "out": "each trial runs in DIR/trials/<study>/<number>",
         "resume": "trials always run with resume=auto (a retried trial continues from its checkpoint)",
         "protocol": "trials select on val (protocol=holdout); the refit on the whole training set is the command "
                     "the study prints at the end (protocol=refit)"}
EXIT_MEANING = {2: "bad input", 3: "loss became non-finite", 4: "checkpoint error"}  # bigltr.train's exit codes
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
HOST = socket.gethostname()
EX_UNFINISHED = 1  # the study did not finish (or no trial finished): rerun the same command to continue

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
optuna.logging.set_verbosity(optuna.logging.WARNING)


class TuneError(Exception):
    """A usage error; the message says what to change."""


class JournalError(TuneError):
    """The study's journal file is damaged."""


_log_prefix = "[tune]"


def set_log_prefix(prefix: str) -> None:
    """What log() starts each line with from now on in this process ("[tune w1]" in the second of several local
    workers; "[tune]" until then)."""
    global _log_prefix
    _log_prefix = prefix


def log(msg: str) -> None:
    print(f"{_log_prefix} {msg}", flush=True)


def fmt(v) -> str:
    """A value as a trainer override (the config parses it back to the same value): bigltr.cli.format_value, except
    None, which the config reads back only as `null`."""
    return "null" if v is None else format_value(v)
