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
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from bigltr.cli import parse_overrides
from bigltr.config import Config, ConfigError, config_from_dict

EXIT_BAD_INPUT = 2


class EvalError(ValueError):
    """Bad input to bigltr-eval / bigltr-export, said in one line."""


# ----------------------------------------------------------------------------------------------- checkpoints
def load_run_checkpoint(path: str | Path) -> dict:
    """A run's best.pt / last.pt: {"stage", "epoch", "model": state_dict, "val_all", "config"}, read safely
    (bigltr.checkpoint.load_checkpoint: tensors and plain values only). Anything else: EvalError."""
    from bigltr.checkpoint import load_checkpoint

    path = Path(path)
    if path.is_dir():
        raise EvalError(f"{path} is a folder; give a checkpoint file such as RUN/stage2/best.pt (resume "
                        f"checkpoints under stage*/resume/ are not model checkpoints)")
    ckpt = load_checkpoint(path)  # FileNotFoundError / CheckpointError name the path
    model = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(model, dict) or not isinstance(ckpt.get("config"), dict) or "classifier.weight" not in model:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise EvalError(f"{path} is not a bigltr model checkpoint (expected a run's stage1/ or stage2/ best.pt or "
                        f"last.pt, with 'model' holding classifier.weight and 'config'; found {keys})")
    return ckpt


def _known_keys(data: dict, cls=Config) -> dict:
    """The part of a saved config that the current schema knows (a checkpoint from an older bigltr may carry keys
    that were renamed or removed since: they cannot matter to evaluation and are dropped)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            if isinstance(data[f.name], dict):
                out[f.name] = _known_keys(data[f.name], hints[f.name])
        else:
            out[f.name] = data[f.name]
    return out


def checkpoint_config(ckpt: dict, overrides: dict[str, Any] | None = None, *, where: str = "checkpoint") -> Config:
    """The run's config saved in the checkpoint, with dotted `overrides` applied and everything validated."""
    return config_from_dict(_known_keys(ckpt["config"]), overrides, where=where)


def checkpoint_stage(ckpt: dict) -> int:
    stage = ckpt.get("stage")
    return stage if stage in (1, 2) else 1


def build_checkpoint_model(ckpt: dict, cfg: Config, path: str | Path):
    """bigltr's LTModel (backbone + classifier) holding the checkpoint's weights, in eval mode, on the CPU."""
    from bigltr.models import build_model

    num_classes = int(ckpt["model"]["classifier.weight"].shape[0])
    model = build_model(cfg.model.name, num_classes, in_chans=cfg.data.in_chans, pretrained=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise EvalError(f"{path}: the weights do not fit model.name={cfg.model.name} with data.in_chans="
                        f"{cfg.data.in_chans} and {num_classes} classes: {str(e).splitlines()[0]}") from None
    return model.eval()


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate_checkpoint(path: str | Path, overrides: dict[str, Any] | None = None, split: str = "test") -> dict:
    """Metrics of one checkpoint on one split: {"checkpoint", "stage", "epoch", "model", "data_root", "split",
    "many_thr", "few_thr", "groups", "metrics", ["posthoc"]}; "metrics" as in results.json."""
    from bigltr.data.info import read_info
    from bigltr.distributed import Dist, resolve_device
    from bigltr.engine.common import evaluate
    from bigltr.engine.context import RunContext
    from bigltr.metrics import class_groups
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
    ap = argparse.ArgumentParser(prog="bigltr-eval", description=__doc__,
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
        return _fail(f"config error: {e}")
    except DataError as e:  # also a missing data folder (DataMissingError)
        return _fail(f"data error: {e}")
    except (FileNotFoundError, CheckpointError, EvalError) as e:
        return _fail(str(e))
    print(format_result(result))
    if args.json:
        from bigltr.atomic import write_json_atomic

        write_json_atomic(args.json, result)
    return 0


def _fail(message: str) -> int:
    print(f"bigltr-eval: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
