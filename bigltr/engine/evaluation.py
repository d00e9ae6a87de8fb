"""Evaluation, one place: the per-class counting pass, group metrics with the completeness check, the per-epoch
validation, and the final evaluation of a stage's best weights (val and test, flip-TTA, a post-hoc classifier).

Used by both stages (bigltr.engine.loop.StageLoop) and by bigltr-eval (bigltr.evaluate). A loader may yield images or
cached backbone features (bigltr.engine.feature_cache.EvalFeatures: stage 2 with a frozen backbone, whose backbone
then does not run).
"""
from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn as nn

from bigltr.engine.context import RunContext
from bigltr.engine.device import autocast, progress
from bigltr.metrics import summarize
from bigltr.data.errors import DataError
from bigltr.objective.posthoc import posthoc_classifier
from bigltr.results import pack_per_class

log = logging.getLogger("bigltr")


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
    for images, labels, keys in progress(loader, len(loader), desc):
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


class Evaluator:
    """The run's evaluation: metrics of named classifiers on one split, checked for completeness."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.val_s = 0.0  # seconds spent in per-epoch validation (`validate`)

    def split(self, backbone, classifiers: dict, split_loader, amp: str, desc: str, tta_flip: bool = False) -> dict:
        """Metrics per named classifier on one split (exact under several ranks)."""
        ctx = self.ctx
        out = evaluate(backbone=backbone, classifiers=classifiers, loader=split_loader, num_classes=ctx.num_classes,
                       device=ctx.device, amp=amp, tta_flip=tta_flip, desc=desc, dist=ctx.dist)
        return {k: self.metrics(*v, split=split_loader.split) for k, v in out.items()}

    def validate(self, model, val_loader, amp: str) -> tuple[dict | None, dict]:
        """(validation metrics, whole state dict) of `model` after an epoch: what the selection sees and
        last.pt/best.pt hold. `val_loader` None (protocol refit trains on val): no validation, the metrics are None."""
        model.eval()
        if val_loader is None:
            return None, self.ctx.dist.full_state_dict(model)
        t = time.perf_counter()
        val = self.split(model.backbone, {"m": model.classifier}, val_loader, amp, "val")["m"]
        self.val_s += time.perf_counter() - t
        # whole weights on every rank (a collective under FSDP2/ZeRO-3)
        return val, self.ctx.dist.full_state_dict(model)

    def metrics(self, correct: torch.Tensor, total: torch.Tensor, split: str | None = None) -> dict:
        """Group accuracies; with `split`, also checks that every sample of the split was evaluated: a partial
        val/test set is an error unless data.eval_partial, and is then reported as "N of M"."""
        m = summarize(correct, total, self.ctx.group_counts, self.ctx.cfg.data.many_thr, self.ctx.cfg.data.few_thr)
        m["per_class"] = pack_per_class(m["per_class"], total)  # arrays, small at 100k classes (bigltr.results)
        if split is None:
            return m
        n, expected = int(total.sum()), int(self.ctx.info["splits"][split]["num_samples"])
        m["samples"] = n
        if n < expected:
            if not self.ctx.cfg.data.eval_partial:
                raise DataError(f"{split} split of {self.ctx.cfg.data.root}: only {n} of {expected} samples could be "
                                f"evaluated (truncated shard or corrupt images); results over a partial {split} set "
                                f"are not comparable. Repair the shards (`tools/make_shards.py verify "
                                f"{self.ctx.cfg.data.root}`) or set data.eval_partial=true to report them as "
                                f"'{n} of {expected}'")
            m["expected_samples"] = expected
        return m


    def eval_key(self, amp: str) -> dict:
        """What a per-epoch validation result depends on besides the weights: stored with it in best.pt, so that the
        final evaluation reuses it only when it would compute the same numbers (`reusable_val`)."""
        d = self.ctx.cfg.data
        return {"data": os.path.abspath(d.root), "world_size": self.ctx.dist.world_size, "amp": amp,
                "eval_partial": d.eval_partial, "many_thr": d.many_thr, "few_thr": d.few_thr}

    def reusable_val(self, ckpt: dict, amp: str) -> dict | None:
        """The validation metrics stored in checkpoint `ckpt` (best.pt) when the final evaluation would measure the
        same numbers again: same weights (they are that checkpoint's), same data and conditions (`eval_key`), and
        a final evaluation that adds nothing to the per-epoch one (no flip-TTA, no post-hoc classifier, which
        both change the val numbers). Else None: the val pass runs."""
        ev = self.ctx.cfg.eval
        val = ckpt.get("val")
        if not isinstance(val, dict) or ev.tta_flip or ev.posthoc != "none":
            return None
        return val if ckpt.get("val_key") == self.eval_key(amp) else None

    def final_of_best(self, model, best: dict, batch_size: int, amp: str, features=None) -> tuple[dict, bool]:
        """(`final` metrics of `model`, whether val was reused): `model` holds the weights of checkpoint `best`
        (best.pt), whose stored val metrics are reported as they are when `reusable_val` allows it."""
        val = self.reusable_val(best, amp)  # the same on every rank: they all read the same best.pt
        if val is not None:
            log.info(f"stage{best.get('stage')}: val metrics of epoch {best.get('epoch')} reused for best.pt (same "
                     f"weights, same evaluation); only test is evaluated")
        return self.final(model, batch_size, amp, features=features, val=val), val is not None

    def final(self, model, batch_size: int, amp: str, features=None, val: dict | None = None) -> dict:
        """Val and test metrics of `model` (and of its post-hoc normalised classifier when configured).
        `features(split)`, when given, returns the split's cached backbone features (EvalFeatures, stage 2 with a
        frozen backbone): only the classifiers then run. `val`: this model's validation metrics, already measured
        (`reusable_val`): the val pass is skipped and they are reported as they are."""
        ev = self.ctx.cfg.eval
        classifiers = {"model": model.classifier}
        if ev.posthoc != "none":
            classifiers["posthoc"] = posthoc_classifier(model.classifier, ev.posthoc, ev.posthoc_tau,
                                                        class_counts=self.ctx.class_counts)
        model.eval()
        res = {}
        if val is not None:
            if "posthoc" in classifiers:
                raise ValueError("Evaluator.final: a reused val result has no post-hoc metrics; pass val=None")
            res["val"] = val
        for split in ("val", "test") if val is None and self.ctx.has_val else ("test",):
            loader = features(split) if features else self.ctx.loader(split, train=False, batch_size=batch_size)
            out = evaluate(backbone=model.backbone, classifiers=classifiers, loader=loader,
                           num_classes=self.ctx.num_classes, device=self.ctx.device, amp=amp, tta_flip=ev.tta_flip,
                           desc=f"eval {split}", dist=self.ctx.dist)
            res[split] = self.metrics(*out["model"], split=split)
            if "posthoc" in out:
                res.setdefault("posthoc", {"method": ev.posthoc, "tau": ev.posthoc_tau})[split] = \
                    self.metrics(*out["posthoc"], split=split)
        return res
