"""bigltr-eval: evaluate any bigltr checkpoint on any split of a shard folder.

    bigltr-eval CHECKPOINT data.root=DIR [split=test] [key=value ...] [--json PATH]

CHECKPOINT is a run's `stage{1,2}/best.pt` or `last.pt`. The model (model.name, data.in_chans) and the eval transform
(data.img_size, data.mean, data.std), the class-group thresholds (data.many_thr, data.few_thr), eval.tta_flip /
eval.posthoc and the stage's batch_size / amp come from the config saved in the checkpoint; any config key given as
key=value replaces them (`bigltr-train --help` lists the keys). Classes are grouped by the training counts of
DIR/_info.json. Prints the Many / Medium / Few / All table (balanced top-1, %); `--json PATH` also writes the
split's metrics at the top level, exactly as a run's results.json holds them under `stageN.<split>`
(`{"all", "many", "medium", "few", "per_class", "num_samples", "samples"}`), beside what was evaluated
(`checkpoint`, `stage`, `epoch`, `model`, `data_root`, `split`, `many_thr`, `few_thr`, `groups`, `warnings`) and,
with eval.posthoc, `"posthoc": {"method", "tau", "<split>": {...}}` as in results.json. (Files written before this
layout nested the metrics under "metrics": `read_eval_json` reads both.)

The checkpoint's class names (and iNat category ids), stored in best.pt / last.pt at training time, must equal
DIR/_info.json's, index by index: the same class count in another order would otherwise give regrouped numbers. A
checkpoint from an older bigltr without them is evaluated with a warning that its class order cannot be checked.

The numbers equal the run's own results.json for the same checkpoint and split (same evaluation code), except for a
stage 2 trained with stage2.features=cached, whose final evaluation ran on cached (by default bf16) features.

Exit codes: 0 done; 2 bad input (missing file, not a bigltr checkpoint, class-count or class-order mismatch, bad
key, bad data); 3 the checkpoint's weights are non-finite (nan/inf; the message names the first such tensor).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from bigltr.config import parse_overrides
from bigltr.config import Config, ConfigError
from bigltr.errors import BadInputError, fail

PROG = "bigltr-eval"


class EvalError(BadInputError):
    """Bad input to bigltr-eval (a split the data lacks, a class-count mismatch, no such device), said in one line."""


# ----------------------------------------------------------------------------------------------- evaluation
# what an evaluation's result holds besides the split's metrics (which sit at its top level, as in results.json)
ABOUT_KEYS = ("checkpoint", "stage", "epoch", "model", "data_root", "split", "many_thr", "few_thr", "groups",
              "posthoc", "warnings")


def split_metrics(result: dict) -> dict:
    """The split's metrics of an evaluation result (`{"all", "many", "medium", "few", "per_class", ...}`)."""
    return {k: v for k, v in result.items() if k not in ABOUT_KEYS}


def read_eval_json(path: str | Path) -> dict:
    """A `bigltr-eval --json` file in the current layout (metrics at the top level, posthoc metrics under the split's
    name); a file of the older layout (`"metrics": {...}`, `"posthoc": {..., "metrics": {...}}`) is converted.
    Unreadable or not a JSON object: BadInputError."""
    try:
        r = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"{path} is not a readable bigltr-eval JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(r, dict):
        raise BadInputError(f"{path} does not hold a JSON object")
    if isinstance(r.get("metrics"), dict):
        r = {**{k: v for k, v in r.items() if k != "metrics"}, **r["metrics"]}
        ph = r.get("posthoc")
        if isinstance(ph, dict) and isinstance(ph.get("metrics"), dict):
            r["posthoc"] = {**{k: v for k, v in ph.items() if k != "metrics"}, str(r.get("split")): ph["metrics"]}
    return r


def evaluate_checkpoint(path: str | Path, overrides: dict[str, Any] | None = None, split: str = "test") -> dict:
    """Metrics of one checkpoint on one split, in the `--json` layout: the split's metrics as in results.json
    (`split_metrics`) + {"checkpoint", "stage", "epoch", "model", "data_root", "split", "many_thr", "few_thr",
    "groups", "warnings", ["posthoc": {"method", "tau", split: metrics}]}."""
    from bigltr.checkpoint import (
        checkpoint_classes, checkpoint_config, checkpoint_stage, class_mismatch, load_run_checkpoint)
    from bigltr.data.info import read_info
    from bigltr.distributed import Dist, resolve_device
    from bigltr.engine.context import RunContext
    from bigltr.engine.evaluation import Evaluator
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
    warnings = []
    if checkpoint_classes(ckpt) is None:
        warnings.append(f"{path} stores no class names (saved by an older bigltr): cannot check that its classes are "
                        f"those of {cfg.data.root}/_info.json, in the same order")
    elif why := class_mismatch(ckpt, info):
        raise EvalError(f"class mismatch: {why} ({path} vs {cfg.data.root}/_info.json); the model's outputs would "
                        f"be scored against other classes: give the data.root the model was trained on")
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
        classifiers["posthoc"] = posthoc_classifier(model.classifier, cfg.eval.posthoc, cfg.eval.posthoc_tau,
                                                    class_counts=ctx.class_counts)
    loader = ctx.loader(split, train=False, batch_size=stage_cfg.batch_size)
    metrics = Evaluator(ctx).split(model.backbone, classifiers, loader, stage_cfg.amp, f"eval {split}",
                                   tta_flip=cfg.eval.tta_flip)
    groups = class_groups(ctx.group_counts, cfg.data.many_thr, cfg.data.few_thr)
    result = {"checkpoint": str(path), "stage": stage, "epoch": ckpt.get("epoch"), "model": cfg.model.name,
              "data_root": cfg.data.root, "split": split, "many_thr": cfg.data.many_thr, "few_thr": cfg.data.few_thr,
              "groups": {k: len(v) for k, v in groups.items()}, "warnings": warnings,
              **metrics["model"]}
    if "posthoc" in metrics:
        result["posthoc"] = {"method": cfg.eval.posthoc, "tau": cfg.eval.posthoc_tau, split: metrics["posthoc"]}
    return result


def tau_sweep(cfg: Config, checkpoint: str | Path, taus: Sequence[float], splits: Sequence[str] = ("val", "test"),
              method: str = "tau_norm") -> dict[str, dict[float, dict]]:
    """Metrics of one checkpoint's post-hoc classifier `method` (tau_norm: w_c / ||w_c||**tau; la, mla: logit
    adjustment; bigltr.objective.posthoc) for every tau of `taus`, on each split: {split: {tau: metrics}}. One
    backbone pass per split evaluates every tau: pick tau on val, read test once.
    `cfg` gives the model, the data and the evaluation settings (bigltr-ablation: the config of the stage-1 run);
    images go in batches of cfg.stage1.batch_size."""
    import torch

    from bigltr.checkpoint import load_run_checkpoint
    from bigltr.distributed import Dist, resolve_device
    from bigltr.engine.context import RunContext
    from bigltr.engine.evaluation import Evaluator, evaluate
    from bigltr.models import build_checkpoint_model
    from bigltr.objective.posthoc import posthoc_classifier

    device = resolve_device(cfg.device)
    ctx = RunContext.create(cfg, Dist("ddp", device=device))
    model = build_checkpoint_model(load_run_checkpoint(checkpoint), cfg, checkpoint).to(device)
    evaluator = Evaluator(ctx)
    clfs = {t: posthoc_classifier(model.classifier, method, t, class_counts=ctx.class_counts) for t in taus}
    out = {}
    for split in splits:
        counts = evaluate(backbone=model.backbone, classifiers=clfs, num_classes=ctx.num_classes, device=device,
                          loader=ctx.loader(split, train=False, batch_size=cfg.stage1.batch_size),
                          tta_flip=cfg.eval.tta_flip)
        out[split] = {t: evaluator.metrics(*v) for t, v in counts.items()}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def format_result(r: dict) -> str:
    from bigltr.metrics import format_table

    m, g = split_metrics(r), r["groups"]
    name = f"stage {r['stage']}, epoch {r['epoch']}"
    rows = {name: m}
    if "posthoc" in r:
        rows[f"{name} + {r['posthoc']['method']} (tau {r['posthoc']['tau']:g})"] = r["posthoc"][r["split"]]
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
    ap.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH: the split's metrics at "
                    "the top level, as results.json holds them under stageN.<split>, and what was evaluated")
    args = ap.parse_args(argv)
    from bigltr.checkpoint import EXIT_NON_FINITE, CheckpointError, NonFiniteWeightsError
    from bigltr.data.errors import DataError

    try:
        overrides = parse_overrides(args.overrides)
        split = str(overrides.pop("split", "test"))
        result = evaluate_checkpoint(args.checkpoint, overrides, split)
    except ConfigError as e:
        return fail(PROG, f"config error: {e}")
    except DataError as e:  # also a missing data folder (DataMissingError)
        return fail(PROG, f"data error: {e}")
    except NonFiniteWeightsError as e:
        return fail(PROG, str(e), EXIT_NON_FINITE)
    except (FileNotFoundError, CheckpointError, BadInputError) as e:
        return fail(PROG, str(e))
    for w in result["warnings"]:
        print(f"{PROG}: warning: {w}", file=sys.stderr)
    print(format_result(result))
    if args.json:
        from bigltr.atomic import write_json_atomic

        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
