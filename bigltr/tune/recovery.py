"""Trials whose worker is gone: a RUNNING trial without its worker (dead on this host, or silent for --stale-after) has
its surviving trainer stopped, its finished result recorded, or is failed and queued again in the same folder
(--max-retry; a clean stop is always queued again). Optuna's own heartbeat and RetryFailedTrialCallback work only
with an RDB storage's heartbeat, so the tuner keeps its own (user attrs heartbeat, worker_host, worker_pid,
retry_of, attempt)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from bigltr.procs import pid_alive
from bigltr.results import read_epochs
from bigltr.rundir import RunDir
from bigltr.tune.base import GROUPS, HOST, log
from bigltr.tune.study import Tune
from bigltr.tune.trial import _group_alive, _start_time, trial_results


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
    rows = read_epochs(RunDir(d).stage(phase).summary)
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
        if here and "worker_pid" in ua and (ua["worker_pid"] == os.getpid() or not pid_alive(ua["worker_pid"])):
            reason = f"worker {HOST}:{ua['worker_pid']} is gone"
        elif now - beat > tune.args.stale_after:
            reason = f"no heartbeat from worker {ua.get('worker_host')}:{ua.get('worker_pid')} for {now - beat:.0f} s"
        else:
            continue
        if here:
            stop_orphan(tune, study.study_name, t)
        if not record_finished(tune, study, t, phase, reason):
            retire(tune, study, t, reason)
