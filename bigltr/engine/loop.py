"""The training loop of both stages: one StageLoop owns the epoch sequence, a stage file only builds its parts.

Per epoch: the loader's epoch, the stage's train mode, `train_epoch` (its step hook: the rank-agreed stop request,
the non-finite-loss guard, the periodic resume checkpoint), the epoch-end stop check, the data-loss count, the
stage's after-epoch hook (stage 2's per-epoch MaxNorm), validation, then `EpochEnd.record` (best-so-far selection,
summary.csv, last.pt / best.pt, the epoch-end resume checkpoint). After the last epoch, `EpochEnd.finish` (best.pt
on val and test). Resuming (`resume=auto`) restores the newest readable resume checkpoint before the first epoch.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from bigltr.config import BatchPlan, ConfigError, to_dict
from bigltr.engine.context import RunContext
from bigltr.engine.device import autocast, progress
from bigltr.engine.epoch_end import EpochEnd, Final
from bigltr.engine.resume import StageState, resume_candidates
from bigltr.engine.stop import Preempted, epoch_end_stop, step_hook
from bigltr.engine.tracking import Tracking
from bigltr.rundir import RunDir

log = logging.getLogger("bigltr")


def steps_per_epoch(loader, plan: BatchPlan, key: str, batch_size: int) -> int:
    """Optimiser steps of one epoch; every step sees the global batch, so a trailing group of fewer than
    `plan.accum_steps` micro-batches is not trained. 0 steps is a ConfigError naming `key`."""
    steps = len(loader) // plan.accum_steps
    if steps == 0:
        raise ConfigError(f"{key}.batch_size={batch_size} gives 0 training steps per epoch: the train split has "
                          f"{loader.num_samples} image(s) per process and only full batches are trained "
                          f"({plan.describe()}); use a smaller batch size")
    return steps


@dataclass
class StageParts:
    """What a stage builds and hands to the loop."""
    number: int  # 1 or 2
    model: nn.Module  # the whole model (backbone + classifier): what best.pt holds and validation runs
    trainer: object  # the backend's Trainable (bigltr.distributed): backward, step, optimizer, scaler
    scheduler: object
    loss_fn: nn.Module
    train_loader: object
    val_loader: object | None  # None: protocol refit (val is trained on), no per-epoch validation
    plan: BatchPlan
    epochs: int
    amp: str
    report: Callable[[dict, dict | None, dict], tuple[dict, str]]  # (train numbers, val, weights) -> (summary
    #                                                                 columns after the shared ones, log text)
    describe: str  # the stage's start-up log line
    forward: Callable | None = None  # batch -> logits (default: the trainer)
    train_mode: Callable[[], None] | None = None  # modules into train/eval mode for an epoch (default model.train())
    after_step: Callable[[], None] | None = None
    after_epoch: Callable[[], None] | None = None
    channels_last: bool = False
    stateful: dict = field(default_factory=dict)  # more per-rank state for resume checkpoints
    checkpoint_extra: dict = field(default_factory=dict)  # fields last.pt / best.pt carry besides the weights
    features: Callable | None = None  # split -> cached eval features for the final evaluation (stage 2)
    norms_extra: dict = field(default_factory=dict)  # weight_norms.json fields (stage 2: the MaxNorm radius)


class StageLoop:
    def __init__(self, ctx: RunContext, parts: StageParts, tracking: Tracking | None = None):
        self.ctx, self.parts, self.tracking = ctx, parts, tracking

    def run(self) -> tuple[Final, float]:
        """Train every remaining epoch, then evaluate best.pt: (the stage's Final, seconds of the epoch loop)."""
        ctx, p, cfg = self.ctx, self.parts, self.ctx.cfg
        out = RunDir(ctx.out).stage(p.number).path
        state = StageState(out, p.number, to_dict(cfg), dist=ctx.dist, model=p.model, trainer=p.trainer,
                           scheduler=p.scheduler, stateful=p.stateful)
        state.restore_newest(resume_candidates(out) if cfg.resume == "auto" else [])
        ends = EpochEnd(ctx, state, out=out, epochs=p.epochs, amp=p.amp, tracking=self.tracking,
                        checkpoint_extra=p.checkpoint_extra)
        log.info(p.describe)
        name = f"stage{p.number}"
        t_start = time.perf_counter()
        for epoch in range(state.epoch, p.epochs):
            p.train_loader.set_epoch(epoch)
            (p.train_mode or p.model.train)()
            tr = train_epoch(trainer=p.trainer, forward=p.forward, loader=p.train_loader, loss_fn=p.loss_fn,
                             scheduler=p.scheduler, device=ctx.device, amp=p.amp, log_every=cfg.log_every,
                             after_step=p.after_step, desc=f"{name} {epoch + 1}/{p.epochs}",
                             accum_steps=p.plan.accum_steps, channels_last=p.channels_last,
                             start_batch=state.start_batch(epoch),
                             step_hook=lambda b, e=epoch: step_hook(ctx.stop, state, cfg.ckpt_every_steps, e, b),
                             guard=ctx.stop, epoch=epoch, tally=state.tally)
            if tr["stopped"]:
                raise Preempted(f"stage {p.number} stopped at epoch {epoch + 1}, batch {tr['batches']}")
            stop_now = epoch_end_stop(ctx.stop, state, epoch)  # raises on a non-finite loss: nothing is written
            tr.update(ctx.data_losses(p.train_loader))  # samples skipped (corrupt) or lost (short shard); may raise
            if p.after_epoch is not None:
                p.after_epoch()
            val, state_model = ends.validate(p.model, p.val_loader)
            columns, text = p.report(tr, val, state_model)
            ends.record(epoch, tr, val, state_model, stop_now=stop_now, columns=columns, text=text)
        train_s = time.perf_counter() - t_start
        return ends.finish(p.plan.per_process, features=p.features, norms_extra=p.norms_extra), train_s


def train_epoch(*, trainer, loader, loss_fn: nn.Module, scheduler, device: torch.device, amp: str,
                forward: Callable | None = None, after_step: Callable[[], None] | None = None, log_every: int = 50,
                desc: str = "train", accum_steps: int = 1, channels_last: bool = False, start_batch: int = 0,
                step_hook: Callable[[int], bool] | None = None, guard=None, epoch: int = 0,
                tally: dict | None = None) -> dict:
    """One pass over `loader`. `trainer` is the backend's Trainable (`bigltr.distributed`): backward and step;
    `forward(x)` returns logits (default: the trainer itself; stage 2 passes a frozen-backbone forward).

    With accum_steps = k, gradients of k consecutive batches are summed (each loss scaled by 1/k) before one
    optimiser step; a trailing group of fewer than k batches is read but not trained, so that every step sees the
    same global batch (`bigltr.config.batch_plan`). `after_step` runs after each step.
    Resuming: the first `start_batch` batches are read and skipped (the order is deterministic per epoch).
    `step_hook(batches_done)` runs after each optimiser step; if it returns True the epoch stops there.
    `guard.observe(loss, epoch, batch)` (the run's StopGuard) records a non-finite loss on the device, without a sync.
    `tally` (the stage's `StageState.tally`, carried by resume checkpoints): the epoch's running loss sum, correct
    count, samples and steps, kept current before each `step_hook` (references to the device tensors, no sync); a
    resumed epoch (`start_batch` = `tally["batches"]`) starts from them, so its numbers are those of the whole epoch.
    """
    forward = forward or trainer
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, batches, steps, start = 0, 0, 0, time.perf_counter()
    if tally is not None and start_batch and tally.get("batches") == start_batch:  # resumed mid-epoch
        loss_sum += tally["loss_sum"].to(device)
        correct += tally["correct"].to(device)
        seen, steps = int(tally["seen"]), int(tally["steps"])
    seen_before = seen  # samples of this epoch trained before a resume (not in this call's img/s)
    stopped = False
    total = len(loader)
    trained = total - total % accum_steps  # batches past this are read (the stream's counters stay whole), not trained
    bar = progress(loader, total, desc)
    trainer.zero_grad()
    for images, labels, _keys in bar:
        if batches < start_batch or batches >= trained:
            batches += 1
            continue
        images = images.to(device, non_blocking=True)
        if channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = forward(images)
            loss = loss_fn(logits, labels)
        if guard is not None:
            guard.observe(loss, epoch, batches)
        boundary = (batches + 1) % accum_steps == 0
        trainer.backward(loss / accum_steps if accum_steps > 1 else loss, boundary)
        batches += 1
        loss_sum += loss.detach() * labels.shape[0]
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += labels.shape[0]
        if boundary:
            trainer.step()
            scheduler.step()
            steps += 1
            if after_step is not None:
                after_step()
            if tally is not None:  # what a checkpoint written by step_hook carries
                tally.update(loss_sum=loss_sum, correct=correct, seen=seen, steps=steps, batches=batches)
            stopped = step_hook is not None and step_hook(batches)
        if batches % log_every == 0 and not bar.disable:
            bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}")  # the only read inside the loop
        if stopped:
            break
    elapsed = time.perf_counter() - start
    if seen == 0 and (stopped or start_batch >= trained):  # a resumed epoch has its carried tally
        return {"train_loss": float("nan"), "train_acc": float("nan"), "steps": 0, "samples": 0,
                "epoch_time_s": elapsed, "img_per_s": 0.0, "stopped": stopped, "batches": batches}
    if seen == 0:
        raise RuntimeError(f"{desc}: the training loader yielded no batch (check batch_size against the split size)")
    return {"train_loss": float(loss_sum) / seen, "train_acc": 100.0 * float(correct) / seen, "steps": steps,
            "samples": seen, "epoch_time_s": elapsed, "img_per_s": (seen - seen_before) / max(elapsed, 1e-9),
            "stopped": stopped, "batches": batches}


