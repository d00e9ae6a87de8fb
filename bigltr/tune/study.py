"""The study: the tuning job (Tune: its trials' command lines, its storage), the study of each phase and its trial
folders, sampler, pruner, the grid queue, and the check and repair of a journal file. Trials are updated through
Optuna's public storage API (Tune.trial_id)."""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from bigltr.rundir import RunDir
from bigltr.tune.base import COUNTED, JournalError, fmt, log
from bigltr.tune.space import Param


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

    def trial_folder(self, study_name: str, number: int | str) -> Path:
        """DIR/trials/<study>/<number>: the run folder (out=) of a trial."""
        return self.out / "trials" / study_name / str(number)

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
    return tune.trial_folder(study_name, t.user_attrs.get("retry_of", t.number))


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



def study_trials(storage, name: str) -> list:
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials()
    except KeyError:  # no such study (yet)
        return []


def phase_study(tune: Tune, phase: int) -> tuple[str, str] | None:
    """(study name, stage1 checkpoint) of a phase; None for phase 2 while phase 1 has no finished trial."""
    if phase == 1:
        return "phase1", ""
    best1 = None if tune.checkpoint else best_trial(study_trials(tune.storage_obj, "phase1"))
    if not tune.checkpoint and best1 is None:
        return None
    return phase2_name(tune, best1), tune.checkpoint or str(RunDir(trial_dir(tune, "phase1", best1)).best(1))


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
