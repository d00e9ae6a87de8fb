"""Stage 1: learn features. Whole network, plain cross-entropy, SGD + cosine LR, a tuned weight decay.

The best epoch is chosen on the balanced VALIDATION accuracy (never on test); best.pt and last.pt are kept
(bigltr.engine.epoch_end, shared with stage 2).
"""
from __future__ import annotations

import logging
import time

import torch

from bigltr.config import ConfigError, batch_plan, to_dict
from bigltr.engine.common import build_sgd, cosine_schedule, param_groups, train_epoch
from bigltr.engine.context import RunContext
from bigltr.engine.epoch_end import EpochEnd, val_text
from bigltr.engine.resume import Preempted, StageState, epoch_end_stop, resume_candidates, step_hook
from bigltr.engine.tracking import Tracking
from bigltr.models import build_model
from bigltr.objective.etf import ETFClassifier, FeaturePenalizedLoss
from bigltr.objective.losses import build_loss
from bigltr.objective.maxnorm import row_norms
from bigltr.rundir import RunDir

log = logging.getLogger("bigltr")


def run_stage1(ctx: RunContext, tracking: Tracking | None = None) -> dict:
    cfg, s1, device, dist = ctx.cfg, ctx.cfg.stage1, ctx.device, ctx.dist
    out = RunDir(ctx.out).stage(1).path
    model = build_model(cfg.model.name, ctx.num_classes, in_chans=cfg.data.in_chans,
                        pretrained=cfg.model.pretrained, drop_rate=cfg.model.drop_rate)
    if s1.classifier == "etf":  # one-stage weight balancing: a fixed simplex ETF, only its bias trains
        model.classifier = ETFClassifier(model.backbone.num_features, ctx.num_classes, seed=cfg.seed)
    model = model.to(device)
    if s1.channels_last:
        model = model.to(memory_format=torch.channels_last)
    plan = batch_plan(s1, dist.world_size, "stage1")
    train_loader = ctx.loader(ctx.train_split, train=True, batch_size=plan.per_process)
    val_loader = ctx.loader("val", train=False, batch_size=plan.per_process) if ctx.has_val else None
    if len(train_loader) < plan.accum_steps:
        raise ConfigError(f"stage1.batch_size={s1.batch_size} gives 0 training steps per epoch: the train split has "
                          f"{train_loader.num_samples} image(s) per process and only full batches are trained "
                          f"({plan.describe()}); use a smaller batch size")
    # a trailing group of fewer than accum_steps micro-batches is not trained: every step sees the global batch
    steps = len(train_loader) // plan.accum_steps
    scaler = torch.amp.GradScaler(device.type) if s1.amp == "fp16" else None
    # DDP wrapper, FSDP2 sharding in place, or a DeepSpeed engine; the optimizer is made after sharding
    def groups():  # the ETF's bias is not decayed (Hasegawa & Sato decay the backbone only)
        if s1.classifier == "etf":
            return param_groups(model.backbone, s1.weight_decay, s1.wd_scope) + [
                {"params": [model.classifier.bias], "weight_decay": 0.0}]
        return param_groups(model, s1.weight_decay, s1.wd_scope)

    trainer = dist.prepare(model, lambda: build_sgd(groups(), s1.lr, s1.momentum, s1.wd_p),
                           what="model", scaler=scaler, accum_steps=plan.accum_steps, micro_batch_size=plan.per_process)
    forward = torch.compile(trainer) if s1.compile else trainer
    scheduler = cosine_schedule(trainer.optimizer, s1.epochs * steps, s1.warmup_epochs * steps)
    loss_fn = build_loss(s1.loss, ctx.class_counts, la_tau=s1.la_tau)  # "ce": nn.CrossEntropyLoss
    if s1.feature_reg > 0:
        loss_fn = FeaturePenalizedLoss(loss_fn, model.classifier, s1.feature_reg)
    prog = StageState(out, 1, to_dict(cfg), dist=dist, model=model, trainer=trainer,
                      scheduler=scheduler).restore_newest(resume_candidates(out) if cfg.resume == "auto" else [])
    ends = EpochEnd(ctx, prog, out=out, epochs=s1.epochs, amp=s1.amp, tracking=tracking)
    log.info(f"stage 1: {cfg.model.name}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params "
             f"(local), {train_loader.num_samples} train images/rank x {dist.world_size} rank(s), {steps} "
             f"steps/epoch of {plan.describe()}, "
             f"wd={s1.weight_decay} ({s1.wd_scope})")
    t_start = time.perf_counter()
    for epoch in range(prog.epoch, s1.epochs):
        train_loader.set_epoch(epoch)
        model.train()
        tr = train_epoch(trainer=trainer, forward=forward, loader=train_loader, loss_fn=loss_fn,
                         scheduler=scheduler, device=device, amp=s1.amp, log_every=cfg.log_every,
                         desc=f"stage1 {epoch + 1}/{s1.epochs}", accum_steps=plan.accum_steps,
                         channels_last=s1.channels_last, start_batch=prog.start_batch(epoch),
                         step_hook=lambda b, e=epoch: step_hook(ctx, prog, e, b), guard=ctx.stop, epoch=epoch,
                         tally=prog.tally)
        if tr["stopped"]:
            raise Preempted(f"stage 1 stopped at epoch {epoch + 1}, batch {tr['batches']}")
        stop_now = epoch_end_stop(ctx, prog, epoch)  # raises if the loss went non-finite: nothing below is written then
        tr.update(ctx.data_losses(train_loader))  # samples skipped (corrupt) or lost (short shard); may raise
        val, state_model = ends.validate(model, val_loader)
        norms = row_norms(state_model["classifier.weight"])
        ends.record(epoch, tr, val, state_model, stop_now=stop_now,
                    columns={"wnorm_min": float(norms.min()), "wnorm_max": float(norms.max())},
                    text=f"loss {tr['train_loss']:.4f} train_acc {tr['train_acc']:.2f} {val_text(val)} "
                         f"({tr['img_per_s']:.0f} img/s/rank)")
    train_s = time.perf_counter() - t_start
    final = ends.finish(plan.per_process)  # weight_norms.json; best.pt's val/test metrics
    return {**final.metrics, "best_epoch": final.best_epoch, "wall_time_s": {"train_incl_val": round(train_s, 2)},
            "peak_memory_mib": final.peak_memory_mib, "weight_norms": final.weight_norms,
            "batch": plan.record(), "val_reused": final.val_reused}
