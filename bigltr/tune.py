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
import csv
import hashlib
import io
import itertools
import json
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from bigltr.atomic import write_json_atomic, write_text_atomic
from bigltr.config import EXAMPLE, ConfigError, build_config, split_override
from bigltr.results import finished_stage, read_epochs, read_results

ROOT = Path(__file__).resolve().parent.parent
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

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
optuna.logging.set_verbosity(optuna.logging.WARNING)


class TuneError(Exception):
    """A usage error; the message says what to change."""


LOG_PREFIX = ["[tune]"]  # "[tune w1]" in the second of several local workers


def log(msg: str) -> None:
    print(f"{LOG_PREFIX[0]} {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- search space
def _scalar(text: str):
    """A categorical value: int, float, true/false/null, else the string itself."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None}.get(text.lower(), text)


def fmt(v) -> str:
    """A value as a trainer override (the config parses it back to the same value)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return "null" if v is None else str(v)


@dataclass
class Param:
    key: str
    kind: str  # log, log0, float, int, cat, grid
    lo: float = 0.0
    hi: float = 0.0
    step: float | None = None
    choices: list = field(default_factory=list)

    @property
    def phase(self) -> int:
        return 2 if self.key.startswith("stage2.") else 1

    def spec(self) -> str:
        if self.kind in ("cat", "grid"):
            return f"{self.key}={self.kind}:{','.join(fmt(c) for c in self.choices)}"
        return f"{self.key}={self.kind}:{self.lo:g}:{self.hi:g}" + (f":{self.step:g}" if self.step else "")

    def suggest(self, trial: optuna.Trial):
        """The value for the trainer (continuous floats rounded to 4 significant digits, for readable commands)."""
        if self.kind in ("cat", "grid"):
            return trial.suggest_categorical(self.key, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.lo), int(self.hi), step=int(self.step or 1))
        if self.kind == "log0" and trial.suggest_categorical(f"{self.key} is 0", [False, True]):
            return 0.0
        v = trial.suggest_float(self.key, self.lo, self.hi, log=self.kind != "float", step=self.step)
        return float(f"{v:.4g}")

    def examples(self) -> list:
        """Values that check the key and range against the config before anything runs."""
        if self.kind in ("cat", "grid"):
            return list(self.choices)
        ex = [int(self.lo), int(self.hi)] if self.kind == "int" else [self.lo, self.hi]
        return ([0.0] if self.kind == "log0" else []) + ex


def parse_param(text: str) -> Param:
    usage = ("expected KEY=KIND:ARGS, e.g. stage1.weight_decay=log:1e-5:1e-1, stage2.maxnorm.radius=float:0:0.5, "
             "stage1.wd_scope=cat:all,no_norm_bias or stage1.weight_decay=grid:1e-4,1e-3,5e-3")
    key, _, rest = text.partition("=")
    kind, _, args = rest.partition(":")
    key = key.strip()
    if not key or not args:
        raise TuneError(f"--space {text!r}: {usage}")
    if kind in ("cat", "grid"):
        items = [a.strip() for a in args.split(",")]
        if "" in items:
            raise TuneError(f"--space {text!r}: empty value in the list")
        return Param(key, kind, choices=list(dict.fromkeys(_scalar(a) for a in items)))
    if kind not in ("log", "log0", "float", "int"):
        raise TuneError(f"--space {text!r}: unknown kind {kind!r} (log, log0, float, int, cat, grid)")
    try:
        nums = [float(a) for a in args.split(":")]
    except ValueError:
        raise TuneError(f"--space {text!r}: bounds must be numbers; {usage}") from None
    if len(nums) not in (2, 3) or (kind.startswith("log") and len(nums) != 2):
        raise TuneError(f"--space {text!r}: {kind} takes LO:HI" + ("" if kind.startswith("log") else "[:STEP]"))
    lo, hi = nums[:2]
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi) or (kind.startswith("log") and lo <= 0):
        raise TuneError(f"--space {text!r}: need LO < HI" + (" and LO > 0 (log scale)" if kind.startswith("log")
                                                            else ""))
    if kind == "int" and not (lo.is_integer() and hi.is_integer()):
        raise TuneError(f"--space {text!r}: int bounds must be integers")
    step = nums[2] if len(nums) == 3 else None
    if step is not None:
        if not (math.isfinite(step) and 0 < step <= hi - lo):
            raise TuneError(f"--space {text!r}: need 0 < STEP <= HI - LO")
        if kind == "int" and not step.is_integer():
            raise TuneError(f"--space {text!r}: an int STEP must be an integer")
    return Param(key, kind, lo, hi, step)


def default_space(phase: int, cfg) -> list[Param]:
    if phase == 1:
        return [parse_param(f"{S1_WD}=log:1e-5:1e-1")]
    space = [parse_param(f"{S2_WD}=log0:1e-4:1")]
    if cfg.stage2.maxnorm.radius_mode == "relative":  # an absolute radius depends on the model: give its range
        space.append(parse_param(f"{RADIUS}=float:0:0.5"))
    return space


# ----------------------------------------------------------------------------------------------- the tuning job
@dataclass
class Tune:
    recipe: str
    out: Path
    overrides: list[str]  # key=value for every trial
    phases: list[int]
    spaces: dict[int, list[Param]]
    trials: dict[int, int]  # phase -> trial budget (COMPLETE + PRUNED + FAIL, retried trials not counted)
    checkpoint: str  # stage1_checkpoint given by the user (phase 2 only); "" = the best phase-1 trial's
    epochs: dict[int, int]
    args: argparse.Namespace
    storage_obj: object = None  # the opened storage (one per process)
    # stage2.cache.dir of every phase-2 trial when the user set none: one feature cache per study folder, so trials
    # from the same stage-1 checkpoint compute the backbone features once (with stage2.features=cached, location=disk)
    feature_cache: str = ""

    def trial_argv(self, phase: int, trial_dir: Path, values: dict, checkpoint: str = "") -> list[str]:
        # no plots in a trial (half of a short trial's time at 8,142 classes) unless the overrides ask for them
        argv = [f"recipe={self.recipe}", "log.plots=false", *self.overrides]
        argv += [f"out={trial_dir}", f"stage={phase}", "resume=auto"]
        if phase == 2:
            argv.append(f"stage1_checkpoint={checkpoint}")
            if self.feature_cache:
                argv.append(f"stage2.cache.dir={self.feature_cache}")
        return argv + [f"{k}={fmt(v)}" for k, v in values.items()]

    def journal_path(self) -> Path | None:
        """The journal file of the study (None with an RDB URL)."""
        url = self.args.storage
        if url and "://" in url:
            return None
        return Path(url).expanduser() if url else self.out / "study.journal"

    def storage(self):
        path = self.journal_path()
        if path is None:  # an RDB URL (sqlite:///..., postgresql://...)
            return optuna.storages.RDBStorage(self.args.storage)
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))

    def trial_id(self, study_name: str, number: int) -> int:
        """The storage's id of a trial (Optuna's public storage API), to update a trial this process did not ask."""
        s = self.storage_obj
        return s.get_trial_id_from_study_id_trial_number(s.get_study_id_from_name(study_name), number)


def phase2_name(tune: Tune, best1: optuna.trial.FrozenTrial | None) -> str | None:
    """Phase-2 studies are named after the checkpoint they start from, so a phase 1 extended later never mixes
    stage-2 results from different backbones."""
    if tune.checkpoint:
        return "phase2_from_ckpt_" + hashlib.sha1(str(Path(tune.checkpoint).resolve()).encode()).hexdigest()[:8]
    return None if best1 is None else f"phase2_from_p1t{best1.number}"


def trial_dir(tune: Tune, study_name: str, t) -> Path:
    """A retried trial runs in the folder of the trial it retries (and resumes from its checkpoint)."""
    return tune.out / "trials" / study_name / str(t.user_attrs.get("retry_of", t.number))


def best_trial(trials) -> optuna.trial.FrozenTrial | None:
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    return max(done, key=lambda t: t.value, default=None)  # ties: the lowest trial number


def counted(t) -> bool:
    return t.state in COUNTED and not t.user_attrs.get("retried") and not t.user_attrs.get("surplus")


class GridSampler(optuna.samplers.GridSampler):
    def after_trial(self, *args) -> None:
        """Optuna's GridSampler calls study.stop() when the grid is used up, which works only inside
        study.optimize; here the budget (the grid size) ends the study."""


def make_sampler(tune: Tune, phase: int, worker: int, restart: int = 0):
    name, seed = tune.args.sampler, tune.args.seed
    # workers must not propose the same points, nor a restarted worker the points of its first run (`restart`: the
    # number of trials the study already holds)
    seed = None if seed is None else seed + 1000 * worker + 100003 * restart
    if name == "grid":
        return GridSampler({p.key: p.choices for p in tune.spaces[phase]}, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = max(2, min(10, tune.trials[phase] // 4))  # random proposals before TPE's model takes over
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, group=True,
                                          constant_liar=True)


def make_pruner(tune: Tune, phase: int):
    a = tune.args
    if a.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=a.prune_startup, n_warmup_steps=a.prune_warmup)
    if a.pruner == "sh":
        return optuna.pruners.SuccessiveHalvingPruner()
    if a.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=tune.epochs[phase])
    return optuna.pruners.NopPruner()


def open_study(tune: Tune, storage, name: str, phase: int, worker: int = 0) -> optuna.Study:
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True,
                                sampler=make_sampler(tune, phase, worker), pruner=make_pruner(tune, phase))
    if study.trials:  # a restarted study: a sampler seeded as before would propose the same points again
        study.sampler = make_sampler(tune, phase, worker, restart=len(study.trials))
    return study


def enqueue_grid(tune: Tune, study: optuna.Study, phase: int) -> int:
    """--sampler grid: queue every grid point the study does not hold yet (no trial, finished, running or waiting,
    has its values), as many as the budget leaves room for. Workers pop WAITING trials atomically, so each point
    runs once (Optuna's GridSampler alone lets concurrent workers draw the same point). Called by the first process
    and again by every worker (a restart queues only the missing points); a lock file next to the study makes the
    check-and-enqueue one step when several processes do it at once. Returns the number of points queued."""
    if tune.args.sampler != "grid":
        return 0
    space = tune.spaces[phase]
    points = [dict(zip([q.key for q in space], combo)) for combo in itertools.product(*(q.choices for q in space))]
    lock = optuna.storages.journal.JournalFileOpenLock(str(tune.out / f"{study.study_name}.grid"), grace_period=60)
    lock.acquire()
    try:
        trials = study.get_trials(deepcopy=False)
        held = [{**t.params, **t.system_attrs.get("fixed_params", {})} for t in trials]
        missing = [pt for pt in points if pt not in held]  # the keys Param.suggest asks: suggest_categorical(key)
        room = tune.trials[phase] - sum(map(counted, trials)) - sum(t.state == TrialState.WAITING for t in trials)
        if 0 < room < len(missing):  # --trials below the grid size: a random subset (seeded), in grid order
            missing = [missing[i] for i in sorted(random.Random(tune.args.seed).sample(range(len(missing)), room))]
        for pt in missing[:max(room, 0)]:
            study.enqueue_trial(pt, skip_if_exists=True)
    finally:
        lock.release()
    n = min(len(missing), max(room, 0))
    if n:
        log(f"{study.study_name}: {n} grid point(s) queued")
    return n


# ----------------------------------------------------------------------------------------------- stale trials
HOST = socket.gethostname()
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _stat(pid) -> list[str] | None:
    """/proc/<pid>/stat after the command name: [state, ppid, pgrp, ...] (field N of proc(5) is item N - 3)."""
    try:
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError, ValueError):
        return None


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    st = _stat(pid)  # an unreaped (zombie) process is dead too
    return st is None or st[0] != "Z"


def _start_time(pid) -> int | None:
    """A process's start time (clock ticks after boot): with the pid, it names one process (pids are reused)."""
    st = _stat(pid)
    return int(st[19]) if st else None


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is in process group `pgid`."""
    if not Path("/proc/self/stat").is_file():  # not Linux: no way to tell zombies apart
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _stat(d.name)
            if st and st[2] == str(pgid) and st[0] != "Z":
                return True
    return False


def die_with_parent(sig: int = signal.SIGTERM):
    """A preexec_fn that makes the child get `sig` when this process dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG; it survives exec). The signal comes when the *thread* that started the child ends: bigltr-tune
    starts trainers and workers from its main thread only. None where prctl is not available (then a stale trial's
    process group is stopped by the next worker on this host, fail_stale)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent:  # the parent died before prctl: nobody would send the signal any more
            os.kill(os.getpid(), sig)

    return preexec


def retire(tune: Tune, study: optuna.Study, t, reason: str, clean: bool = False) -> bool:
    """Fail a trial that will not finish (worker gone or stopped) and queue its parameters again (same folder, so
    the retry resumes from the trial's last checkpoint), unless it was already retried --max-retry times. A clean
    stop (a signal: preemption, time limit) is always queued again and does not count as an attempt. `t`: a live
    or frozen trial."""
    attempt = int(t.user_attrs.get("attempt", 1))
    retry = clean or attempt <= tune.args.max_retry
    storage, tid = tune.storage_obj, tune.trial_id(study.study_name, t.number)
    try:
        storage.set_trial_user_attr(tid, "stale", reason)
        storage.set_trial_user_attr(tid, "retried", retry)
        if not storage.set_trial_state_values(tid, TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # another worker got there first
    if retry:
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.user_attrs.get("retry_of", t.number),
                                                  "attempt": attempt + (0 if clean else 1)})
    log(f"{study.study_name} trial {t.number}: {reason}; "
        + ("queued again" if retry else f"not retried (already tried {attempt} times)"))
    return True


def stop_orphan(tune: Tune, study_name: str, t) -> None:
    """A RUNNING trial's worker on this host is gone: stop the trainer's process group if it outlived the worker
    (a launcher's grandchildren, or a system without PR_SET_PDEATHSIG), as the worker would have: SIGTERM (the
    trainer writes its resume checkpoint), SIGKILL after --grace. The group is the trial's only when its leader is
    gone (a pid is not reused while its group lives) or has the start time recorded at launch."""
    pgid, start = t.user_attrs.get("trainer_pid"), t.user_attrs.get("trainer_start")
    if not isinstance(pgid, int) or not _group_alive(pgid):
        return
    now = _start_time(pgid)
    if now is not None and start is not None and now != start:
        return  # the leader's pid belongs to another process now
    grace = tune.args.grace
    log(f"{study_name} trial {t.number}: its trainer (process group {pgid}) outlived its worker: stopping it "
        f"(SIGTERM, SIGKILL after {grace:g} s)")
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while _group_alive(pgid) and time.time() < deadline:
            time.sleep(0.1)
        if not _group_alive(pgid):
            return
    log(f"{study_name} trial {t.number}: process group {pgid} is still there after SIGKILL")


def record_finished(tune: Tune, study: optuna.Study, t, phase: int, reason: str) -> bool:
    """A RUNNING trial whose worker is gone but whose trainer finished (it outlived the worker): its results.json
    is the trial's result. Records it (COMPLETE, with the per-epoch values of its summary.csv); False when the
    folder holds no finished stage."""
    d = t.user_attrs.get("dir")
    res = trial_results(Path(d), phase) if d else None
    if res is None:
        return False
    rows = read_epochs(Path(d) / f"stage{phase}" / "summary.csv")
    storage, tid = tune.storage_obj, tune.trial_id(study.study_name, t.number)
    note = f"finished after its worker stopped ({reason}): result read from its results.json"
    try:
        for r in rows:
            storage.set_trial_intermediate_value(tid, int(r["epoch"]), float(r["val_all"]))
        for k, v in (("val", {g: res["val"].get(g) for g in GROUPS}),
                     ("test_all", (res.get("test") or {}).get("all")), ("epochs", len(rows)), ("note", note)):
            storage.set_trial_user_attr(tid, k, v)
        study.tell(t.number, res["val"]["all"])
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
        return True  # another worker recorded it first
    log(f"{study.study_name} trial {t.number}: COMPLETE, val all {res['val']['all']:.4f} ({note})")
    return True


def fail_stale(study: optuna.Study, tune: Tune, phase: int) -> None:
    """RUNNING trials whose worker is gone: its process on this host has died, or its heartbeat is older than
    --stale-after (a worker on another node). Optuna's own heartbeat exists only for RDB storages. A trainer that
    outlived its worker on this host is stopped first; a trainer that finished has its result recorded; any other
    such trial is failed and queued again (retire)."""
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        ua = t.user_attrs
        beat = ua.get("heartbeat", t.datetime_start.timestamp() if t.datetime_start else now)
        here = ua.get("worker_host") == HOST
        # this process runs no trial while it checks, so its own pid on a trial is a previous, reused one
        if here and "worker_pid" in ua and (ua["worker_pid"] == os.getpid() or not _pid_alive(ua["worker_pid"])):
            reason = f"worker {HOST}:{ua['worker_pid']} is gone"
        elif now - beat > tune.args.stale_after:
            reason = f"no heartbeat from worker {ua.get('worker_host')}:{ua.get('worker_pid')} for {now - beat:.0f} s"
        else:
            continue
        if here:
            stop_orphan(tune, study.study_name, t)
        if not record_finished(tune, study, t, phase, reason):
            retire(tune, study, t, reason)


# ----------------------------------------------------------------------------------------------- one trial
def stderr_tail(path: Path, start: int = 0, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _stop_process(p: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the trial's process group (the trainer checkpoints and exits), SIGKILL after `grace` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_trial(tune: Tune, trial: optuna.Trial, cmd: list[str], d: Path, stage: int, stop: threading.Event) -> dict:
    """Run one trial process, report each epoch's val_all, stop it when pruned or when the worker is stopped."""
    a = tune.args
    d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    summary, err = d / f"stage{stage}" / "summary.csv", d / "stderr.log"
    reported: set[int] = set()
    t0 = last_beat = time.time()
    with open(d / "stdout.log", "ab") as fo, open(err, "ab") as fe:
        stamp = f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} trial {trial.number}: {shlex.join(cmd)}\n".encode()
        fo.write(stamp)
        fe.write(stamp)
        fe.flush()
        start = err.stat().st_size
        # its own process group (stopped as a whole), and SIGTERM when this worker dies, even by SIGKILL
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, start_new_session=True, preexec_fn=die_with_parent())
    outcome = None
    try:
        # who runs the trial (process group = its pid), so that a worker that finds it orphaned can stop it
        trial.set_user_attr("trainer_pid", p.pid)
        trial.set_user_attr("trainer_start", _start_time(p.pid))
        while p.poll() is None:
            stop.wait(a.poll)
            new = [r for r in read_epochs(summary) if int(r["epoch"]) not in reported]
            for r in new:
                trial.report(float(r["val_all"]), int(r["epoch"]))
                reported.add(int(r["epoch"]))
            if new and p.poll() is None and trial.should_prune():
                outcome = "pruned"
            elif stop.is_set():
                outcome = "stopped"
            if outcome:
                break
            if time.time() - last_beat > a.heartbeat:
                trial.set_user_attr("heartbeat", time.time())
                last_beat = time.time()
    finally:  # also when the worker itself fails: never leave a trial process behind
        if p.poll() is None:
            _stop_process(p, a.grace)
    if outcome is None:  # rows written between the last poll and the process's exit
        for r in read_epochs(summary):
            if int(r["epoch"]) not in reported:
                trial.report(float(r["val_all"]), int(r["epoch"]))
                reported.add(int(r["epoch"]))
    # epochs reached: those seen when the trial was stopped, else every row the finished process wrote
    rows = [r for r in read_epochs(summary) if outcome is None or int(r["epoch"]) in reported]
    last = rows[-1] if rows else {}
    return {"rc": p.returncode, "outcome": outcome, "epochs": len(rows), "wall_s": round(time.time() - t0, 1),
            "last_val": {g: _float(last.get(f"val_{g}")) for g in GROUPS}, "stderr_tail": stderr_tail(err, start)}


def _float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def trial_results(d: Path, stage: int) -> dict | None:
    """The trial's stage-`stage` results when that stage finished (bigltr.results' rule), else None; a damaged
    results.json counts as none (the trial is recorded FAIL)."""
    try:
        return finished_stage(read_results(d), stage)
    except ConfigError:
        return None


def same_as_complete(study: optuna.Study, trial: optuna.Trial, values: dict) -> bool:
    """Training is deterministic for a given config, so values the trainer already got in a COMPLETE trial of the
    study (compared after the rounding: `overrides`, e.g. log0's 0.0 proposed again) are not run again: the trial is
    recorded COMPLETE with that trial's result (Optuna's de-duplication pattern; it counts towards the budget)."""
    same = next((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if t.user_attrs.get("overrides") == values), None)  # the lowest number: the trial that ran
    if same is None:
        return False
    note = f"same values as trial {same.number}: not run again"
    ua = same.user_attrs
    for k, v in (("overrides", values), ("same_as", same.number), ("note", note), ("val", ua.get("val")),
                 ("test_all", ua.get("test_all")), ("epochs", ua.get("epochs")), ("dir", ua.get("dir"))):
        if v is not None:
            trial.set_user_attr(k, v)
    study.tell(trial, same.value)
    log(f"{study.study_name} trial {trial.number}: "
        f"{' '.join(f'{k}={fmt(v)}' for k, v in values.items())}: {note} (val all {same.value:.4f})")
    return True


def one_trial(tune: Tune, study: optuna.Study, phase: int, checkpoint: str, stop: threading.Event) -> None:
    trial = study.ask()  # a queued retry (WAITING) first, else the sampler's proposal
    for k, v in (("worker_host", HOST), ("worker_pid", os.getpid()), ("heartbeat", time.time())):
        trial.set_user_attr(k, v)  # at once: if this worker dies, the next one knows the trial is orphaned
    try:
        _one_trial(tune, study, trial, phase, checkpoint, stop)
    except BaseException as e:  # an unexpected error: never leave the trial RUNNING (it would count as running
        try:                       # until --stale-after): fail it and queue it again, like a vanished worker's
            retire(tune, study, trial, f"tuner error ({type(e).__name__}: {e})"[:300])
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass
        raise


def _one_trial(tune: Tune, study: optuna.Study, trial: optuna.Trial, phase: int, checkpoint: str,
               stop: threading.Event) -> None:
    earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and counted(t)]
    if "retry_of" not in trial.user_attrs and len(earlier) >= tune.trials[phase]:
        trial.set_user_attr("surplus", True)  # another worker took the last slot at the same moment
        study.tell(trial, state=TrialState.FAIL)
        return
    values = {p.key: p.suggest(trial) for p in tune.spaces[phase]}
    if same_as_complete(study, trial, values):
        return
    d = trial_dir(tune, study.study_name, trial)
    argv = tune.trial_argv(phase, d, values, checkpoint)
    for k, v in (("overrides", values), ("dir", str(d))):
        trial.set_user_attr(k, v)
    name = f"{study.study_name} trial {trial.number}"
    try:
        build_config(argv)
    except ConfigError as e:  # a combination the up-front check did not cover: recorded, never launched
        trial.set_user_attr("note", f"config error: {e}")
        study.tell(trial, state=TrialState.FAIL)
        log(f"{name}: FAIL, config error: {e}")
        return
    cmd = shlex.split(tune.args.launch) + ["bigltr.train", *argv]
    log(f"{name}: running {' '.join(f'{k}={fmt(v)}' for k, v in values.items())} (logs in {d})")
    info = run_trial(tune, trial, cmd, d, phase, stop)
    for k in ("epochs", "wall_s"):
        trial.set_user_attr(k, info[k])
    if info["outcome"] == "pruned":
        trial.set_user_attr("val", info["last_val"])
        trial.set_user_attr("note", f"pruned after epoch {info['epochs']}")
        study.tell(trial, state=TrialState.PRUNED)
        log(f"{name}: PRUNED after epoch {info['epochs']} (val all {info['last_val']['all']})")
        return
    if info["outcome"] == "stopped" or info["rc"] == EX_STOPPED:
        retire(tune, study, trial, "stopped by a signal before it finished", clean=True)
        return
    res = trial_results(d, phase)
    if info["rc"] == 0 and res is not None:
        trial.set_user_attr("val", {g: res["val"].get(g) for g in GROUPS})
        trial.set_user_attr("test_all", (res.get("test") or {}).get("all"))
        study.tell(trial, res["val"]["all"])
        log(f"{name}: COMPLETE, val all {res['val']['all']:.4f} ({info['wall_s']:.0f} s)")
        return
    rc = info["rc"]
    note = (f"exit {rc}" + (f" ({EXIT_MEANING[rc]})" if rc in EXIT_MEANING else "") if rc != 0
            else f"exit 0 but no stage{phase}.val in results.json")
    trial.set_user_attr("exit_code", info["rc"])
    trial.set_user_attr("note", note)
    trial.set_user_attr("stderr_tail", info["stderr_tail"])
    study.tell(trial, state=TrialState.FAIL)
    log(f"{name}: FAIL ({note}); last lines of {d / 'stderr.log'}:\n"
        + "\n".join("      " + ln for ln in info["stderr_tail"].splitlines()[-10:]))


# ----------------------------------------------------------------------------------------------- worker
def work_phase(tune: Tune, study: optuna.Study, phase: int, checkpoint: str, stop: threading.Event,
               wait_for_all: bool) -> None:
    """Run trials until the phase's budget is used; with wait_for_all, also wait for other workers' trials (the
    next phase needs the best of this one), and pick up any of them that get queued again meanwhile."""
    while not stop.is_set():
        fail_stale(study, tune, phase)
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials) or sum(map(counted, trials)) < tune.trials[phase]:
            one_trial(tune, study, phase, checkpoint, stop)
            write_tables(tune, tune.storage_obj)
        elif wait_for_all and any(t.state == TrialState.RUNNING for t in trials):
            stop.wait(tune.args.poll)
        else:
            return


def phase_study(tune: Tune, phase: int) -> tuple[str, str] | None:
    """(study name, stage1 checkpoint) of a phase; None for phase 2 while phase 1 has no finished trial."""
    if phase == 1:
        return "phase1", ""
    best1 = None if tune.checkpoint else best_trial(study_trials(tune.storage_obj, "phase1"))
    if not tune.checkpoint and best1 is None:
        return None
    return phase2_name(tune, best1), tune.checkpoint or str(trial_dir(tune, "phase1", best1) / "stage1" / "best.pt")


def run_worker(tune: Tune, worker: int, stop: threading.Event) -> int:
    storage = tune.storage_obj
    for i, phase in enumerate(tune.phases):
        ps = phase_study(tune, phase)
        if ps is None:
            log("phase 2: phase 1 has no finished trial; nothing to start from (run phase 1, or give "
                "stage1_checkpoint=PATH with --phase 2)")
            return 1
        name, ckpt = ps
        if phase == 2 and (i == 0 or worker == 0):
            log(f"phase 2 ({name}) starts from {ckpt}")
        study = open_study(tune, storage, name, phase, worker)
        enqueue_grid(tune, study, phase)
        work_phase(tune, study, phase, ckpt, stop, wait_for_all=i + 1 < len(tune.phases))
        if stop.is_set():
            return EX_STOPPED
    return 0


# ----------------------------------------------------------------------------------------------- report
def _num(v) -> str:
    # 4 decimals, the precision of the metrics: at 8,142 classes one class is worth 0.012 points of balanced accuracy
    return "" if v is None else f"{v:.4f}"


def study_trials(storage, name: str) -> list:
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials()
    except KeyError:  # no such study (yet)
        return []


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
    out, sel = studies(tune, storage)
    chosen = {(s, t.number) for s, t in filter(None, sel.values())}
    rows = []
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
            rows.append({"study": name, "trial": t.number, "state": t.state.name,
                         "params": " ".join(f"{k}={fmt(v)}" for k, v in (ua.get("overrides") or t.params).items()),
                         **{f"val_{g}": _num(val.get(g)) for g in GROUPS},
                         "test_all_info_only": _num(ua.get("test_all")), "epochs": ua.get("epochs", ""),
                         "wall_s": ua.get("wall_s", ""), "note": note,
                         "selected": "yes" if (name, t.number) in chosen else "", "dir": ua.get("dir", "")})
    return rows, sel


def write_tables(tune: Tune, storage) -> tuple[list[dict], dict]:
    rows, sel = summary_rows(tune, storage)
    fields = ["study", "trial", "state", "params", *[f"val_{g}" for g in GROUPS], "test_all_info_only", "epochs",
              "wall_s", "note", "selected", "dir"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(tune.out / "tune_summary.csv", buf.getvalue())
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
        out["checkpoint"] = str(Path(ua.get("dir", "")) / "stage1" / "best.pt")
    return out


def final_command(tune: Tune, params: dict) -> str:
    """The refit (docs/reproduce.md "Protocol"): the tuned values, trained on the whole official training set (train
    + the val held out of it, where the data holds one out), the fixed schedule, the last epoch kept."""
    return shlex.join(["python", "-m", "bigltr.train", f"recipe={tune.recipe}",
                       f"out=runs/{Path(tune.recipe).stem}_refit", "protocol=refit", *tune.overrides,
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


# ----------------------------------------------------------------------------------------------- CLI
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


def validate(tune: Tune, cfg) -> None:
    """Every key and every range end of each phase's space goes through the config before anything runs, and every
    searched key through Optuna's suggest (in memory), so no trial of the study can fail on its space."""
    placeholder = tune.checkpoint or str(tune.out / "trials" / "phase1" / "0" / "stage1" / "best.pt")
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
                build_config(tune.trial_argv(ph, tune.out / "trials" / "check", values, placeholder))
            except ConfigError as e:
                raise TuneError(f"config error in phase {ph} (" + " ".join(f"{k}={fmt(v)}" for k, v in values.items())
                                + f"): {e}") from None
    if tune.checkpoint and not Path(tune.checkpoint).is_file():
        raise TuneError(f"stage1_checkpoint {tune.checkpoint} does not exist")
    if not (Path(cfg.data.root) / "_info.json").is_file():
        raise TuneError(f"data.root {cfg.data.root} has no _info.json (make shards with tools/make_shards.py); "
                        "every trial would fail")


def _describe(tune: Tune) -> None:
    for ph in tune.phases:
        log(f"phase {ph}: {tune.trials[ph]} trials over " + ", ".join(q.spec() for q in tune.spaces[ph])
            + f" ({tune.args.sampler} sampler, pruner {tune.args.pruner})")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def _on_signals(handler) -> dict:
    """Install `handler` for the stop signals; returns the previous handlers (to restore)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}


def check_journal(path: Path) -> None:
    """Repair a journal whose last record was cut off (a process killed while appending it), before anything else
    reads or appends: Optuna skips a torn last line when it reads, but the next record would be appended onto it,
    and from then on the journal cannot be read. The torn tail is removed (or, when it is a whole record missing
    only its newline, completed) under the lock Optuna's JournalFileBackend takes for every append (its default
    JournalFileSymlinkLock, `<journal>.lock`). A damaged record before the end cannot be repaired safely: a
    TuneError names the file and the line."""
    try:
        _check_journal(path)
    except OSError as e:
        raise JournalError(f"{path}: cannot check the study's journal: {e.strerror or e}") from None


def _check_journal(path: Path) -> None:
    if not path.is_file():
        return
    lock = optuna.storages.journal.JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        with open(path, "rb+") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1
            tail = data[end:]
            if tail:
                try:
                    whole = isinstance(json.loads(tail), dict)
                except ValueError:
                    whole = False
                if whole:
                    f.write(b"\n")
                else:
                    f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
                n = data.count(b"\n") + 1
                log(f"{path}: line {n}, the last record, was cut off (a process killed while writing it): "
                    + ("completed its newline" if whole else f"removed its {len(tail)} bytes"))
    finally:
        lock.release()
    for n, line in enumerate(data[:end].split(b"\n")[:-1], 1):  # as Optuna reads it: lines end with \n
        try:
            ok = isinstance(json.loads(line), dict)
        except ValueError as e:
            ok, why = False, str(e)
        else:
            why = "not a JSON object"
        if not ok:
            raise JournalError(f"{path}, line {n}: not an Optuna journal record ({why}); the study cannot be read. "
                               f"Restore the file from a copy, or keep lines 1-{n - 1} (head -n {n - 1}) and lose the "
                               "records after them")


class JournalError(TuneError):
    """The study's journal file is damaged."""


def study_finished(tune: Tune) -> bool:
    """Every phase of the command has used its budget and has no RUNNING or WAITING trial."""
    for ph in tune.phases:
        ps = phase_study(tune, ph)
        if ps is None:
            return False
        trials = study_trials(tune.storage_obj, ps[0])
        if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
            return False
        if sum(map(counted, trials)) < tune.trials[ph]:
            return False
    return True


EX_UNFINISHED = 1  # the study did not finish (or no trial finished): rerun the same command to continue


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
    if tune.phases == [2] and not tune.checkpoint and best_trial(study_trials(tune.storage_obj, "phase1")) is None:
        raise TuneError(f"--phase 2 starts from the best phase-1 trial, and {tune.out} has no finished phase-1 "
                        "trial: run phase 1 first (--phase 1 or both), or give stage1_checkpoint=PATH")
    stop = threading.Event()
    child = args.worker_index is not None  # started by a local parent below: no report of its own
    if child:
        LOG_PREFIX[0] = f"[tune w{args.worker_index}]"
    if args.worker_only or args.workers == 1 or child:
        old = _on_signals(lambda *_: stop.set())
        try:
            if not child:
                _describe(tune)
            worker = args.worker_index if child else int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
            rc = run_worker(tune, worker, stop)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        if child:
            return rc
        rr = report(tune, tune.storage_obj)  # also after a stop: the summary of what has run
        return rc or rr

    # local parallel workers: this command again as worker processes, sharing the study through the storage
    _describe(tune)
    first = phase_study(tune, tune.phases[0])  # a later phase's study is known only when the one before ends
    if first and args.sampler == "grid":  # queue the grid before any worker asks (each worker checks again)
        enqueue_grid(tune, open_study(tune, tune.storage_obj, first[0], tune.phases[0]), tune.phases[0])
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    procs = []
    for i in range(args.workers):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        if len(gpus) >= args.workers:  # one share of the visible GPUs per worker
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i::args.workers])
        # a worker gets SIGTERM when this process dies (even by SIGKILL): it stops its trial and queues it again
        procs.append(subprocess.Popen([sys.executable, "-m", "bigltr.tune", *argv, "--worker-index", str(i)],
                                      env=env, preexec_fn=die_with_parent()))

    def forward(sig, _):
        stop.set()
        for q in procs:
            if q.poll() is None:
                q.send_signal(sig)

    old = _on_signals(forward)
    try:
        codes = [q.wait() for q in procs]
        for i, c in enumerate(codes):
            if c < 0 or c not in (0, EX_STOPPED):
                what = f"was killed by {signal.Signals(-c).name}" if c < 0 else f"exited with {c}"
                log(f"worker w{i} {what}")
        if not stop.is_set() and any(c not in (0, EX_STOPPED) for c in codes) and not study_finished(tune):
            # a worker died (OOM killer, kill -9) after the others ended: its trial is stale; finish it here
            log("finishing the study in this process")
            run_worker(tune, 0, stop)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    rr = report(tune, tune.storage_obj)
    if stop.is_set() or any(c == EX_STOPPED for c in codes):
        return EX_STOPPED
    return (0 if study_finished(tune) else EX_UNFINISHED) or rr


if __name__ == "__main__":
    sys.exit(main())
