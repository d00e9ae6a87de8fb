"""Stage 2: learn the classifier. Backbone frozen; class-balanced loss, weight decay and MaxNorm.

Loads stage 1's best checkpoint. Only `model.classifier` (weight and bias) is trained. The backbone runs under
no_grad; its BatchNorm layers are in eval mode (frozen statistics, default) or train mode (official code: the
running statistics keep moving). MaxNorm projects every class row into the ball of radius delta after every
optimiser step (paper) or once per epoch (official code); per epoch the radius, the rows it clipped and the
spread of row norms are logged so a user can see whether the constraint binds.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from bigltr.checkpoint import NotRunCheckpointError, load_run_checkpoint
from bigltr.config import ConfigError, batch_plan, cache_amp, to_dict
from bigltr.engine.common import autocast, build_sgd, cosine_schedule, freeze, train_epoch
from bigltr.engine.context import RunContext
from bigltr.engine.epoch_end import EpochEnd, val_text
from bigltr.engine.feature_cache import EvalFeatures, FeatureCache
from bigltr.engine.resume import Preempted, StageState, epoch_end_stop, resume_candidates, step_hook
from bigltr.engine.tracking import Tracking
from bigltr.models import build_model
from bigltr.objective.fused_sgd import SGDMaxNorm
from bigltr.objective.losses import build_loss
from bigltr.objective.maxnorm import MaxNorm, resolve_radius
from bigltr.rundir import RunDir

log = logging.getLogger("bigltr")


def cache_key(cfg, stage1_checkpoint: str) -> dict:
    """What the cached features depend on: the stage-1 weights, the data and transform, the views."""
    st = os.stat(stage1_checkpoint)
    c = cfg.stage2.cache
    return {"checkpoint": os.path.abspath(stage1_checkpoint), "checkpoint_mtime_ns": st.st_mtime_ns,
            "checkpoint_size": st.st_size, "data": {**vars(cfg.data), "root": os.path.abspath(cfg.data.root)},
            "model": cfg.model.name, "views": c.views, "num_aug": c.num_aug, "dtype": c.dtype, "seed": cfg.seed,
            "amp": cache_amp(cfg)}


def eval_cache_key(cfg, stage1_checkpoint: str, split: str, dist, per_process: int) -> dict:
    """The key of a val/test split's cached features: `cache_key` with the eval views (centre, plus its flip for
    eval.tta_flip) and what decides this rank's eval batches (batch size, rank, world size)."""
    key = {k: v for k, v in cache_key(cfg, stage1_checkpoint).items() if k not in ("views", "num_aug")}
    return {**key, "split": split, "views": "center_flip" if cfg.eval.tta_flip else "center",
            "batch_size": per_process, "rank": dist.rank, "world_size": dist.world_size}


def run_stage2(ctx: RunContext, stage1_checkpoint: str, tracking: Tracking | None = None) -> dict:
    cfg, s2, device, dist = ctx.cfg, ctx.cfg.stage2, ctx.device, ctx.dist
    stage_dir = RunDir(ctx.out).stage(2)
    out = stage_dir.path
    plan = batch_plan(s2, dist.world_size, "stage2")
    model = build_model(cfg.model.name, ctx.num_classes, in_chans=cfg.data.in_chans, pretrained=False)
    try:
        ckpt = load_run_checkpoint(stage1_checkpoint, strict=False)
    except NotRunCheckpointError:
        raise ConfigError(f"{stage1_checkpoint} is not a bigltr checkpoint (no 'model' entry)") from None
    if ckpt.get("stage", 1) != 1:
        raise ConfigError(f"{stage1_checkpoint} is a stage-{ckpt.get('stage')} checkpoint; stage 2 starts from stage "
                          f"1's weights (<out>/stage1/best.pt)")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ConfigError(f"stage-1 checkpoint {stage1_checkpoint} does not match model.name={cfg.model.name} "
                          f"with {ctx.num_classes} classes: {str(e).splitlines()[0]}") from None
    model.to(device)
    stage1_weight = model.classifier.weight.detach().clone()
    if s2.classifier_init == "reinit":
        model.classifier.reset_parameters()
    freeze(model.backbone)

    mn = s2.maxnorm
    radius = resolve_radius(stage1_weight, mn.radius_mode, mn.radius)
    maxnorm = MaxNorm(radius, tau=mn.tau, when=mn.when, projection=mn.projection)
    loss_fn = build_loss(s2.loss, ctx.class_counts, s2.cb_beta, la_tau=s2.la_tau).to(device)

    t_start = time.perf_counter()
    cache_s = 0.0
    if s2.features == "cached":
        c = s2.cache
        cache_dir = Path(c.dir) if c.dir else stage_dir.feature_cache
        if dist.distributed:  # each rank caches the features of its own part of the data
            cache_dir = cache_dir / f"rank{dist.rank}-of-{dist.world_size}"
        train_loader = FeatureCache.build(
            model.backbone,
            lambda augment: ctx.loader(ctx.train_split, train=False, batch_size=plan.per_process, augment=augment),
            views=c.views, num_aug=c.num_aug, dtype=c.dtype, location=c.location, directory=cache_dir, device=device,
            batch_size=plan.per_process, seed=cfg.seed + dist.rank, amp_ctx=lambda: autocast(device, cache_amp(cfg)),
            key={**cache_key(cfg, stage1_checkpoint), "split": ctx.train_split})
        # every rank must take the same number of steps: visit at most the smallest rank's sample count
        train_loader.limit(int(dist.all_reduce_(torch.tensor(train_loader.num_samples), "min")))
        ctx.data_losses(train_loader)  # images the build skipped: over data.max_skip_fraction stops before training
        train_loader.sampler = s2.sampler
        if device.type == "cuda" and c.location == "memory":
            train_loader.to(device)  # features then never cross the host link again
        built = {}

        # split -> EvalFeatures: the frozen backbone's eval features, cached too: val once (per-epoch and final
        # validation), test at the final evaluation
        def eval_features(split):
            if split not in built:
                built[split] = EvalFeatures.build(
                    model.backbone, ctx.loader(split, train=False, batch_size=plan.per_process), flip=cfg.eval.tta_flip,
                    dtype=c.dtype, location=c.location, directory=cache_dir, device=device,
                    amp_ctx=lambda: autocast(device, cache_amp(cfg)),
                    key=eval_cache_key(cfg, stage1_checkpoint, split, dist, plan.per_process))
            return built[split]

        val_loader = eval_features("val") if ctx.has_val else None
        cache_s = time.perf_counter() - t_start
    else:
        train_loader = ctx.loader(ctx.train_split, train=True, batch_size=plan.per_process)
        val_loader = ctx.loader("val", train=False, batch_size=plan.per_process) if ctx.has_val else None
        eval_features = None  # the final evaluation reads the images
    steps = len(train_loader) // plan.accum_steps  # every step sees the global batch (trailing micro-batches unused)
    if steps == 0:
        raise ConfigError(f"stage2.batch_size={s2.batch_size} gives 0 training steps per epoch: the train split has "
                          f"{train_loader.num_samples} image(s) per process and only full batches are trained "
                          f"({plan.describe()}); use a smaller batch size")
    scaler = torch.amp.GradScaler(device.type) if s2.amp == "fp16" else None
    clf = model.classifier

    def make_optimizer():  # called by the backend after sharding (FSDP2 rows are DTensors by then)
        # Weight decay on the classifier's weight and bias (both trainable params), as the official code.
        if mn.fused:  # the step projects the weight itself
            return SGDMaxNorm([{"params": [clf.weight], "radius": radius, "tau": mn.tau, "projection": mn.projection},
                               {"params": [clf.bias]}],
                              lr=s2.lr, momentum=s2.momentum, weight_decay=s2.weight_decay, wd_p=s2.wd_p)
        return build_sgd([{"params": list(clf.parameters()), "weight_decay": s2.weight_decay}], s2.lr, s2.momentum,
                         s2.wd_p)

    # DDP(classifier), the FSDP2 row-sharded classifier, or a DeepSpeed engine over the classifier
    trainer = dist.prepare(clf, make_optimizer, what="classifier", scaler=scaler, accum_steps=plan.accum_steps,
                           micro_batch_size=plan.per_process)
    if mn.fused:
        maxnorm = MaxNorm(radius, tau=mn.tau, when="off", projection=mn.projection)  # the MaxNorm object only reports

    if s2.features == "cached":
        def forward(feats):
            return trainer(feats.float())
    else:
        def forward(images):
            with torch.no_grad():
                feats = model.backbone(images)
            return trainer(feats.float())

    scheduler = cosine_schedule(trainer.optimizer, s2.epochs * steps)
    prog = StageState(out, 2, to_dict(cfg), dist=dist, model=model, trainer=trainer, scheduler=scheduler,
                    stateful={"maxnorm": maxnorm}).restore_newest(
        resume_candidates(out) if cfg.resume == "auto" else [])
    ends = EpochEnd(ctx, prog, out=out, epochs=s2.epochs, amp=s2.amp, tracking=tracking,
                    checkpoint_extra={"maxnorm_radius": radius})
    log.info(f"stage 2: loss {s2.loss}, wd {s2.weight_decay}, MaxNorm {mn.when} radius {radius:.4f} "
             f"({mn.radius_mode} {mn.radius}), BN {s2.bn_mode}, classifier {s2.classifier_init}, {steps} "
             f"steps/epoch of {plan.describe()}")
    for epoch in range(prog.epoch, s2.epochs):
        train_loader.set_epoch(epoch)
        model.eval()
        if s2.bn_mode == "train":
            model.backbone.train()
        model.classifier.train()
        tr = train_epoch(trainer=trainer, forward=forward, loader=train_loader, loss_fn=loss_fn,
                         scheduler=scheduler, device=device, amp=s2.amp, log_every=cfg.log_every,
                         # on the local rows (FSDP2), or on the fp32 master and the weights (DeepSpeed)
                         after_step=lambda: maxnorm.after_step(clf.weight, dist.row_projector),
                         desc=f"stage2 {epoch + 1}/{s2.epochs}", accum_steps=plan.accum_steps,
                         start_batch=prog.start_batch(epoch),
                         step_hook=lambda b, e=epoch: step_hook(ctx, prog, e, b), guard=ctx.stop, epoch=epoch,
                         tally=prog.tally)
        if tr["stopped"]:
            raise Preempted(f"stage 2 stopped at epoch {epoch + 1}, batch {tr['batches']}")
        stop_now = epoch_end_stop(ctx, prog, epoch)  # raises if the loss went non-finite: nothing below is written then
        tr.update(ctx.data_losses(train_loader))  # samples skipped (corrupt) or lost (short shard); may raise
        maxnorm.after_epoch(clf.weight, dist.row_projector)
        val, state_model = ends.validate(model, val_loader)
        mstats = maxnorm.stats(state_model["classifier.weight"], dist=dist if dist.rows_sharded else None)
        ends.record(epoch, tr, val, state_model, stop_now=stop_now,
                    columns={"maxnorm_radius": mstats.radius,
                             "maxnorm_clipped_rows": -1 if mn.fused else mstats.clipped_rows,
                             "maxnorm_rows_at_radius": mstats.rows_at_radius,
                             "maxnorm_applications": mstats.applications, "wnorm_min": mstats.norm_min,
                             "wnorm_mean": mstats.norm_mean, "wnorm_max": mstats.norm_max},
                    text=f"loss {tr['train_loss']:.4f} {val_text(val)} | MaxNorm radius {radius:.4f} "
                         + ("fused into SGD" if mn.fused else
                            f"clipped {mstats.clipped_rows} rows in {mstats.applications} projections")
                         + f", {mstats.rows_at_radius} rows at the radius, norms {mstats.norm_min:.4f}.."
                           f"{mstats.norm_max:.4f}")
    train_s = time.perf_counter() - t_start
    final = ends.finish(plan.per_process, features=eval_features, norms_extra={"radius": radius})
    return {**final.metrics, "best_epoch": final.best_epoch, "maxnorm_radius": radius, "features": s2.features,
            "peak_memory_mib": final.peak_memory_mib,
            "wall_time_s": {"train_incl_val": round(train_s, 2), "feature_cache_build": round(cache_s, 2),
                            "per_epoch_val": round(ends.val_s, 2), "final_eval": round(final.eval_s, 2)},
            "weight_norms": final.weight_norms, "batch": plan.record(),
            "val_reused": final.val_reused}
