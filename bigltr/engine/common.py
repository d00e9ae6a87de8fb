"""Pieces both stages share: optimiser and schedule, the training epoch, evaluation, per-epoch logging.

The training loop keeps the hot path free of host synchronisation: loss and accuracy are accumulated on the
device and read only every `log_every` steps and at epoch end.
"""
from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

log = logging.getLogger("bigltr")


# ---------------------------------------------------------------------------------------------- precision
# (the device itself: bigltr.distributed.resolve_device, shared with Dist.setup)
def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise RuntimeError("amp=fp16 needs a CUDA device; use amp=bf16 on CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------- optimiser / schedule
def param_groups(model: nn.Module, weight_decay: float, scope: str) -> list[dict]:
    """scope 'all': decay every trainable parameter (official code); 'no_norm_bias': skip 1-D params (timm)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if scope == "all" or weight_decay == 0:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    if scope != "no_norm_bias":
        raise ValueError(f"unknown weight-decay scope '{scope}' (all, no_norm_bias)")
    decay = [p for _, p in params if p.ndim > 1]
    no_decay = [p for _, p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_sgd(groups: list[dict], lr: float, momentum: float, wd_p: float = 2.0) -> torch.optim.SGD:
    """SGD with coupled weight decay. wd_p = 2: torch.optim.SGD itself (its own L2 decay, bit for bit);
    otherwise LpSGD, whose decay is the gradient of (weight_decay / wd_p) * sum |w|^wd_p."""
    if wd_p == 2:
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    from bigltr.objective.lp_decay import LpSGD

    return LpSGD(groups, lr=lr, momentum=momentum, wd_p=wd_p)


def cosine_schedule(optimizer, total_steps: int, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step cosine from the base LR to 0, after an optional linear warm-up (stepped after every update)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------- loops
def _progress(iterable, total: int, desc: str):
    # A bar on a terminal; in logs (CI, Slurm) the per-epoch lines say enough.
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty())


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
    bar = _progress(loader, total, desc)
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


def optimizer_steps(batches: int, accum_steps: int) -> int:
    return math.ceil(batches / accum_steps)


def peak_memory_mib(device: torch.device) -> float:
    """Peak RSS of this process on CPU; peak allocated device memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@torch.no_grad()
def evaluate(*, backbone: nn.Module, classifiers: dict[str, nn.Module], loader, num_classes: int,
             device: torch.device, amp: str = "none", tta_flip: bool = False, desc: str = "eval",
             dist=None) -> dict:
    """Per-class (correct, total) for each named classifier on one backbone pass over `loader`.

    Distributed (`dist.distributed`): every rank predicts its own shards, predictions are gathered by sample key
    and de-duplicated (the loader pads short ranks with repeated batches), so each sample counts exactly once
    and the result equals the single-process evaluation.
    A loader with `yields_features` (bigltr.engine.feature_cache.EvalFeatures: stage 2 with a frozen backbone)
    yields backbone features instead of images; `backbone` is then not run.
    """
    exact = dist is not None and dist.distributed
    correct = {k: torch.zeros(num_classes, dtype=torch.long, device=device) for k in classifiers}
    total = torch.zeros(num_classes, dtype=torch.long, device=device)
    records = {}  # key -> (label, {classifier: pred}) when distributed
    cached = getattr(loader, "yields_features", False)  # EvalFeatures: backbone features computed once
    for images, labels, keys in _progress(loader, len(loader), desc):
        labels = labels.to(device, non_blocking=True)
        if cached:  # (centre, flipped or None): the flipped view comes from flipped images, as below
            feats, feats_flip = (None if v is None else v.to(device, non_blocking=True) for v in images)
            if tta_flip and feats_flip is None:
                raise ValueError(f"{desc}: eval.tta_flip needs cached features of the flipped images")
            feats_flip = feats_flip if tta_flip else None
        else:
            images = images.to(device, non_blocking=True)
            with autocast(device, amp):
                feats = backbone(images)
                feats_flip = backbone(torch.flip(images, dims=[3])) if tta_flip else None
        preds = {}
        for name, clf in classifiers.items():
            logits = clf(feats.float())
            if feats_flip is not None:
                logits = (logits + clf(feats_flip.float())) / 2  # flip-TTA averages logits (official code)
            preds[name] = logits.argmax(1)
        if exact:
            cpu = {k: p.tolist() for k, p in preds.items()}
            for i, (key, y) in enumerate(zip(keys, labels.tolist())):
                records[key] = (y, {k: cpu[k][i] for k in classifiers})
            continue
        total += torch.bincount(labels, minlength=num_classes)
        for name, p in preds.items():
            correct[name] += torch.bincount(labels[p == labels], minlength=num_classes)
    if exact:
        merged = {}
        for part in dist.gather_objects(records):
            merged.update(part)
        labels = torch.tensor([y for y, _ in merged.values()], dtype=torch.long)
        total = torch.bincount(labels, minlength=num_classes)
        for name in classifiers:
            p = torch.tensor([ps[name] for _, ps in merged.values()], dtype=torch.long)
            correct[name] = torch.bincount(labels[p == labels], minlength=num_classes)
    return {k: (correct[k].cpu(), total.cpu()) for k in classifiers}


# ---------------------------------------------------------------------------------------------- outputs
class CsvLog:
    """summary.csv, one row per epoch; the header is fixed by the first row (timm's summary.csv convention)."""

    def __init__(self, path: str | os.PathLike, resume: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume and self.path.exists():
            self.path.unlink()

    def write(self, row: dict) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
