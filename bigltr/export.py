"""bigltr-export: a trained bigltr model as a timm model folder (`model.safetensors` + `config.json`).

    bigltr-export RUN_DIR OUT [--stage 1|2] [--overwrite]

RUN_DIR is a run's out= folder (or a checkpoint file); the default stage is 2 when RUN_DIR/stage2/best.pt exists,
else 1. OUT gets exactly what timm's `save_for_hf` / `push_to_hf_hub` write, written by timm's own
`timm.models.save_for_hf`:

- `model.safetensors`: the weights under timm's key names for model.name. bigltr's model is `backbone` (the timm
  model built with num_classes=0) + `classifier` (nn.Linear); the backbone keys lose their `backbone.` prefix and
  the classifier lands on the timm model's own head (`model.get_classifier()`: `fc` for ResNets, `head.fc` for
  ConvNeXt, `head` for ViT, `classifier` for EfficientNet, ...).
- `config.json`: `architecture`, `num_classes`, `num_features`, `global_pool`, `label_names` (the dataset's class
  names), `model_args` (in_chans, num_classes), `pretrained_cfg` (input_size, mean, std, interpolation, crop_pct of
  bigltr's eval transform, first_conv, classifier), and a `bigltr` block (source checkpoint, stage, epoch,
  training class counts and group thresholds).

Load it with timm (gives the same logits as bigltr's model; checked by the export itself before it writes):

    model = timm.create_model("local-dir:OUT", pretrained=True)
    # or by name: the overlay must carry num_classes, or timm discards the classifier as not matching
    model = timm.create_model(NAME, pretrained=True, num_classes=C, in_chans=K,
                              pretrained_cfg_overlay=dict(file="OUT/model.safetensors", num_classes=C))

bigltr's CIFAR ResNets (resnet32_cifar, resnet34_cifar) are registered with timm's registry by bigltr.models:
`import bigltr.models` before loading them.

OUT must be a new or empty folder: an existing file is refused, and so is a folder that holds anything unless
--overwrite is given (then model.safetensors and config.json are replaced, each atomically, and nothing else in OUT
is touched).

Exit codes: 0 done; 2 bad input (no checkpoint, not a bigltr checkpoint, a model timm cannot hold the classifier of,
OUT a file or a non-empty folder without --overwrite); 3 the checkpoint's weights are non-finite (nan/inf; the
message names the first such tensor).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from bigltr.config import ConfigError
from bigltr.errors import BadInputError, fail
from bigltr.results import read_results
from bigltr.rundir import RunDir

PROG = "bigltr-export"
BIGLTR_MODELS = ("resnet32_cifar", "resnet34_cifar")
# pretrained_cfg entries that describe the source of timm's published weights (ImageNet tags, papers, licences,
# test-time sizes): they do not describe a model trained by bigltr, so they are not copied into the export.
_SOURCE_KEYS = ("tag", "license", "origin_url", "paper_ids", "paper_name", "notes", "hf_hub_id", "hf_hub_filename",
                "url", "file", "source", "test_input_size", "test_crop_pct", "test_pool_size", "label_names",
                "label_descriptions", "label_offset", "state_dict")
ATOL = 1e-5


class ExportError(BadInputError):
    """A model timm cannot hold bigltr's classifier of, or an export whose logits differ: said in one line."""


def find_checkpoint(run_dir: str | Path, stage: int | None = None) -> Path:
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} not found")
    if stage is None:
        stage = 2 if RunDir(run_dir).best(2).is_file() else 1
    path = RunDir(run_dir).best(stage)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (is {run_dir} a bigltr run folder, out=..., with stage {stage} "
                                f"trained?)")
    return path


def check_out(out: str | Path, overwrite: bool = False) -> Path:
    """OUT may be written: absent, an empty folder, or (with `overwrite`) a folder; else ExportError naming it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; give a new or empty folder as OUT")
    if out.is_dir() and not overwrite:
        try:
            entries = sorted(p.name for p in out.iterdir())
        except OSError as e:
            raise ExportError(f"{out} cannot be read ({type(e).__name__}: {e.strerror or e})") from None
        if entries:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise ExportError(f"{out} is not empty ({shown}); give a new or empty folder, or --overwrite to replace "
                              f"its model.safetensors and config.json")
    return out


def to_timm(model, name: str, in_chans: int):
    """The timm model `name` (num_classes = bigltr's classes) holding bigltr's weights, and the name of its head."""
    import timm
    import torch.nn as nn

    num_classes, num_features = model.classifier.weight.shape
    timm_model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    head = timm_model.get_classifier()
    head_name = next((n for n, m in timm_model.named_modules() if m is head), None)
    if not isinstance(head, nn.Linear) or tuple(head.weight.shape) != (num_classes, num_features) or not head_name:
        raise ExportError(f"{name}: timm's classifier ({head_name or type(head).__name__}) is not a Linear("
                        f"{num_features}, {num_classes}) layer, so bigltr's classifier has no place in timm's layout")
    state = {k[len("backbone."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    state[f"{head_name}.weight"] = model.classifier.weight.detach()
    if model.classifier.bias is not None:
        state[f"{head_name}.bias"] = model.classifier.bias.detach()
    missing, unexpected = timm_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"{name}: bigltr's backbone keys do not map onto timm's model with a classifier (missing "
                        f"{missing[:4]}, unexpected {unexpected[:4]})")
    return timm_model.eval(), head_name


def _max_diff(a, b, x) -> float:
    import torch

    with torch.no_grad():
        return float((a(x).float() - b(x).float()).abs().max())


def _run_results(run_dir: Path) -> dict:
    """The run's results.json (bigltr.results); {} when it has none or it is unreadable (only labels come from it)."""
    try:
        return read_results(run_dir)
    except ConfigError:
        return {}


def _label_names(ckpt: dict, results: dict, data_root: str, num_classes: int) -> list[str] | None:
    """Class names: those stored in the checkpoint, else the run's results.json `classes` (`results`), else the data
    folder's _info.json; None if none fits."""
    candidates = [ckpt.get("classes"), results.get("classes")]
    try:
        candidates.append(json.loads((Path(data_root) / "_info.json").read_text()).get("classes"))
    except (OSError, ValueError, AttributeError):
        pass
    for c in candidates:
        if isinstance(c, list) and len(c) == num_classes and all(isinstance(n, str) for n in c):
            return c
    return None


def _class_counts(results: dict, num_classes: int, key: str) -> list[int] | None:
    counts = results.get(key)
    return counts if isinstance(counts, list) and len(counts) == num_classes else None


def export(run_dir: str | Path, out: str | Path, stage: int | None = None, overwrite: bool = False) -> dict:
    """Write OUT/model.safetensors + OUT/config.json for the run's checkpoint; return a summary. OUT: a new or empty
    folder, or any folder with `overwrite` (check_out)."""
    import timm
    import torch
    from timm.models import save_for_hf

    from bigltr.checkpoint import checkpoint_config, checkpoint_stage, load_run_checkpoint
    from bigltr.data.transforms import image_hw
    from bigltr.models import build_checkpoint_model

    check_out(out, overwrite)  # before any heavy work
    path = find_checkpoint(run_dir, stage)
    ckpt = load_run_checkpoint(path)  # nan/inf weights: NonFiniteWeightsError
    cfg = checkpoint_config(ckpt, {"data.pipeline": "torch"}, where=f"config saved in {path}")  # reader: irrelevant
    run = RunDir.of_checkpoint(path).path
    d = cfg.data
    model = build_checkpoint_model(ckpt, cfg, path)
    timm_model, head_name = to_timm(model, cfg.model.name, d.in_chans)
    num_classes = timm_model.num_classes
    torch.manual_seed(0)
    h, w = image_hw(d.img_size)
    x = torch.randn(2, d.in_chans, h, w)
    diff = _max_diff(model, timm_model, x)
    if not diff <= ATOL:  # nan compares False
        raise ExportError(f"{cfg.model.name}: timm's model with bigltr's weights gives other logits (max abs "
                        f"difference {diff:.3g}); its head does more than one Linear layer on pooled features")

    # The pretrained_cfg describes this model, not the weights timm publishes for the architecture.
    # Set there (not through save_for_hf's data_config, which timm < 1.0.31 lacks): bigltr's eval transform.
    imagenet = d.train_aug == "imagenet"  # eval transform: timm's create_transform, else a plain resize
    timm_model.pretrained_cfg = {
        **{k: v for k, v in timm_model.pretrained_cfg.items() if k not in _SOURCE_KEYS},
        "input_size": (d.in_chans, h, w), "mean": tuple(d.mean), "std": tuple(d.std),
        "interpolation": "bilinear", "crop_pct": 0.875 if imagenet else 1.0, "crop_mode": "center"}
    results = _run_results(run)
    labels = _label_names(ckpt, results, d.root, num_classes)
    info = {"source_checkpoint": str(path), "stage": checkpoint_stage(ckpt), "epoch": ckpt.get("epoch"),
            "val_all": ckpt.get("val_all"), "model_name": cfg.model.name, "classifier": head_name,
            "class_counts": _class_counts(results, num_classes, "class_counts"),
            # the counts behind Many / Medium / Few: the official training counts (results.json says them when they
            # differ from what was trained on, e.g. after a validation hold-out)
            "group_counts": _class_counts(results, num_classes, "group_counts")
            or _class_counts(results, num_classes, "class_counts"), "many_thr": d.many_thr, "few_thr": d.few_thr,
            "eval_tta_flip": cfg.eval.tta_flip}
    if cfg.model.name in BIGLTR_MODELS:
        info["requires"] = "import bigltr.models (registers this architecture with timm) before timm.create_model"
    model_config = {"bigltr": info}
    if labels:
        model_config["label_names"] = labels

    out = check_out(out, overwrite)  # again: the folder may have changed during the checks
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create {out}: {type(e).__name__}: {e.strerror or e}") from None
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        save_for_hf(timm_model, tmp, model_config=model_config, safe_serialization=True)
        # what was written loads back through timm's own loader with the same logits
        loaded = timm.create_model(f"local-dir:{tmp}", pretrained=True).eval()
        diff_loaded = _max_diff(model, loaded, x)
        if not diff_loaded <= ATOL:
            raise ExportError(f"{cfg.model.name}: the exported folder loads in timm with other logits (max abs "
                            f"difference {diff_loaded:.3g})")
        umask = os.umask(0)
        os.umask(umask)
        for name in ("model.safetensors", "config.json"):
            os.chmod(Path(tmp) / name, 0o666 & ~umask)  # safetensors writes 0600; the folder is meant to be shared
            os.replace(Path(tmp) / name, out / name)
    return {"checkpoint": str(path), "out": str(out), "architecture": cfg.model.name, "num_classes": num_classes,
            "in_chans": d.in_chans, "classifier": head_name, "max_abs_logit_diff": max(diff, diff_loaded),
            "label_names": bool(labels)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (out=...) or a best.pt/last.pt file")
    ap.add_argument("out", metavar="OUT", help="folder to write model.safetensors and config.json into")
    ap.add_argument("--stage", type=int, choices=[1, 2],
                    help="which stage's best.pt (default: 2 if RUN_DIR/stage2/best.pt exists, else 1)")
    ap.add_argument("--overwrite", action="store_true",
                    help="OUT may be a folder that already holds files: its model.safetensors and config.json are "
                         "replaced, nothing else is touched (without it, a non-empty OUT is refused; an OUT that "
                         "is a file always is)")
    args = ap.parse_args(argv)
    from bigltr.checkpoint import EXIT_NON_FINITE, CheckpointError, NonFiniteWeightsError

    try:
        r = export(args.run_dir, args.out, args.stage, overwrite=args.overwrite)
    except ConfigError as e:
        return fail(PROG, f"config error: {e}")
    except NonFiniteWeightsError as e:
        return fail(PROG, str(e), EXIT_NON_FINITE)
    except (FileNotFoundError, CheckpointError, BadInputError) as e:
        return fail(PROG, str(e))
    load = f'timm.create_model("local-dir:{r["out"]}", pretrained=True)'
    if r["architecture"] in BIGLTR_MODELS:
        load = "import bigltr.models; " + load
    print(f"bigltr-export: {r['checkpoint']} -> {r['out']}/model.safetensors + config.json ({r['architecture']}, "
          f"{r['num_classes']} classes, classifier as '{r['classifier']}', logits match within "
          f"{r['max_abs_logit_diff']:.1e})\nload with: {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
