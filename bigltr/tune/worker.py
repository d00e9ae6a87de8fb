"""Workers: one trial from ask to tell (one_trial), a phase's trials until its budget is used (work_phase), the
phases in order (run_worker), and a command's run (run_study): one worker in this process (--workers 1,
--worker-only, a local worker), or the parent of --workers K local worker processes; its exit status (EX_STOPPED,
EX_UNFINISHED)."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import optuna
from optuna.trial import TrialState

from bigltr.config import ConfigError, build_config
from bigltr.tune.base import (EX_STOPPED, EX_UNFINISHED, EXIT_MEANING, GROUPS, HOST, ROOT, TuneError, fmt, log,
                              set_log_prefix)
from bigltr.tune.recovery import fail_stale, retire
from bigltr.tune.report import report, write_tables
from bigltr.tune.study import (Tune, best_trial, counted, enqueue_grid, open_study, phase_study, study_trials,
                               trial_dir)
from bigltr.tune.trial import die_with_parent, run_trial, trial_results


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


def run_study(tune: Tune, args, argv: list[str]) -> int:
    """Run the command's phases (tune.storage_obj open, the journal checked) and write the report; returns the
    exit status."""
    if tune.phases == [2] and not tune.checkpoint and best_trial(study_trials(tune.storage_obj, "phase1")) is None:
        raise TuneError(f"--phase 2 starts from the best phase-1 trial, and {tune.out} has no finished phase-1 "
                        "trial: run phase 1 first (--phase 1 or both), or give stage1_checkpoint=PATH")
    stop = threading.Event()
    child = args.worker_index is not None  # started by a local parent below: no report of its own
    if child:
        set_log_prefix(f"[tune w{args.worker_index}]")
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
