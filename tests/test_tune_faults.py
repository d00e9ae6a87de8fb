"""bigltr-tune when its processes die: a worker killed with SIGKILL (its trainer goes with it; a trainer that outlives
it is stopped by the rerun, or its finished result recorded), one of several local workers killed (the study still
finishes, exit 0), a torn or damaged journal, a tuner error inside a trial. Real Optuna, real processes, real
signals; the trials are the stand-in trainer of tests/test_tune.py (fake_train.py through --launch)."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from test_tune import _calls, _storage, _summary, _trials, fake  # noqa: F401 - fake is a fixture

from bigltr import tune
from bigltr.procs import pid_alive

ROOT = Path(__file__).resolve().parent.parent


def _until(cond, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _rows(d: Path) -> int:
    f = d / "stage1" / "summary.csv"
    return len(f.read_text().splitlines()) - 1 if f.is_file() else 0


def _worker(fake_args, out, *extra, **env):
    """`bigltr-tune` as a process of its own (so that it can be killed), its output in out.log."""
    out.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "bigltr.tune", *fake_args, f"out={out}", *extra],
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env}, stdout=log, stderr=subprocess.STDOUT)


def test_killed_worker_takes_its_trainer_along(fake, tmp_path, monkeypatch):
    # kill -9 of the worker: its trainer gets SIGTERM (PR_SET_PDEATHSIG), and the rerun retries the trial in its folder
    out = tmp_path / "k"
    p = _worker(fake, out, "--trials", "1", FAKE_EPOCHS="300", FAKE_EPOCH_S="0.1")
    d = out / "trials" / "phase1" / "0"
    _until(lambda: _rows(d) >= 2, what="two epochs of trial 0")
    trainer = int((d / "pid").read_text())
    p.kill()
    p.wait()
    _until(lambda: not pid_alive(trainer), timeout=5, what="the trainer to die with its worker")
    assert not (d / "results.json").exists()
    monkeypatch.setenv("FAKE_EPOCHS", "1")  # the retry resumes after the epochs done: it ends at once
    assert tune.main(fake + [f"out={out}", "--trials", "1"]) == 0
    t0, t1 = _trials(out)
    assert t0.state.name == "FAIL" and "is gone" in t0.user_attrs["stale"] and t0.user_attrs["retried"]
    assert t1.state.name == "COMPLETE" and t1.user_attrs["retry_of"] == 0 and t1.user_attrs["dir"] == str(d)


def test_orphaned_trainer_is_stopped_or_its_result_recorded(fake, tmp_path, monkeypatch, capfd):
    # a trainer that outlives its worker (as a launcher's grandchildren would: FAKE_NO_PDEATHSIG)
    # 1. still running when the same command is run again: stopped (SIGTERM to its process group), then retried
    out = tmp_path / "running"
    p = _worker(fake, out, "--trials", "1", FAKE_EPOCHS="300", FAKE_EPOCH_S="0.1", FAKE_NO_PDEATHSIG="1")
    d = out / "trials" / "phase1" / "0"
    _until(lambda: _rows(d) >= 1, what="an epoch of trial 0")
    trainer = int((d / "pid").read_text())
    p.kill()
    p.wait()
    time.sleep(0.5)
    assert pid_alive(trainer)  # the premise: an orphan
    monkeypatch.setenv("FAKE_EPOCHS", "1")
    assert tune.main(fake + [f"out={out}", "--trials", "1", "--grace", "5"]) == 0
    assert not pid_alive(trainer)
    assert f"phase1 trial 0: its trainer (process group {trainer}) outlived its worker: stopping it" in \
        capfd.readouterr().out
    t0, t1 = _trials(out)
    assert t0.state.name == "FAIL" and t1.state.name == "COMPLETE" and t1.user_attrs["retry_of"] == 0

    # 2. finished before the rerun: its results.json is the trial's result (not run again, not lost), and the better
    # trial is the one selected
    calls = tmp_path / "calls"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.setenv("FAKE_VALS", "80,20")
    monkeypatch.delenv("FAKE_EPOCHS")
    out = tmp_path / "finished"
    p = _worker(fake, out, "--trials", "2", FAKE_EPOCHS="12", FAKE_EPOCH_S="0.1", FAKE_NO_PDEATHSIG="1")
    d = out / "trials" / "phase1" / "0"
    _until(lambda: _rows(d) >= 1, what="an epoch of trial 0")
    trainer = int((d / "pid").read_text())
    p.kill()
    p.wait()
    _until(lambda: not pid_alive(trainer), what="the orphan to finish")
    assert (d / "results.json").is_file()
    assert tune.main(fake + [f"out={out}", "--trials", "2"]) == 0
    t0, t1 = _trials(out)
    assert t0.state.name == "COMPLETE" and t0.value == 92.0 and len(t0.intermediate_values) == 12
    assert t0.user_attrs["note"].startswith("finished after its worker stopped")
    assert t1.state.name == "COMPLETE" and t1.value == 22.0
    assert [c["out"] for c in _calls(calls)] == [str(d), str(out / "trials" / "phase1" / "1")]  # trial 0 ran once
    row0 = _summary(out)[0]
    assert row0["selected"] == "yes" and row0["val_all"] == "92.0000" and "results.json" in row0["note"]


def test_one_of_two_workers_killed_the_study_still_finishes(fake, tmp_path):
    # trial 1 is short, trial 0 long: worker B ends after trial 1, then worker A (trial 0) is killed. The command
    # finishes the orphaned trial itself and exits 0, not with the worker's -9 (247)
    out = tmp_path / "two"
    p = _worker(fake, out, "--trials", "2", "--workers", "2", FAKE_EPOCHS="1000,1", FAKE_EPOCH_S="0.05")
    by = {}

    def both_started():
        try:
            by.update({t.number: t for t in _trials(out)})
        except KeyError:  # no study yet
            return False
        return len(by) == 2 and by[1].state.name == "COMPLETE" and "trainer_pid" in by[0].user_attrs

    _until(both_started, what="trial 1 done and trial 0 running")
    _until(lambda: not pid_alive(by[1].user_attrs["worker_pid"]), what="worker B to end")
    worker_a, trainer = by[0].user_attrs["worker_pid"], by[0].user_attrs["trainer_pid"]
    os.kill(worker_a, signal.SIGKILL)
    _until(lambda: not pid_alive(trainer), timeout=10, what="trial 0's trainer to die with worker A")
    (out / "trials" / "phase1" / "0" / "finish").touch()  # the retry: one more epoch
    assert p.wait(timeout=120) == 0
    log = (tmp_path / "two.log").read_text()
    assert "killed by SIGKILL" in log and "finishing the study in this process" in log
    t0, t1, t2 = _trials(out)
    assert t0.state.name == "FAIL" and t0.user_attrs["retried"] and t1.state.name == "COMPLETE"
    assert t2.state.name == "COMPLETE" and t2.user_attrs["retry_of"] == 0 and t2.user_attrs["worker_pid"] == p.pid


def test_torn_journal_is_repaired_and_a_damaged_one_refused(fake, tmp_path, capfd):
    out = tmp_path / "j"
    assert tune.main(fake + [f"out={out}", "--trials", "1"]) == 0
    j = out / "study.journal"
    whole = j.read_bytes()
    lines = whole.splitlines(keepends=True)
    # a whole record without its newline: completed
    j.write_bytes(whole[:-1])
    tune.check_journal(j)
    assert j.read_bytes() == whole
    # the last record cut mid-way (a worker killed while appending): removed, but only under Optuna's journal lock
    j.write_bytes(whole[:-9])
    lock = optuna.storages.journal.JournalFileSymlinkLock(str(j))
    lock.acquire()
    try:
        th = threading.Thread(target=tune.check_journal, args=(j,))
        th.start()
        time.sleep(0.5)
        assert th.is_alive() and j.read_bytes() == whole[:-9]
    finally:
        lock.release()
    th.join(30)
    assert j.read_bytes() == b"".join(lines[:-1])
    # through the command: cut again, then continue the study (the cut record was the trial's end: the trial is
    # RUNNING for a worker that is gone, and its finished results.json is recorded)
    j.write_bytes(whole[:-9])
    capfd.readouterr()
    assert tune.main(fake + [f"out={out}", "--trials", "2"]) == 0
    assert f"{j}: line {len(lines)}, the last record, was cut off" in capfd.readouterr().out
    assert [t.state.name for t in _trials(out)] == ["COMPLETE", "COMPLETE"]
    assert tune.main(fake + [f"out={out}", "--report"]) == 0

    # a damaged record before the end: one line naming the file and the line, exit 2, for every command
    good = j.read_bytes().splitlines(keepends=True)
    j.write_bytes(b"".join(good[:2] + [b'{"op_code": 4, "worker_id"\n'] + good[2:]))
    capfd.readouterr()
    for extra in (["--report"], ["--trials", "3"]):
        assert tune.main(fake + [f"out={out}", *extra]) == 2
        err = capfd.readouterr().err
        assert err.startswith(f"bigltr-tune: error: {j}, line 3: not an Optuna journal record") and \
            len(err.splitlines()) == 1, err


def test_a_tuner_error_never_leaves_a_running_trial(fake, tmp_path, monkeypatch):
    out = tmp_path / "e"

    def boom(*_):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(tune, "trial_dir", boom)
    with pytest.raises(RuntimeError):
        tune.main(fake + [f"out={out}", "--trials", "1"])
    t0, t1 = _trials(out)  # failed and queued again, not RUNNING until --stale-after
    assert t0.state.name == "FAIL" and "tuner error (RuntimeError: disk on fire)" in t0.user_attrs["stale"]
    assert t1.state.name == "WAITING"
    monkeypatch.undo()
    monkeypatch.delenv("FAKE_EPOCHS", raising=False)
    assert tune.main(fake + [f"out={out}", "--trials", "1"]) == 0
    assert [t.state.name for t in _trials(out)] == ["FAIL", "COMPLETE"]
