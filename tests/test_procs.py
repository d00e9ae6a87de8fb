"""bigltr.procs.pid_alive: the one process-alive rule of the run lock (bigltr.engine.lock) and bigltr-tune's recovery
(bigltr.tune.recovery): a zombie (exited, not yet reaped) is dead, a running process alive."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bigltr.engine.lock import RunLock
from bigltr.procs import pid_alive, proc_stat

needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="zombies are told apart by /proc")


def _zombie() -> subprocess.Popen:
    """A child that has exited and is not reaped: waitid(WNOWAIT) waits for its exit and leaves it a zombie."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
    return p


@needs_proc
def test_unreaped_child_is_dead_live_child_alive():
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    z = _zombie()
    try:
        assert pid_alive(live.pid)
        assert proc_stat(z.pid)[0] == "Z"
        os.kill(z.pid, 0)  # the premise: kill(pid, 0) alone says a zombie exists
        assert not pid_alive(z.pid)
    finally:
        live.kill()
        live.wait()
        z.wait()  # reap
    assert pid_alive(os.getpid())


def test_not_a_pid_reads_alive():
    assert pid_alive(None) and pid_alive("x")  # nothing can be concluded: never taken for dead
    assert proc_stat("x") is None


@needs_proc
def test_run_lock_of_a_zombie_owner_is_stale(tmp_path):
    """The lock and bigltr-tune agree: a lock whose owner on this host is a zombie is taken over."""
    z = _zombie()
    try:
        lock = RunLock(tmp_path)
        lock.path.parent.mkdir(parents=True, exist_ok=True)
        lock.path.write_text(json.dumps({"host": socket.gethostname(), "pid": z.pid, "slurm_job": "",
                                         "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        lock.acquire()
        try:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        finally:
            lock.release()
    finally:
        z.wait()
