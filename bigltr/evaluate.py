"""bigltr-eval: evaluate any bigltr checkpoint on any split of a shard folder.

    bigltr-eval CHECKPOINT data.root=DIR [split=test] [key=value ...] [--json PATH]

CHECKPOINT is a run's `stage{1,2}/best.pt` or `last.pt`. The model (model.name, data.in_chans) and the eval transform
(data.img_size, data.mean, data.std), the class-group thresholds (data.many_thr, data.few_thr), eval.tta_flip /
eval.posthoc and the stage's batch_size / amp come from the config saved in the checkpoint; any config key given as
key=value replaces them (`bigltr-train --help` lists the keys). Classes are grouped by the training counts of
DIR/_info.json. Prints the Many / Medium / Few / All table (balanced top-1, %); `--json PATH` also writes the
metrics, in the layout of a run's results.json (`{"all", "many", "medium", "few", "per_class", ...}`).

The numbers equal the run's own results.json for the same checkpoint and split (same evaluation code), except for a
stage 2 trained with stage2.features=cached, whose final evaluation ran on cached (by default bf16) features.

Exit codes: 0 done; 2 bad input (missing file, not a bigltr checkpoint, class-count mismatch, bad key, bad data).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from bigltr.cli import parse_overrides
from bigltr.config import Config, ConfigError
from bigltr.errors import BadInputError, fail

PROG = "bigltr-eval"


class EvalError(BadInputError):
    """Bad input to bigltr-eval (a split the data lacks, a class-count mismatch, no such device), said in one line."""


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate_checkpoint(path: str | Path, overrides: dict[str, Any] | None = None, split: str = "test") -> dict:
    """Metrics of one checkpoint on one split: {"checkpoint", "stage", "epoch", "model", "data_root", "split",
    "many_thr", "few_thr", "groups", "metrics", ["posthoc"]}; "metrics" as in results.json."""
    from bigltr.checkpoint import checkpoint_config, checkpoint_stage, load_run_checkpoint
    from bigltr.data.info import read_info
    from bigltr.distributed import Dist, resolve_device
    from bigltr.engine.common import evaluate
    from bigltr.engine.context import RunContext
    from bigltr.metrics import class_groups
    from bigltr.models import build_checkpoint_model
    from bigltr.objective.posthoc import posthoc_classifier

    path = Path(path)
    ckpt = load_run_checkpoint(path)
    cfg = checkpoint_config(ckpt, overrides, where=f"config saved in {path}")
    info = read_info(cfg.data.root)
    if split not in info["splits"]:
        raise EvalError(f"split={split}: {cfg.data.root}/_info.json has the splits {sorted(info['splits'])}")
    num_classes = int(ckpt["model"]["classifier.weight"].shape[0])
    if num_classes != len(info["class_counts"]):
        raise EvalError(f"class-count mismatch: {path} has {num_classes} classes, {cfg.data.root}/_info.json has "
                        f"{len(info['class_counts'])}; give the data.root the model was trained on")
    try:
        device = resolve_device(cfg.device)
    except RuntimeError as e:
        raise EvalError(str(e)) from None
    dist = Dist("ddp", device=device)
    ctx = RunContext(cfg=cfg, device=device, info=info, out=path.parent, dist=dist)
    model = build_checkpoint_model(ckpt, cfg, path).to(device)
    stage = checkpoint_stage(ckpt)
    stage_cfg = cfg.stage1 if stage == 1 else cfg.stage2
    classifiers = {"model": model.classifier}
    if cfg.eval.posthoc != "none":
        classifiers["posthoc"] = posthoc_classifier(model.classifier, cfg.eval.posthoc, cfg.eval.posthoc_tau)
    loader = ctx.loader(split, train=False, batch_size=stage_cfg.batch_size)
    counts = evaluate(backbone=model.backbone, classifiers=classifiers, loader=loader, num_classes=num_classes,
                      device=device, amp=stage_cfg.amp, tta_flip=cfg.eval.tta_flip, desc=f"eval {split}", dist=dist)
    groups = class_groups(ctx.class_counts, cfg.data.many_thr, cfg.data.few_thr)
    result = {"checkpoint": str(path), "stage": stage, "epoch": ckpt.get("epoch"), "model": cfg.model.name,
              "data_root": cfg.data.root, "split": split, "many_thr": cfg.data.many_thr, "few_thr": cfg.data.few_thr,
              "groups": {k: len(v) for k, v in groups.items()}, "metrics": ctx.metrics(*counts["model"], split=split)}
    if "posthoc" in counts:
        result["posthoc"] = {"method": cfg.eval.posthoc, "tau": cfg.eval.posthoc_tau,
                             "metrics": ctx.metrics(*counts["posthoc"], split=split)}
    return result


def tau_sweep(cfg: Config, checkpoint: str | Path, taus: Sequence[float], splits: Sequence[str] = ("val", "test")
              ) -> dict[str, dict[float, dict]]:
    """Metrics of one checkpoint's classifier tau-normalised (w_c / ||w_c||**tau, bigltr.objective.posthoc) for
    every tau of `taus`, on each split: {split: {tau: metrics}}. One backbone pass per split evaluates every tau.
    `cfg` gives the model, the data and the evaluation settings (bigltr-ablation: the config of the stage-1 run);
    images go in batches of cfg.stage1.batch_size."""
    import torch

    from bigltr.checkpoint import load_run_checkpoint
    from bigltr.distributed import Dist, resolve_device
    from bigltr.engine.common import evaluate
    from bigltr.engine.context import RunContext
    from bigltr.models import build_checkpoint_model
    from bigltr.objective.posthoc import posthoc_classifier

    device = resolve_device(cfg.device)
    ctx = RunContext.create(cfg, Dist("ddp", device=device))
    model = build_checkpoint_model(load_run_checkpoint(checkpoint), cfg, checkpoint).to(device)
    clfs = {t: posthoc_classifier(model.classifier, "tau_norm", t) for t in taus}
    out = {}
    for split in splits:
        counts = evaluate(backbone=model.backbone, classifiers=clfs, num_classes=ctx.num_classes, device=device,
                          loader=ctx.loader(split, train=False, batch_size=cfg.stage1.batch_size),
                          tta_flip=cfg.eval.tta_flip)
        out[split] = {t: ctx.metrics(*v) for t, v in counts.items()}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def format_result(r: dict) -> str:
    from bigltr.metrics import format_table

    m, g = r["metrics"], r["groups"]
    name = f"stage {r['stage']}, epoch {r['epoch']}"
    rows = {name: m}
    if "posthoc" in r:
        rows[f"{name} + {r['posthoc']['method']} (tau {r['posthoc']['tau']:g})"] = r["posthoc"]["metrics"]
    samples = f"{m['samples']} of {m['expected_samples']}" if "expected_samples" in m else str(m["samples"])
    return "\n".join([
        f"{r['checkpoint']} ({r['model']}) on {r['data_root']} split '{r['split']}': {samples} images",
        f"groups by training images: Many > {r['many_thr']} ({g['many']} classes), Medium ({g['medium']}), "
        f"Few < {r['few_thr']} ({g['few']})",
        "",
        format_table(rows, title=f"{r['split']} top-1 (%), balanced"),
    ])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a run's stage1/ or stage2/ best.pt or last.pt")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="split=NAME (default test), and any config key (data.root=DIR, ...)")
    ap.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")
    args = ap.parse_args(argv)
    from bigltr.checkpoint import CheckpointError
    from bigltr.data.errors import DataError

    try:
        overrides = parse_overrides(args.overrides)
        split = str(overrides.pop("split", "test"))
        result = evaluate_checkpoint(args.checkpoint, overrides, split)
    except ConfigError as e:
        return fail(PROG, f"config error: {e}")
    except DataError as e:  # also a missing data folder (DataMissingError)
        return fail(PROG, f"data error: {e}")
    except (FileNotFoundError, CheckpointError, BadInputError) as e:
        return fail(PROG, str(e))
    print(format_result(result))
    if args.json:
        from bigltr.atomic import write_json_atomic

        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
