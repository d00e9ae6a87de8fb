"""Stage 2: learn the classifier. Backbone frozen; class-balanced loss, weight decay and MaxNorm.

Loads stage 1's best checkpoint, builds the stage's parts and hands them to the StageLoop (bigltr.engine.loop). Only `model.classifier` (weight and bias) is trained. The backbone runs under
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
from bigltr.config import ConfigError, batch_plan, cache_amp
from bigltr.engine.context import RunContext
from bigltr.engine.device import autocast, grad_scaler
from bigltr.engine.records import val_text
from bigltr.engine.feature_cache import EvalFeatures, FeatureCache
from bigltr.engine.loop import StageLoop, StageParts, data_losses, steps_per_epoch
from bigltr.engine.optim import build_sgd, cosine_schedule
from bigltr.engine.tracking import Tracking
from bigltr.models import build_model
from bigltr.objective.fused_sgd import SGDMaxNorm
from bigltr.objective.losses import build_loss
from bigltr.objective.lws import LWSClassifier
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
    lws = s2.classifier == "lws"
    if lws:  # LWS: stage 1's rows frozen, one scale per class trains; its state_dict is the folded nn.Linear
        model.classifier = LWSClassifier(model.classifier)
    model.backbone.requires_grad_(False)

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
        data_losses(ctx, train_loader)  # images the build skipped: over data.max_skip_fraction stops before training
        train_loader.sampler = s2.sampler
        if s2.sampler == "class_balanced" and dist.distributed:  # one global balanced sequence: every rank's rows
            train_loader.gather(dist, seed=cfg.seed)
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
        # class_balanced: single images drawn by offset from the shards (BalancedShardLoader), one global sequence
        train_loader = ctx.loader(ctx.train_split, train=True, batch_size=plan.per_process,
                                  balanced=s2.sampler == "class_balanced")
        val_loader = ctx.loader("val", train=False, batch_size=plan.per_process) if ctx.has_val else None
        eval_features = None  # the final evaluation reads the images
    steps = steps_per_epoch(train_loader, plan, "stage2", s2.batch_size)
    clf = model.classifier

    def make_optimizer():  # called by the backend after sharding (FSDP2 rows are DTensors by then)
        # Weight decay on the classifier's weight and bias (both trainable params), as the official code.
        if mn.fused:  # the step projects the weight itself
            return SGDMaxNorm([{"params": [clf.weight], "radius": radius, "tau": mn.tau, "projection": mn.projection},
                               {"params": [clf.bias]}],
                              lr=s2.lr, momentum=s2.momentum, weight_decay=s2.weight_decay, wd_p=s2.wd_p)
        # (lws: the scales only, decayed towards 0 as in Kang et al.'s code)
        return build_sgd([{"params": [p for p in clf.parameters() if p.requires_grad],
                           "weight_decay": s2.weight_decay}], s2.lr, s2.momentum, s2.wd_p)

    # DDP(classifier), the FSDP2 row-sharded classifier, or a DeepSpeed engine over the classifier
    trainer = dist.prepare(clf, make_optimizer, what="classifier", scaler=grad_scaler(device, s2.amp),
                           accum_steps=plan.accum_steps, micro_batch_size=plan.per_process)
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

    def train_mode():  # the backbone stays in eval mode (frozen statistics) unless bn_mode=train (official code)
        model.eval()
        if s2.bn_mode == "train":
            model.backbone.train()
        model.classifier.train()

    def report(tr, val, state_model):
        m = maxnorm.stats(state_model["classifier.weight"], dist=dist if dist.rows_sharded else None)
        return ({"maxnorm_radius": m.radius, "maxnorm_clipped_rows": -1 if mn.fused else m.clipped_rows,
                 "maxnorm_rows_at_radius": m.rows_at_radius, "maxnorm_applications": m.applications,
                 "wnorm_min": m.norm_min, "wnorm_mean": m.norm_mean, "wnorm_max": m.norm_max},
                f"loss {tr['train_loss']:.4f} {val_text(val)} | MaxNorm radius {radius:.4f} "
                + ("fused into SGD" if mn.fused else
                   f"clipped {m.clipped_rows} rows in {m.applications} projections")
                + f", {m.rows_at_radius} rows at the radius, norms {m.norm_min:.4f}..{m.norm_max:.4f}")

    parts = StageParts(
        number=2, model=model, trainer=trainer, forward=forward, scheduler=cosine_schedule(trainer.optimizer,
                                                                                             s2.epochs * steps),
        loss_fn=loss_fn, train_loader=train_loader, val_loader=val_loader, plan=plan, epochs=s2.epochs, amp=s2.amp,
        report=report, train_mode=train_mode,
        # on the local rows (FSDP2), or on the fp32 master and the weights (DeepSpeed)
        after_step=None if lws else lambda: maxnorm.after_step(clf.weight, dist.row_projector),
        after_epoch=None if lws else lambda: maxnorm.after_epoch(clf.weight, dist.row_projector),
        stateful={"maxnorm": maxnorm, **({"lws": clf.scale_state()} if lws else {})},  # lws: the scales, exactly
        checkpoint_extra={"maxnorm_radius": radius}, features=eval_features,
        norms_extra={"radius": radius},
        describe=f"stage 2: loss {s2.loss}, wd {s2.weight_decay}, MaxNorm {mn.when} radius {radius:.4f} "
                 f"({mn.radius_mode} {mn.radius}), BN {s2.bn_mode}, classifier {s2.classifier_init}"
                 f"{' (LWS: per-class scales only)' if lws else ''}, {steps} "
                 f"steps/epoch of {plan.describe()}")
    final, train_s = StageLoop(ctx, parts, tracking).run()
    return {**final.metrics, "best_epoch": final.best_epoch, "maxnorm_radius": radius, "features": s2.features,
            "peak_memory_mib": final.peak_memory_mib,
            "wall_time_s": {"train_incl_val": round(train_s, 2), "feature_cache_build": round(cache_s, 2),
                            "per_epoch_val": round(final.val_s, 2), "final_eval": round(final.eval_s, 2)},
            "weight_norms": final.weight_norms, "batch": plan.record(),
            "val_reused": final.val_reused}
