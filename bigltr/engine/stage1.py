"""Stage 1: learn features. Whole network, plain cross-entropy, SGD + cosine LR, a tuned weight decay.

Builds the stage's parts (model, loaders, optimiser, loss) and hands them to the StageLoop (bigltr.engine.loop),
which trains, selects the best epoch on the balanced VALIDATION accuracy (never on test) and keeps best.pt/last.pt.
"""
from __future__ import annotations

import torch

from bigltr.config import batch_plan
from bigltr.engine.context import RunContext
from bigltr.engine.device import grad_scaler
from bigltr.engine.records import val_text
from bigltr.engine.loop import StageLoop, StageParts, steps_per_epoch
from bigltr.engine.optim import build_sgd, cosine_schedule, param_groups
from bigltr.engine.tracking import Tracking
from bigltr.models import build_model
from bigltr.objective.etf import ETFClassifier, FeaturePenalizedLoss
from bigltr.objective.losses import build_loss
from bigltr.objective.maxnorm import row_norms


def run_stage1(ctx: RunContext, tracking: Tracking | None = None) -> dict:
    cfg, s1, device, dist = ctx.cfg, ctx.cfg.stage1, ctx.device, ctx.dist
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
    steps = steps_per_epoch(train_loader, plan, "stage1", s1.batch_size)

    def groups():  # the ETF's bias is not decayed (Hasegawa & Sato decay the backbone only)
        if s1.classifier == "etf":
            return param_groups(model.backbone, s1.weight_decay, s1.wd_scope) + [
                {"params": [model.classifier.bias], "weight_decay": 0.0}]
        return param_groups(model, s1.weight_decay, s1.wd_scope)

    # DDP wrapper, FSDP2 sharding in place, or a DeepSpeed engine; the optimizer is made after sharding
    trainer = dist.prepare(model, lambda: build_sgd(groups(), s1.lr, s1.momentum, s1.wd_p), what="model",
                           scaler=grad_scaler(device, s1.amp), accum_steps=plan.accum_steps,
                           micro_batch_size=plan.per_process)
    loss_fn = build_loss(s1.loss, ctx.class_counts, la_tau=s1.la_tau)  # "ce": nn.CrossEntropyLoss
    if s1.feature_reg > 0:
        loss_fn = FeaturePenalizedLoss(loss_fn, model.classifier, s1.feature_reg)

    def report(tr, val, state_model):
        norms = row_norms(state_model["classifier.weight"])
        return ({"wnorm_min": float(norms.min()), "wnorm_max": float(norms.max())},
                f"loss {tr['train_loss']:.4f} train_acc {tr['train_acc']:.2f} {val_text(val)} "
                f"({tr['img_per_s']:.0f} img/s/rank)")

    parts = StageParts(
        number=1, model=model, trainer=trainer, forward=torch.compile(trainer) if s1.compile else trainer,
        scheduler=cosine_schedule(trainer.optimizer, s1.epochs * steps, s1.warmup_epochs * steps), loss_fn=loss_fn,
        train_loader=train_loader, val_loader=val_loader, plan=plan, epochs=s1.epochs, amp=s1.amp, report=report,
        channels_last=s1.channels_last,
        describe=f"stage 1: {cfg.model.name}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params "
                 f"(local), {train_loader.num_samples} train images/rank x {dist.world_size} rank(s), {steps} "
                 f"steps/epoch of {plan.describe()}, wd={s1.weight_decay} ({s1.wd_scope})")
    final, train_s = StageLoop(ctx, parts, tracking).run()
    return {**final.metrics, "best_epoch": final.best_epoch,
            "wall_time_s": {"train_incl_val": round(train_s, 2), "per_epoch_val": round(final.val_s, 2),
                            "final_eval": round(final.eval_s, 2)},
            "peak_memory_mib": final.peak_memory_mib, "weight_norms": final.weight_norms,
            "batch": plan.record(), "val_reused": final.val_reused}
