"""One run at a time in a run directory: a lock. (Where the files of a run directory live: bigltr.rundir; resume=auto
only with the config it was trained with: bigltr.engine.resume.)

The lock is a file `<out>/.bigltr.lock` created with O_CREAT|O_EXCL (atomic on local disks and on NFS v3+, Lustre
and GPFS, where `flock`/`fcntl` locks are not always available or survive a node's death) holding the owner's host,
pid and Slurm job id; a thread refreshes its mtime every `HEARTBEAT_S`. A lock is stale, and taken over, when its
owner is provably gone: same host and the pid is dead (bigltr.procs.pid_alive: a zombie is dead), the same Slurm job
id as ours (a requeued job's earlier run has ended: Slurm runs one at a time), or no heartbeat for `STALE_S` (a node
that died).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from bigltr.config import ConfigError
from bigltr.procs import pid_alive
from bigltr.rundir import RunDir

log = logging.getLogger("bigltr")

HEARTBEAT_S = 30.0
STALE_S = 300.0


class RunLocked(ConfigError):
    """Another run holds the run directory."""


class RunLock:
    def __init__(self, out: Path, stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S):
        self.path = RunDir(out).lock
        self.stale_s, self.heartbeat_s = stale_s, heartbeat_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner, age = self._read_owner()
                reason = self._stale(owner, age)
                if reason is None:
                    o = owner or {}
                    raise RunLocked(
                        f"{self.path.parent} is in use by another run (host {o.get('host', '?')}, pid "
                        f"{o.get('pid', '?')}{', Slurm job ' + o['slurm_job'] if o.get('slurm_job') else ''}, started "
                        f"{o.get('started', '?')}, lock {self.path}). Use another out=, or wait for it to end; if "
                        f"that run is dead on another machine, delete {self.path}") from None
                log.warning(f"taking over the stale lock {self.path} ({reason})")
                try:  # rename first: of two runs taking over at once, only one rename succeeds
                    aside = self.path.with_name(f"{self.path.name}.stale-{self.me['host']}-{self.me['pid']}")
                    os.replace(self.path, aside)
                    aside.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._beat, name="bigltr-lock-heartbeat", daemon=True)
            self._thread.start()
            return self
        raise RunLocked(f"could not take the lock {self.path} (other runs keep taking it)")

    def _read_owner(self) -> tuple[dict | None, float]:
        try:
            age = time.time() - self.path.stat().st_mtime
            owner = json.loads(self.path.read_text() or "null")
        except FileNotFoundError:
            return None, 0.0
        except (OSError, ValueError):
            owner = None  # being written right now, or garbage: judged by its age alone
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return None, 0.0
        return (owner if isinstance(owner, dict) else None), age

    def _stale(self, owner: dict | None, age: float) -> str | None:
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s"
        if not owner:
            return None
        if owner.get("host") == self.me["host"] and isinstance(owner.get("pid"), int) and not pid_alive(owner["pid"]):
            return f"pid {owner['pid']} on this host has exited"
        if self.me["slurm_job"] and owner.get("slurm_job") == self.me["slurm_job"] and owner != self.me:
            return f"an earlier run of Slurm job {self.me['slurm_job']} (requeued)"
        return None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        owner, _ = self._read_owner()
        if owner == self.me:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
