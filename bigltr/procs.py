"""Whether a process is alive: the one rule of bigltr (the run lock, bigltr.engine.lock; bigltr-tune's recovery of
trials whose worker or trainer is gone, bigltr.tune.trial / recovery).

A process is alive when its pid exists and it is not a zombie: a process that has exited but that its parent has not
reaped yet still answers ``kill(pid, 0)``, yet it will never run again, so it counts as dead. The zombie state is read
from ``/proc/<pid>/stat`` (Linux); where there is no /proc a zombie cannot be told apart and reads as alive.
Foundation: imports nothing of bigltr.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["pid_alive", "proc_stat"]


def proc_stat(pid) -> list[str] | None:
    """/proc/<pid>/stat after the command name: [state, ppid, pgrp, ...] (field N of proc(5) is item N - 3); None
    when it cannot be read (no such process, no /proc)."""
    try:
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError, ValueError):
        return None


def pid_alive(pid) -> bool:
    """Whether process ``pid`` exists and is not a zombie (exited, not yet reaped). A pid that is not a number is
    taken as alive (nothing can be concluded from it)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else: it may still be a zombie
        pass
    except (TypeError, ValueError, OverflowError):
        return True
    st = proc_stat(pid)
    return st is None or st[0] not in ("Z", "X")  # Z: zombie, X: dead (being removed)
