"""Guards of a run directory: one run at a time (a lock), and `resume=auto` only with the config it was trained with.
(Where the files of a run directory live: bigltr.rundir.)

The lock is a file `<out>/.bigltr.lock` created with O_CREAT|O_EXCL (atomic on local disks and on NFS v3+, Lustre
and GPFS, where `flock`/`fcntl` locks are not always available or survive a node's death) holding the owner's host,
pid and Slurm job id; a thread refreshes its mtime every `HEARTBEAT_S`. A lock is stale, and taken over, when its
owner is provably gone: same host and the pid is dead, the same Slurm job id as ours (a requeued job's earlier run
has ended: Slurm runs one at a time), or no heartbeat for `STALE_S` (a node that died).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from bigltr.config import ConfigError, config_diff, key_in
from bigltr.rundir import RunDir

log = logging.getLogger("bigltr")

HEARTBEAT_S = 30.0
STALE_S = 300.0


class RunLocked(ConfigError):
    """Another run holds the run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


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
        if owner.get("host") == self.me["host"] and isinstance(owner.get("pid"), int) and not _alive(owner["pid"]):
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


# ------------------------------------------------------------------------------------------ config on resume
# Keys that may differ when a run is resumed: how long it trains, where things are, logging, the launch.
RESUMABLE = ("recipe", "stage", "out", "resume", "device", "log_every", "ckpt_every_steps", "preempt_check_every",
             "stage1.epochs", "stage2.epochs", "stage1.micro_batch_size", "stage2.micro_batch_size", "data.root", "data.num_workers", "data.pin_memory",
             "data.max_skip_fraction", "data.eval_partial", "data.pipeline", "stage2.cache.location",
             "stage2.cache.dir", "eval.", "dist.", "log.")


def compare_for_resume(saved: dict, new: dict, defaults: dict, started: set[str]) -> tuple[list[str], list[str]]:
    """(errors, allowed changes) between the saved and the new resolved config.

    `started`: the stages ("stage1", "stage2") with results or resume checkpoints; a key of a stage that has not
    started may change. A key the saved config lacks (written by an older bigltr) counts as its default. Both
    lists are sorted by key."""
    may_change = RESUMABLE + tuple(f"{s}." for s in ("stage1", "stage2") if s not in started)
    errors, allowed = [], []
    for key, old, value in sorted(config_diff(saved, new, defaults=defaults), key=lambda d: d[0]):
        (allowed if key_in(key, may_change) else errors).append(f"{key}: {old!r} -> {value!r}")
    return errors, allowed
