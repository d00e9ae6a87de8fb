"""When training stops early: a stop request (preemption) or a non-finite loss or weight.

Stop requests: SIGUSR1 or SIGTERM to any training process, or a file `<out>/PREEMPT` (what the Slurm scripts
create: torchrun's agent dies on SIGUSR1 instead of forwarding it, a file reaches every rank on every node). Ranks
agree on the step to stop at with an all-reduce every `preempt_check_every` steps and at every epoch end; then they
write a resume checkpoint (bigltr.engine.resume) and the process exits with EXIT_PREEMPTED (75, EX_TEMPFAIL), which
the job scripts answer with a requeue.

The non-finite guard rides on the same all-reduce: a non-finite loss is recorded on the device without a host sync
per step, and the weights are checked before every checkpoint, so no checkpoint ever holds weights trained on a
non-finite loss.
"""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import torch

from bigltr.rundir import RunDir

log = logging.getLogger("bigltr")

EXIT_PREEMPTED = 75


class Preempted(Exception):
    """Raised after the stop checkpoint is written; the entry point turns it into EXIT_PREEMPTED."""


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; no checkpoint was written after it, so the newest resume checkpoint is finite."""


class StopGuard:
    """Stop requests and the non-finite-loss guard, checked together every `check_every` optimiser steps (counted
    over the whole run, not per epoch) and at every epoch end, with one all-reduce so that every rank agrees.

    The loss is checked without a host sync per step: `observe(loss)` records, on the device, where the loss
    first became non-finite; `poll` reads it with the stop request.
    """

    def __init__(self, run_dir: Path, dist, check_every: int = 10):
        self.file = RunDir(run_dir).preempt
        self.dist, self.check_every = dist, max(1, check_every)
        self.requested = False
        self.steps = 0  # optimiser steps taken by this process (all stages, all epochs)
        self._bad_at = torch.full((), -1, dtype=torch.long, device=dist.device)  # epoch * 2**32 + batch, or -1
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
        log.warning(f"received signal {signal.Signals(signum).name}: checkpointing at the next check "
                    f"(every {self.check_every} steps and at the epoch end)")
        self.requested = True

    def clear_stale(self) -> None:
        """A PREEMPT file left by the previous (requeued) job must not stop this one."""
        if self.dist.is_main and self.file.exists():
            self.file.unlink()
        self.dist.barrier()

    def observe(self, loss: torch.Tensor, epoch: int, batch: int) -> None:
        """Remember (on the device, no sync) the first batch whose loss is not finite."""
        bad = ~torch.isfinite(loss.detach()) & (self._bad_at < 0)
        self._bad_at.masked_fill_(bad, epoch * 2**32 + batch)

    def step_taken(self) -> bool:
        """Count an optimiser step; True when a check is due."""
        self.steps += 1
        return self.steps % self.check_every == 0

    def poll(self, where: str) -> bool:
        """Collective. Raise TrainingDiverged if any rank saw a non-finite loss; return True if a stop is asked."""
        local = torch.stack([torch.tensor(int(self.requested or self.file.exists()), device=self.dist.device),
                             self._bad_at])
        stop, bad_at = (int(v) for v in self.dist.all_reduce_(local, "max").tolist())
        if bad_at >= 0:
            epoch, batch = divmod(bad_at, 2**32)
            raise TrainingDiverged(
                f"{where}: the training loss became non-finite (nan/inf) at epoch {epoch + 1}, batch {batch + 1}; "
                f"nothing was saved after it, so the newest resume checkpoint holds finite weights. Lower the "
                f"learning rate (or use amp=none / bf16 instead of fp16) and resume with resume=auto, or start over")
        return bool(stop)


def check_finite_weights(model, dist, stage: int, epoch: int, batch: int) -> None:
    """Collective: raise TrainingDiverged if any weight or floating buffer of `model` is nan/inf on any rank (a
    finite loss can still end in a step that overflows the weights). Run before anything is saved."""
    local = [getattr(p, "ds_tensor", p) for p in model.parameters()]  # DeepSpeed ZeRO-3: this rank's partition
    local += [b for b in model.buffers() if b.is_floating_point()]  # BatchNorm statistics too
    local = [t.to_local() if hasattr(t, "to_local") else t for t in local]  # FSDP2 DTensors: the local shard
    ok = torch.stack([torch.isfinite(t).all() for t in local if t.numel()] or [torch.tensor(True)]).all()
    ok = ok.to(device=dist.device, dtype=torch.long)
    if int(dist.all_reduce_(ok, "min")) == 0:
        raise TrainingDiverged(
            f"stage {stage}: the weights became non-finite (nan/inf) by the "
            + (f"end of epoch {epoch}" if batch == 0 else f"epoch {epoch + 1}, batch {batch}")
            + "; nothing was saved after it, so the newest resume checkpoint holds finite weights. "
            "Lower the learning rate and resume with resume=auto, or start over")


def step_hook(guard: StopGuard | None, state, ckpt_every_steps: int, epoch: int, batches: int) -> bool:
    """After an optimiser step: the rank-agreed stop / non-finite-loss check (every `check_every` steps of the run)
    and the periodic resume checkpoint (every `ckpt_every_steps` steps of the run; the loss is checked first).
    `state`: the stage's StageState (bigltr.engine.resume), which writes the checkpoint.

    Returns True when the stage must stop; the stop checkpoint is then already written."""
    every = ckpt_every_steps
    if guard is None:  # a stage driven outside `run` (benchmarks): periodic checkpoints only
        if every and state.steps_taken() % every == 0:
            state.checkpoint(epoch, batches)
        return False
    check_due = guard.step_taken()
    ckpt_due = bool(every) and guard.steps % every == 0
    if not (check_due or ckpt_due):
        return False
    if guard.poll(f"stage {state.stage}"):
        state.checkpoint(epoch, batches)
        log.warning(f"stop requested: checkpoint written at epoch {epoch + 1}, batch {batches}; exiting with "
                    f"{EXIT_PREEMPTED}")
        return True
    if ckpt_due:
        state.checkpoint(epoch, batches)
    return False


def epoch_end_stop(guard: StopGuard | None, state, epoch: int) -> bool:
    """At an epoch end, before anything is written: raise if the loss went non-finite in the epoch or the weights
    are not finite; True if a stop was asked (the caller writes the epoch-end checkpoint, then raises Preempted)."""
    stop = guard is not None and guard.poll(f"stage {state.stage}")
    check_finite_weights(state.model, state.dist, state.stage, epoch + 1, 0)
    return stop
