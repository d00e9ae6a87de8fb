"""The training loop of both stages: one StageLoop owns the epoch sequence and model selection; a stage file only
builds its parts (StageParts).

Per epoch: the loader's epoch, the stage's train mode, `train_epoch` (its step hook: the rank-agreed stop request,
the non-finite-loss guard, the periodic resume checkpoint), the epoch-end stop check, the data-loss count, the
stage's after-epoch hook (stage 2's per-epoch MaxNorm), validation, then the record: the best-so-far decision on
the balanced VALIDATION accuracy (never on test), the summary.csv row, the tracker scalars, last.pt / best.pt, the
log line, the epoch-end resume checkpoint, and the stop on request. After the last epoch (`_finish`):
weight_norms.json, best.pt reloaded on every rank and evaluated on test, and on val unless the val metrics best.pt
stores (measured on those very weights at its epoch) are what that pass would give again (Evaluator.final). Resuming
(`resume=auto`) restores the newest readable resume checkpoint before the first epoch.

What differs between the stages comes in as data (StageParts): extra summary columns and the log text (stage 2's
MaxNorm statistics), extra checkpoint fields (stage 2's maxnorm_radius), the val loader and a `features(split)`
function (stage 2's cached backbone features). An EMA of the weights or another selection metric goes here.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from bigltr.checkpoint import load_run_checkpoint, save_checkpoint
from bigltr.config import BatchPlan, ConfigError, to_dict
from bigltr.data.errors import DataError
from bigltr.data.info import split_entry
from bigltr.engine.context import RunContext
from bigltr.engine.device import autocast, peak_memory_mib, progress
from bigltr.engine.evaluation import Evaluator
from bigltr.engine.records import CsvLog, Final, write_weight_norms
from bigltr.engine.resume import StageState, resume_candidates
from bigltr.engine.stop import Preempted, epoch_end_stop, step_hook
from bigltr.engine.tracking import Tracking
from bigltr.models import build_model
from bigltr.objective.maxnorm import row_norms
from bigltr.rundir import RunDir, StageDir

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
        self.ctx, self.parts, self.tracking = ctx, parts, tracking or Tracking()
        self.files = StageDir(RunDir(ctx.out).stage(parts.number).path)
        self.evaluator = Evaluator(ctx)
        self.eval_key = self.evaluator.eval_key(parts.amp)  # stored with each epoch's val result (best.pt)

    def run(self) -> tuple[Final, float]:
        """Train every remaining epoch, then evaluate best.pt: (the stage's Final, seconds of the epoch loop)."""
        ctx, p, cfg = self.ctx, self.parts, self.ctx.cfg
        state = StageState(self.files.path, p.number, to_dict(cfg), dist=ctx.dist, model=p.model,
                           trainer=p.trainer, scheduler=p.scheduler, stateful=p.stateful)
        state.restore_newest(resume_candidates(self.files.path) if cfg.resume == "auto" else [])
        self.state = state
        self.summary = CsvLog(self.files.summary, resume=state.resumed) if ctx.is_main else None
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
            tr.update(data_losses(ctx, p.train_loader))  # samples skipped (corrupt) or lost (short shard); may raise
            if p.after_epoch is not None:
                p.after_epoch()
            val, state_model = self.evaluator.validate(p.model, p.val_loader, p.amp)
            columns, text = p.report(tr, val, state_model)
            self._record(epoch, tr, val, state_model, columns=columns, text=text)
            if stop_now:
                raise Preempted(f"stage {p.number} stopped at the end of epoch {epoch + 1}")
        train_s = time.perf_counter() - t_start
        return self._finish(), train_s

    def is_best(self, epoch: int, val_all: float | None) -> bool:
        """Whether epoch `epoch` (1-based) is the new best, and if so remember it: the highest balanced validation
        accuracy so far; `val_all` None (protocol refit, no selection): every epoch is, so the last one is kept."""
        best = self.state.best
        if val_all is None or best is None or best[1] is None or val_all > best[1]:
            self.state.best = (epoch, val_all)
            return True
        return False

    def _record(self, epoch: int, tr: dict, val: dict | None, state_model: dict, *, columns: dict, text: str) -> None:
        """Everything after validation of epoch `epoch` (0-based). `tr`: train_epoch's numbers (+ data losses);
        `columns`: the stage's own summary.csv columns, after the shared ones; `text`: the log line after
        "stageN epoch e/E". Collective (the resume checkpoint)."""
        ctx, p, state = self.ctx, self.parts, self.state
        state.norms_per_epoch.append(row_norms(state_model["classifier.weight"]).float().cpu())  # [C] per epoch
        # holdout: the best val accuracy so far; refit: every epoch replaces best.pt, the last one is kept
        is_best = self.is_best(epoch + 1, val["all"] if val is not None and ctx.cfg.protocol == "holdout" else None)
        measured, val = val, val or {"all": None, "many": None, "medium": None, "few": None}
        if ctx.is_main:
            row = {"epoch": epoch + 1, "lr": p.trainer.optimizer.param_groups[0]["lr"], **tr,
                   "val_all": val["all"], "val_many": val["many"], "val_medium": val["medium"], "val_few": val["few"],
                   **columns}
            self.summary.write(row)
            self.tracking.log_epoch(p.number, row)
            # weights only; optimizer, scheduler and data position live in the resume checkpoint (below)
            # val: this epoch's validation of these weights, reused by `_finish` when they are selected
            ckpt = {"stage": p.number, "epoch": epoch + 1, "model": state_model, "val_all": val["all"],
                    "val": measured, "val_key": self.eval_key, **p.checkpoint_extra, "config": to_dict(ctx.cfg),
                    **{k: ctx.info[k] for k in ("classes", "category_ids") if k in ctx.info}}  # bigltr-eval checks
            save_checkpoint(ckpt, self.files.last)
            if is_best:
                save_checkpoint(ckpt, self.files.best)
        log.info(f"stage{p.number} epoch {epoch + 1}/{p.epochs} {text}{' *best' if is_best else ''}")
        state.checkpoint(epoch + 1, 0)

    def _finish(self) -> Final:
        """After the last epoch: weight_norms.json (per-epoch row norms, + the stage's `norms_extra`), then best.pt
        reloaded on every rank and evaluated on val and test (`features(split)`: cached backbone features, stage 2)."""
        ctx, cfg, p, state = self.ctx, self.ctx.cfg, self.parts, self.state
        if ctx.is_main:
            write_weight_norms(self.files.path, state.norms_per_epoch, ctx.class_counts, p.norms_extra)
        ctx.dist.barrier()  # best.pt is complete before any rank reads it
        final = build_model(cfg.model.name, ctx.num_classes, in_chans=cfg.data.in_chans).to(ctx.device)
        best = load_run_checkpoint(self.files.best, strict=False)
        final.load_state_dict(best["model"])
        t = time.perf_counter()
        metrics, val_reused = self.evaluator.final_of_best(final, best, p.plan.per_process, p.amp, features=p.features)
        eval_s = time.perf_counter() - t
        result = Final(metrics=metrics, best_epoch=state.best[0], peak_memory_mib=round(peak_memory_mib(ctx.device), 1),
                       weight_norms=[round(n, 6) for n in row_norms(final.classifier.weight).tolist()], eval_s=eval_s,
                       val_s=self.evaluator.val_s, val_reused=val_reused)
        if ctx.is_main:
            self.tracking.log_final(p.number, metrics, result.best_epoch, step=p.epochs)
        return result


def data_losses(ctx: RunContext, loader) -> dict:
    """Training samples skipped as corrupt or lost to a shard that ended early in the last epoch, summed over
    ranks. More than `data.max_skip_fraction` of the split stops the run (on every rank alike)."""
    local = torch.tensor([int(getattr(loader, "epoch_skipped", 0)), int(getattr(loader, "epoch_lost", 0))],
                         dtype=torch.long, device=ctx.device)
    skipped, lost = (int(v) for v in ctx.dist.all_reduce_(local, "sum").tolist())
    split = getattr(loader, "split", "train")
    total = split_entry(ctx.info, split)["num_samples"]
    limit = ctx.cfg.data.max_skip_fraction
    if skipped + lost > limit * total:
        raise DataError(f"{split} split of {ctx.cfg.data.root}: {skipped} corrupt sample(s) skipped and {lost} "
                        f"lost to shards that ended early in one epoch, {skipped + lost} of {total} > "
                        f"data.max_skip_fraction={limit}; check the shards with `tools/make_shards.py verify "
                        f"{ctx.cfg.data.root}`")
    return {"skipped": skipped, "lost": lost}


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


