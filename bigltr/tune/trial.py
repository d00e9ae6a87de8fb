"""One trial's process: started in its own process group with PR_SET_PDEATHSIG (it dies with its worker, even by
SIGKILL), its summary.csv read while it runs (each epoch's val_all reported to Optuna; stopped when pruned), stopped
with SIGTERM, then SIGKILL after --grace. Also the process probes recovery needs (start time, process group: /proc;
whether one pid is alive: bigltr.procs.pid_alive) and the reading of a trial folder's results.json (trial_results)."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna

from bigltr.config import ConfigError
from bigltr.procs import proc_stat
from bigltr.results import finished_stage, read_epochs, read_results
from bigltr.rundir import RunDir
from bigltr.tune.base import GROUPS, ROOT
from bigltr.tune.study import Tune

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _start_time(pid) -> int | None:
    """A process's start time (clock ticks after boot): with the pid, it names one process (pids are reused)."""
    st = proc_stat(pid)
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
            st = proc_stat(d.name)
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
    summary, err = RunDir(d).stage(stage).summary, d / "stderr.log"
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
