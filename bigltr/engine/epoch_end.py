"""What a stage does after each training epoch and after its last one: the one place for model selection.

After every epoch (`validate`, then `record`; called by bigltr.engine.loop.StageLoop): validation metrics and the
whole weights, the best-so-far decision on the balanced VALIDATION accuracy (never on test), the summary.csv row,
the tracker scalars, last.pt / best.pt, the log line, the epoch-end resume checkpoint, and the stop on request.
After the last epoch (`finish`): weight_norms.json, best.pt reloaded on every rank and evaluated on test, and on
val unless the val metrics best.pt stores (measured on those very weights at its epoch) are what that pass would
give again (Evaluator.reusable_val): they are then reported as they are, and the second val pass is skipped.

What differs between the stages comes in as data: extra summary columns and the log text (stage 2's MaxNorm
statistics), extra checkpoint fields (stage 2's maxnorm_radius), the val loader and a `features(split)` function
(stage 2's cached backbone features). An EMA of the weights or another selection metric goes here.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bigltr.atomic import write_bytes_atomic, write_json_atomic
from bigltr.checkpoint import load_run_checkpoint, save_checkpoint
from bigltr.config import to_dict
from bigltr.engine.context import RunContext
from bigltr.engine.device import peak_memory_mib
from bigltr.engine.evaluation import Evaluator
from bigltr.engine.resume import StageState
from bigltr.engine.stop import Preempted
from bigltr.engine.tracking import Tracking
from bigltr.models import build_model
from bigltr.objective.maxnorm import row_norms
from bigltr.rundir import StageDir

log = logging.getLogger("bigltr")


@dataclass
class Final:
    """The stage's end: val/test metrics of the best epoch's weights (`metrics`: results.json's val, test and
    posthoc entries) and what the stage reports with them."""
    metrics: dict
    best_epoch: int
    peak_memory_mib: float  # measured after the final evaluation: the stage's peak, evaluation included
    weight_norms: list[float]  # classifier row norms of the best epoch's weights
    eval_s: float  # seconds of the final val/test evaluation
    val_s: float  # seconds of the per-epoch validation
    val_reused: bool = False  # val metrics taken from best.pt (its epoch's validation), no second val pass


def val_text(val: dict | None) -> str:
    """The log's validation field: "val_all 74.90", or "no val" (protocol refit trains on val)."""
    return "no val" if val is None else f"val_all {val['all']:.2f}"


def write_weight_norms(out: Path, per_epoch: list, class_counts: list[int], extra: dict) -> None:
    """In stage folder `out`: weight_norms.npy, the classifier row norms of every epoch, float32 [epochs, classes]
    (36 MB at 100,000 classes x 90 epochs, where JSON took 89 MB); weight_norms.json, what they are, with a
    per-epoch summary (min / median / max) that reads at any class count. `bigltr.results.read_weight_norms` reads
    both forms."""
    import numpy as np

    stage_dir = StageDir(out)
    array = stage_dir.weight_norms_array
    a = np.stack([np.asarray(n, dtype=np.float32) for n in per_epoch]) if per_epoch else np.zeros((0, 0), np.float32)
    buf = io.BytesIO()
    np.save(buf, a)
    write_bytes_atomic(array, buf.getvalue())
    summary = [{"min": round(float(r.min()), 6), "median": round(float(np.median(r)), 6), "max": round(float(r.max()), 6)}
               for r in a]
    write_json_atomic(stage_dir.weight_norms, {"class_counts": class_counts, "per_epoch_file": array.name,
                                               "shape": list(a.shape), "per_epoch_summary": summary, **extra})


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


class EpochEnd:
    def __init__(self, ctx: RunContext, prog: StageState, *, out: Path, epochs: int, amp: str,
                 tracking: Tracking | None = None, checkpoint_extra: dict | None = None):
        """`prog`: the stage's StageState (its stage number, trainer and best-so-far); `out`: the stage's folder;
        `checkpoint_extra`: fields last.pt / best.pt carry besides the weights (stage 2: maxnorm_radius)."""
        self.ctx, self.prog, self.out, self.epochs, self.amp = ctx, prog, out, epochs, amp
        self.files = StageDir(out)
        self.stage = prog.stage
        self.tracking = tracking or Tracking()
        self.checkpoint_extra = checkpoint_extra or {}
        self.summary = CsvLog(self.files.summary, resume=prog.resumed) if ctx.is_main else None
        self.evaluator = Evaluator(ctx)

    def validate(self, model, val_loader) -> tuple[dict | None, dict]:
        """(validation metrics, whole state dict) of `model` (bigltr.engine.evaluation.Evaluator.validate)."""
        return self.evaluator.validate(model, val_loader, self.amp)

    @property
    def val_s(self) -> float:
        """Seconds spent in per-epoch validation."""
        return self.evaluator.val_s

    def is_best(self, epoch: int, val_all: float | None) -> bool:
        """Whether epoch `epoch` (1-based) is the new best, and if so remember it: the highest balanced validation
        accuracy so far; `val_all` None (protocol refit, no selection): every epoch is, so the last one is kept."""
        best = self.prog.best
        if val_all is None or best is None or best[1] is None or val_all > best[1]:
            self.prog.best = (epoch, val_all)
            return True
        return False

    def record(self, epoch: int, tr: dict, val: dict, state_model: dict, *, columns: dict, text: str,
               stop_now: bool) -> None:
        """Everything after validation of epoch `epoch` (0-based). `tr`: train_epoch's numbers (+ data losses);
        `columns`: the stage's own summary.csv columns, after the shared ones; `text`: the log line after
        "stageN epoch e/E". Collective (the resume checkpoint); raises Preempted after it when `stop_now`."""
        ctx, prog = self.ctx, self.prog
        prog.norms_per_epoch.append(row_norms(state_model["classifier.weight"]).float().cpu())  # [C] per epoch
        # holdout: the best val accuracy so far; refit: every epoch replaces best.pt, the last one is kept
        is_best = self.is_best(epoch + 1, val["all"] if val is not None and ctx.cfg.protocol == "holdout" else None)
        measured, val = val, val or {"all": None, "many": None, "medium": None, "few": None}
        if ctx.is_main:
            row = {"epoch": epoch + 1, "lr": prog.trainer.optimizer.param_groups[0]["lr"], **tr,
                   "val_all": val["all"], "val_many": val["many"], "val_medium": val["medium"], "val_few": val["few"],
                   **columns}
            self.summary.write(row)
            self.tracking.log_epoch(self.stage, row)
            # weights only; optimizer, scheduler and data position live in the resume checkpoint (below)
            # val: this epoch's validation of these weights, reused by `finish` when they are selected
            state = {"stage": self.stage, "epoch": epoch + 1, "model": state_model, "val_all": val["all"],
                     "val": measured, "val_key": self.evaluator.eval_key(self.amp),
                     **self.checkpoint_extra, "config": to_dict(ctx.cfg),
                     **{k: ctx.info[k] for k in ("classes", "category_ids") if k in ctx.info}}  # bigltr-eval checks
            save_checkpoint(state, self.files.last)
            if is_best:
                save_checkpoint(state, self.files.best)
        log.info(f"stage{self.stage} epoch {epoch + 1}/{self.epochs} {text}{' *best' if is_best else ''}")
        prog.checkpoint(epoch + 1, 0)
        if stop_now:
            raise Preempted(f"stage {self.stage} stopped at the end of epoch {epoch + 1}")

    def finish(self, batch_size: int, *, features: Callable | None = None, norms_extra: dict | None = None) -> Final:
        """After the last epoch: weight_norms.json (per-epoch row norms, + `norms_extra`), then best.pt reloaded
        on every rank and evaluated on val and test (`features(split)`: cached backbone features, stage 2)."""
        ctx, cfg, prog = self.ctx, self.ctx.cfg, self.prog
        if ctx.is_main:
            write_weight_norms(self.out, prog.norms_per_epoch, ctx.class_counts, norms_extra or {})
        ctx.dist.barrier()  # best.pt is complete before any rank reads it
        final = build_model(cfg.model.name, ctx.num_classes, in_chans=cfg.data.in_chans).to(ctx.device)
        best = load_run_checkpoint(self.files.best, strict=False)
        final.load_state_dict(best["model"])
        val = self.evaluator.reusable_val(best, self.amp)  # the same on every rank: they all read the same best.pt
        if val is not None:
            log.info(f"stage{self.stage}: val metrics of epoch {best.get('epoch')} reused for best.pt (same weights, "
                     f"same evaluation); only test is evaluated")
        t = time.perf_counter()
        metrics = self.evaluator.final(final, batch_size, self.amp, features=features, val=val)
        eval_s = time.perf_counter() - t
        result = Final(metrics=metrics, best_epoch=prog.best[0], peak_memory_mib=round(peak_memory_mib(ctx.device), 1),
                       weight_norms=[round(n, 6) for n in row_norms(final.classifier.weight).tolist()], eval_s=eval_s,
                       val_s=self.val_s,
                       val_reused=val is not None)
        if ctx.is_main:
            self.tracking.log_final(self.stage, metrics, result.best_epoch, step=self.epochs)
        return result
