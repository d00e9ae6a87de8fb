"""Preemption-safe training: resume checkpoints with the data position, and the stop signal.

A stage writes `<out>/stage{N}/resume.pt` every `ckpt_every_steps` optimiser steps, at every epoch end and when it
is asked to stop. It holds the model and optimizer (full, unsharded: gathered from FSDP2 shards), scheduler, grad
scaler, RNG states, the epoch and the number of batches of that epoch already trained, the best validation
result so far and the per-epoch norm history. Resuming replays the epoch's deterministic (seed, epoch) order and
skips the batches already trained, so an interrupted run ends with the same weights as a straight one.

Stop requests: SIGUSR1 or SIGTERM to any training process, or a file `<out>/PREEMPT` (what the Slurm scripts
create: torchrun's agent dies on SIGUSR1 instead of forwarding it, a file reaches every rank on every node). Ranks
agree on the step to stop at with an all-reduce every `preempt_check_every` steps; then they checkpoint and the
process exits with EXIT_PREEMPTED (75, EX_TEMPFAIL), which the job scripts answer with a requeue.
"""
from __future__ import annotations

import logging
import random
import signal
import threading
from pathlib import Path

import numpy as np
import torch

from bigltr.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger("bigltr")

EXIT_PREEMPTED = 75
PREEMPT_FILE = "PREEMPT"


class Preempted(Exception):
    """Raised after the stop checkpoint is written; the entry point turns it into EXIT_PREEMPTED."""


class StopFlag:
    def __init__(self, run_dir: Path, dist, check_every: int = 10):
        self.file = Path(run_dir) / PREEMPT_FILE
        self.dist, self.check_every = dist, max(1, check_every)
        self.requested = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)

    def close(self) -> None:
        """Give the signals back to whoever handled them before the run."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handler(self, signum, frame):
        log.warning(f"received signal {signal.Signals(signum).name}: checkpointing at the next step boundary")
        self.requested = True

    def clear_stale(self) -> None:
        """A PREEMPT file left by the previous (requeued) job must not stop this one."""
        if self.dist.is_main and self.file.exists():
            self.file.unlink()
        self.dist.barrier()

    def should_stop(self, step: int) -> bool:
        if step % self.check_every:
            return False
        local = self.requested or self.file.exists()
        flag = torch.tensor(float(local), device=self.dist.device)
        return bool(self.dist.all_reduce_(flag, "max") > 0)


def rng_state() -> dict:
    st = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (st[0], torch.from_numpy(st[1].astype(np.int64)), *st[2:]),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuples(x):
    """torch.load(weights_only) returns lists where tuples were saved; random.setstate needs tuples back."""
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_resume(path: Path, *, dist, model, optimizer, scheduler, scaler, epoch: int, batch: int, extra: dict) -> None:
    """Collective: every rank calls it (FSDP2 gathers shards); rank 0 writes the file atomically."""
    model_sd = dist.full_state_dict(model)
    optim_sd = dist.full_optim_state_dict(model, optimizer)
    if dist.is_main:
        save_checkpoint({"epoch": epoch, "batch": batch, "model": model_sd, "optimizer": optim_sd,
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                         "rng": rng_state(), **extra}, path)
    dist.barrier()


class Progress:
    """A stage's position and history, and the resume checkpoint that carries them (one per stage)."""

    def __init__(self, path: Path, stage: int, config: dict, *, dist, model, optimizer, scheduler, scaler):
        self.path, self.stage, self.config = Path(path), stage, config
        self.dist, self.model, self.optimizer, self.scheduler, self.scaler = dist, model, optimizer, scheduler, scaler
        self.epoch, self.batch = 0, 0  # where training (re)starts
        self.best = None  # (epoch, val_all) of the best epoch so far
        self.norms_per_epoch: list = []
        self.resumed = False

    def restore(self, state: dict | None, load_model: bool = True) -> "Progress":
        """Load optimizer, scheduler, scaler, RNG and position from a resume state (the model too, if asked)."""
        if state is None:
            return self
        if load_model:
            self.dist.load_full_state_dict(self.model, state["model"])
        self.dist.load_full_optim_state_dict(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.epoch, self.batch = state["epoch"], state["batch"]
        self.norms_per_epoch = state["norms_per_epoch"]
        self.best = tuple(state["best"]) if state["best"] else None
        self.resumed = True
        log.info(f"stage {self.stage}: resuming {self.path} at epoch {self.epoch + 1}, batch {self.batch}")
        return self

    def start_batch(self, epoch: int) -> int:
        return self.batch if epoch == self.epoch else 0

    def update_best(self, epoch: int, val_all: float) -> bool:
        if self.best is None or val_all > self.best[1]:
            self.best = (epoch, val_all)
            return True
        return False

    def checkpoint(self, epoch: int, batch: int) -> None:
        save_resume(self.path, dist=self.dist, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                    scaler=self.scaler, epoch=epoch, batch=batch,
                    extra={"stage": self.stage, "best": list(self.best) if self.best else None,
                           "norms_per_epoch": self.norms_per_epoch, "config": self.config})


def load_resume(path: Path) -> dict | None:
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    state["rng"]["python"] = _to_tuples(state["rng"]["python"])
    state["rng"]["numpy"] = tuple(state["rng"]["numpy"])
    return state


def step_hook(ctx, progress: Progress, epoch: int, batches: int, accum_steps: int = 1) -> bool:
    """After an optimiser step: periodic resume checkpoint, and the (rank-agreed) stop check.

    Returns True when the stage must stop; the stop checkpoint is then already written."""
    step = batches // accum_steps if batches % accum_steps == 0 else batches // accum_steps + 1
    every = ctx.cfg.ckpt_every_steps
    if ctx.stop is not None and ctx.stop.should_stop(step):
        progress.checkpoint(epoch, batches)
        log.warning(f"stop requested: checkpoint written at epoch {epoch + 1}, batch {batches}; exiting with "
                    f"{EXIT_PREEMPTED}")
        return True
    if every and step % every == 0:
        progress.checkpoint(epoch, batches)
    return False
