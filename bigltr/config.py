"""Typed run configuration: YAML recipes + `key.sub=value` overrides, validated before any heavy work.

A recipe is a YAML mapping whose keys mirror the dataclasses below. A recipe may start from another one with
`base: NAME` (resolved in recipes/ or as a path); its keys then override the base's. Command-line overrides
`a.b=value` are parsed as YAML scalars (so `stage1.weight_decay=5e-3` is a float and `stage=1` an int).

Every key is checked: an unknown key or a value of the wrong type raises ConfigError naming the key and, for
unknown keys, the closest valid one. The resolved config is written to `<out>/config.yaml` by the trainer.

Every field carries its one-line description (`opt(default, "help")`, kept in `field.metadata["help"]`):
`bigltr-train --help` (bigltr.cli) lists all keys with type, default and description from these dataclasses.
Comments next to a field say *why* a default is what it is.

Why hand-written and not Hydra/OmegaConf: what bigltr needs is a typed schema checked before torch is imported,
an error that names the bad key and the closest valid one, and a help listing generated from the schema.
Dataclasses + difflib do that in one readable file, with no extra dependency and no config framework between a
user's `key=value` and the trainer.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from bigltr.atomic import write_text_atomic
from bigltr.rundir import default_out

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPE_DIR = REPO_ROOT / "recipes"


EXAMPLE = "stage1.epochs=10"


class ConfigError(ValueError):
    """A bad recipe or override; the message names the key."""


def _brief(value: Any, limit: int = 200) -> str:
    """repr(value) cut to about `limit` characters: an error shows at most a line's worth of a bad value. reprlib
    bounds the work too: a huge nested value is never turned into text in full."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlong = 4, limit, limit, limit
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = r.maxdeque = r.maxarray = 12
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def opt(default: Any, help: str) -> Any:
    """A config field with its one-line description (shown by `bigltr-train --help`). A list default is copied
    for every instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def section(cls: type, help: str) -> Any:
    """A nested config section (a dataclass) with its description."""
    return field(default_factory=cls, metadata={"help": help})


# One meaning of a batch on 1 process and on 64: `batch_size` is GLOBAL (what papers report, what the LR is tuned
# for); each process runs micro-batches of `micro_batch_size` and accumulates gradients until the global batch is
# reached (`batch_plan`). Resolved per launch, logged, and written in the header of <out>/config.yaml.
BATCH_HELP = ("GLOBAL batch per optimiser step, all processes together (the paper's number): "
              "= processes x micro_batch_size x accumulation steps")
MICRO_HELP = ("images per process per forward pass; 0: batch_size / processes (no accumulation); smaller values "
              "accumulate gradients over batch_size / (processes x micro_batch_size) micro-batches")


@dataclass
class DataConfig:
    root: str = opt("data/fmnist_lt", "folder with _info.json and the train/val/test shards")
    img_size: int | list[int] = opt(28, "network input size: S (S x S) or [H, W] (e.g. [28, 56]); images of "
                                        "another size are resized")
    in_chans: int = opt(1, "image channels: 1 (grey, read as L) or 3 (RGB)")
    mean: list[float] = opt([0.2860], "per-channel normalisation mean (data.in_chans values)")
    std: list[float] = opt([0.3530], "per-channel normalisation std (data.in_chans values)")
    train_aug: Literal["none", "cifar", "crop", "imagenet"] = opt(
        "cifar", "training augmentation: none; cifar (random crop with 4 px padding + horizontal flip); crop (cifar "
        "without the flip, for images whose mirror image is another class, e.g. idx --pairs); imagenet (timm's "
        "create_transform)")
    num_workers: int = opt(2, "data-loading worker processes per rank (DALI: CPU threads); 0 reads in the main "
                              "process")
    shuffle_buffer: int = opt(2000, "training samples held in the shuffle buffer (shards are shuffled too)")
    pin_memory: bool = opt(True, "pinned host memory for batches (only takes effect on CUDA)")
    # Paper: 100/20 (CIFAR/ImageNet-LT); a dataset with fewer images per class needs its own (see fmnist_lt).
    many_thr: int = opt(100, "Many group: classes with more than many_thr training images (reporting only)")
    few_thr: int = opt(20, "Few group: classes with fewer than few_thr training images; Medium is in between")
    # Data faults: docs/data.md "Failure behaviour".
    max_skip_fraction: float = opt(
        0.01, "stop when more than this fraction of the train split is skipped (corrupt) or lost (truncated or "
              "unreadable shard) in one epoch, all ranks together")
    eval_partial: bool = opt(False, "evaluate what is readable of a truncated val/test split (results then say "
                                    "'N of M') instead of stopping")
    # DALI is optional (pip install -e '.[dali]'): auto falls back to torch wherever it is absent.
    pipeline: Literal["torch", "dali", "auto"] = opt(
        "torch", "reader: torch (webdataset + PIL + torchvision in DataLoader workers); dali (NVIDIA DALI reads the "
                 "same shards, decodes and augments on the GPU, or on CPU threads without one); auto (dali when "
                 "DALI is importable and the device is CUDA, else torch)")
    dali_index_dir: str = opt("", "data.pipeline=dali: cache of shard indexes (empty: ~/.cache/bigltr/dali_index)")


@dataclass
class ModelConfig:
    name: str = opt("resnet32_cifar", "any timm model name, or resnet32_cifar / resnet34_cifar (bigltr.models)")
    # No hub access on the project's machines: weights are never fetched unless asked for.
    pretrained: bool = opt(False, "start stage 1 from timm's pretrained weights (downloads them)")
    drop_rate: float = opt(0.0, "dropout on the pooled features before the classifier (stage 1 training only)")


@dataclass
class Stage1Config:
    epochs: int = opt(200, "stage-1 training epochs (paper: 200 on CIFAR)")
    batch_size: int = opt(64, BATCH_HELP)
    micro_batch_size: int = opt(0, MICRO_HELP)
    lr: float = opt(0.01, "peak learning rate of SGD; per-step cosine decay to 0")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(5e-3, "weight decay: the paper's tuned value for CIFAR-100-LT; 0 gives the naive "
                                    "baseline")
    # Baselines (docs/baselines.md): weight balancing's stage 1 is plain CE.
    loss: Literal["ce", "la_ce", "balanced_softmax"] = opt(
        "ce", "ce (the paper); la_ce (logit-adjusted loss, Menon et al.: CE on logits + la_tau log prior); "
              "balanced_softmax (Ren et al.: la_ce with tau 1)")
    la_tau: float = opt(1.0, "loss=la_ce: tau of the logit adjustment")
    # One-stage weight balancing (Hasegawa & Sato, ICLR 2024): a fixed simplex-ETF classifier + a feature-norm penalty.
    classifier: Literal["linear", "etf"] = opt(
        "linear", "linear (trained nn.Linear); etf (a fixed simplex equiangular tight frame, only the bias trains: "
                  "one-stage weight balancing, with stage=1 and eval.posthoc=mla)")
    feature_reg: float = opt(0.0, "weight of the feature-norm penalty feature_reg * mean ||h||^2 / 2 on the pooled "
                                  "features (one-stage weight balancing: 0.01)")
    # p != 2 is the paper's open question; 2 is plain torch SGD weight decay, bit for bit.
    wd_p: float = opt(2.0, "Lp weight decay exponent p in [1, inf): the step adds weight_decay * sign(w) |w|^(p-1), "
                           "the gradient of (weight_decay/p) sum |w|^p, before momentum")
    wd_scope: Literal["all", "no_norm_bias"] = opt(
        "all", "parameters decayed: all (official code) or no_norm_bias (timm convention: no decay on 1-D params)")
    warmup_epochs: int = opt(0, "epochs of linear learning-rate warm-up before the cosine")
    amp: Literal["none", "bf16", "fp16"] = opt("none", "autocast precision (fp16 needs CUDA; bf16 works on CPU)")
    channels_last: bool = opt(False, "channels-last memory format for model and images (faster convs on GPU)")
    compile: bool = opt(False, "torch.compile the model (needs a working compiler toolchain for inductor)")


@dataclass
class MaxNormConfig:
    when: Literal["step", "epoch", "off"] = opt(
        "step", "when MaxNorm projects the classifier rows: step (the paper's eq. 5), epoch (the official code), off")
    radius_mode: Literal["relative", "absolute"] = opt(
        "relative", "relative: radius is t in delta = min + t (max - min) of the stage-1 row norms; absolute: "
                    "radius is delta")
    radius: float = opt(0.1, "MaxNorm radius: t (relative; official t = 0.1) or delta (absolute)")
    tau: float = opt(1.0, "exponent of the constraint ||w_c||^tau <= delta, i.e. ||w_c|| <= delta^(1/tau)")
    # Both projections agree at tau = 1; the official one misses the ball for tau != 1.
    projection: Literal["exact", "official"] = opt(
        "exact", "exact: rows with ||w|| > delta^(1/tau) scaled onto the ball; official: the official code's scale "
                 "delta/||w||^(tau^2)")
    # The clipped-row count is then not measured (logged as -1); rows_at_radius at epoch end still shows whether
    # the constraint binds.
    fused: bool = opt(False, "when=step only: fuse the SGD update and the projection into one op (one Triton "
                             "kernel on GPU)")


@dataclass
class FeatureCacheConfig:
    views: Literal["center", "center_flip", "augment"] = opt(
        "center_flip", "views of each training image the frozen backbone computes once: center (the eval "
                       "transform), center_flip (and its horizontal flip), augment (num_aug training-transform draws)")
    num_aug: int = opt(4, "views=augment: draws of the training transform per image")
    dtype: Literal["bf16", "fp16", "fp32"] = opt("bf16", "precision the cached features are stored in")
    # The backbone was trained (and selected) in stage 1's precision: computing its features in it is both faithful
    # and fast (bf16 ~1.8x fp32 on CPU, more on a GPU); fp32 ("none") stays available.
    compute: Literal["stage1", "none", "bf16", "fp16"] = opt(
        "stage1", "autocast precision of the frozen backbone while it computes the cache: stage1 (stage1.amp), none "
                  "(fp32), bf16 or fp16")
    location: Literal["memory", "disk"] = opt("memory", "keep the cached features in memory or on disk")
    # One folder per split (train, val, test) and key (checkpoint, data, views, dtype, ...): runs with the same
    # stage-1 checkpoint (a tuner's trials) can share it.
    dir: str = opt("", "location=disk: cache folder (empty: <out>/stage2/feature_cache)")


@dataclass
class Stage2Config:
    epochs: int = opt(10, "stage-2 (classifier) training epochs (paper: 10)")
    batch_size: int = opt(64, BATCH_HELP + " (images or cached feature vectors)")
    micro_batch_size: int = opt(0, MICRO_HELP)
    lr: float = opt(0.01, "peak learning rate of SGD; per-step cosine decay to 0")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(0.1, "weight decay on the classifier")
    wd_p: float = opt(2.0, "Lp weight decay exponent, as stage1.wd_p (2: torch SGD's own weight decay)")
    loss: Literal["ce", "cb_ce", "cb_official_bce", "la_ce", "balanced_softmax"] = opt(
        "cb_ce", "ce (plain cross-entropy); cb_ce (class-balanced weighted softmax CE, the paper); cb_official_bce "
                 "(BCE on softmax probabilities, the official code); la_ce, balanced_softmax (as stage1.loss)")
    la_tau: float = opt(1.0, "loss=la_ce: tau of the logit adjustment")
    # cRT / LWS (Kang et al., ICLR 2020): class-balanced sampling (on cached features).
    sampler: Literal["shuffle", "class_balanced"] = opt(
        "shuffle", "order of the training samples: shuffle (each once per epoch) or class_balanced (a class drawn "
                   "uniformly, then one of its samples: cRT, LWS; needs stage2.features=cached)")
    cb_beta: float = opt(0.9999, "beta of the effective number of samples (1 - beta^n) / (1 - beta), in (0, 1)")
    bn_mode: Literal["eval", "train"] = opt(
        "eval", "BatchNorm of the frozen backbone: eval (frozen statistics, paper) or train (statistics keep "
                "moving, official code)")
    classifier_init: Literal["keep", "reinit"] = opt(
        "keep", "start stage 2 from stage 1's classifier (keep) or a freshly initialised one (reinit: cRT)")
    amp: Literal["none", "bf16", "fp16"] = opt("none", "autocast precision (fp16 needs CUDA; bf16 works on CPU)")
    # online is what the reference code does; cached needs bn_mode=eval (a fixed backbone).
    features: Literal["online", "cached"] = opt(
        "online", "online: run the frozen backbone on every batch of every epoch; cached: compute backbone "
                  "features once (stage2.cache), then train the classifier on them")
    cache: FeatureCacheConfig = section(FeatureCacheConfig, "stage2.features=cached: what is cached and where")
    maxnorm: MaxNormConfig = section(MaxNormConfig, "MaxNorm: per-class norm ball on the classifier rows")


@dataclass
class EvalConfig:
    tta_flip: bool = opt(False, "average logits with a horizontal flip (the official code's reported numbers)")
    # The paper's ablation rows (L2-normalised classifier, tau-norm) and the post-hoc baselines (docs/baselines.md).
    posthoc: Literal["none", "l2", "tau_norm", "la", "mla"] = opt(
        "none", "post-hoc classifier, evaluated in addition after each stage: l2, tau_norm (rows / ||w_c||^tau), la "
                "(logit adjustment, Menon et al.: logits - tau log prior), mla (multiplicative, Hasegawa & Sato: "
                "logits * prior^-tau)")
    posthoc_tau: float = opt(1.0, "tau of eval.posthoc (tau_norm, la, mla); choose it on val (bigltr-tune)")


@dataclass
class DistConfig:
    backend: Literal["ddp", "fsdp2", "deepspeed"] = opt(
        "ddp", "data-parallel backend, used when the launcher starts more than one process")
    zero_stage: int = opt(2, "backend=deepspeed: ZeRO stage 1 (optimizer state), 2 (+ gradients), 3 (+ parameters)")
    zero3_persistence_threshold: int = opt(
        100000, "backend=deepspeed, ZeRO-3: parameters with fewer elements stay whole on every rank (DeepSpeed's "
                "default 1e5)")
    world_size: int = opt(0, "expected number of processes (0: whatever the launcher started); a mismatch fails")
    timeout_s: float = opt(600.0, "collective timeout in seconds: survivors of a dead rank exit after this long")


# accelerate.tracking.LOGGER_TYPE_TO_CLASS of the pinned accelerate (kept equal by tests/test_tracking.py): named here
# so that a config is checked without importing accelerate (which imports torch).
TRACKERS = ("aim", "clearml", "comet_ml", "dvclive", "mlflow", "swanlab", "tensorboard", "trackio", "wandb")


@dataclass
class LogConfig:
    # Accelerate's tracker classes, used directly on the main rank (bigltr.engine.tracking).
    trackers: list[str] = opt([], "experiment trackers that get the per-epoch summary scalars, the resolved config "
                                  "and the test results: any of " + ", ".join(TRACKERS) + " (empty: none); local "
                                  "logs in <out>/trackers")
    project: str = opt("", "project / run name the trackers log under (empty: the run directory's name)")
    # Off in tuning trials (bigltr-tune passes log.plots=false): dozens of runs whose plots nobody looks at.
    plots: bool = opt(True, "write the PNG plots (weight_norms.png, per_class_accuracy.png, stage{1,2}_norm_evolution"
                            ".png) after the run; results.json and table.md are written either way")


@dataclass
class Config:
    recipe: str = opt("", "a recipe name in recipes/ or a path to a YAML file; its keys replace the defaults")
    stage: Literal["1", "2", "all"] = opt("all", "which stages to run (2: from <out>/stage1/best.pt or "
                                                 "stage1_checkpoint)")
    # docs/reproduce.md "Protocol": tune with holdout (never selecting on test), then refit with the tuned values.
    protocol: Literal["holdout", "refit"] = opt(
        "holdout", "holdout: train on the train split, keep the epoch with the best val accuracy; refit: train on the "
                   "whole official training set (the splits _info.json's official_train_splits lists: train + the "
                   "val held out of it), a fixed schedule, keep the LAST epoch (the paper's protocol; run it with "
                   "the values tuned under holdout)")
    out: str = opt("", "run directory (empty: runs/<recipe>)")
    seed: int = opt(0, "seed of weights, data order and augmentation (stage 2 uses seed + 1)")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto: cuda when available, else cpu")
    # Reading the loss forces a host sync: these reads are the only ones in the hot loop.
    log_every: int = opt(50, "steps between loss/accuracy reads for the progress bar")
    stage1_checkpoint: str = opt("", "stage=2: the stage-1 checkpoint to start from (empty: <out>/stage1/best.pt)")
    resume: Literal["none", "auto"] = opt(
        "none", "auto: continue from the newest <out>/stage{1,2}/resume/ checkpoint (a finished stage is not rerun)")
    ckpt_every_steps: int = opt(0, "resume checkpoint every N optimiser steps (0: at epoch ends and on stop only)")
    preempt_check_every: int = opt(10, "steps between checks for a stop request (signal or <out>/PREEMPT)")
    data: DataConfig = section(DataConfig, "the shards (WebDataset + _info.json), transforms and class groups")
    model: ModelConfig = section(ModelConfig, "the backbone; the classifier is one nn.Linear on its pooled features")
    stage1: Stage1Config = section(Stage1Config, "stage 1: features, cross-entropy + weight decay")
    stage2: Stage2Config = section(Stage2Config, "stage 2: classifier only, class-balanced loss + weight decay + "
                                                 "MaxNorm")
    eval: EvalConfig = section(EvalConfig, "evaluation after each stage")
    dist: DistConfig = section(DistConfig, "several processes: DDP, FSDP2 or DeepSpeed ZeRO")
    log: LogConfig = section(LogConfig, "experiment tracking (TensorBoard, W&B, MLflow, ...) through Accelerate's "
                                        "trackers")


# ----------------------------------------------------------------------------------------------- schema helpers
def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown(key: str, where: str) -> ConfigError:
    key = _brief(key)[1:-1] if len(str(key)) > 200 else key  # a YAML key can be any text: a line's worth of it
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid_keys())}"
    return ConfigError(f"unknown config key '{key}' ({where}){hint}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it converted where the conversion is lossless."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):  # `int | list[int]`: the first alternative that fits
        for alt in typing.get_args(tp):
            try:
                return _coerce(key, value, alt)
            except ConfigError:
                pass
        names = [a.__name__ if isinstance(a, type) else str(a) for a in typing.get_args(tp)]
        raise ConfigError(f"config key '{key}' expects {' or '.join(names)}, got {_brief(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and "off" in choices:
            value = "off" if value is False else value  # YAML 1.1 reads a bare `off` as false
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and str(value) in choices:
            value = str(value)  # `stage=1` arrives as the int 1
        if value not in choices:
            raise ConfigError(f"config key '{key}': {_brief(value)} is not one of {list(choices)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects true/false, got {_brief(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' expects an integer, got {_brief(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `5e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' expects a number, got {_brief(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' expects a finite number, got {_brief(value)}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (bool, list, dict)):
            raise ConfigError(f"config key '{key}' expects a string, got {_brief(value)}")
        return str(value)
    raise TypeError(f"unsupported annotation {tp} for {key}")  # a bug in the schema, not in user input


def _apply(obj, mapping: dict, prefix: str, where: str) -> None:
    if not isinstance(mapping, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping ({where})")
    fields = _fields(type(obj))
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise _unknown(key, where)
        tp = fields[name]
        if dataclasses.is_dataclass(tp):
            _apply(getattr(obj, name), value, f"{key}.", where)
        else:
            setattr(obj, name, _coerce(key, value, tp))


def _set_dotted(obj, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    target = obj
    for i, part in enumerate(parts[:-1]):
        tp = _fields(type(target)).get(part)
        if tp is None or not dataclasses.is_dataclass(tp):
            raise _unknown(key, where)
        target = getattr(target, part)
    name = parts[-1]
    fields = _fields(type(target))
    if name not in fields or dataclasses.is_dataclass(fields[name]):
        raise _unknown(key, where)
    setattr(target, name, _coerce(key, value, fields[name]))


# ----------------------------------------------------------------------------------------------- recipes
def recipe_path(name: str) -> Path:
    """A recipe is a name in recipes/ (with or without .yaml) or a path to a YAML file."""
    candidates = [Path(name), RECIPE_DIR / name, RECIPE_DIR / f"{name}.yaml"]
    for p in candidates:
        if p.is_file():
            return p
    available = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(name, available, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"recipe '{name}' not found (looked in {RECIPE_DIR}); available: {', '.join(available)}{hint}")


# YAML that bigltr reads (recipes, key=value overrides, a saved config.yaml read back) goes through
# BoundedSafeLoader. PyYAML shares an aliased node instead of copying it, so nine levels of `&aN [*aM, *aM, ...]`
# (a few hundred bytes) load at once but stand for 10**9 values as soon as anything walks or prints them: 18 s,
# 2 GB and a 522 MB error line before this bound. A resolved bigltr config has a few hundred nodes.
YAML_MAX_NODES = 10_000


class YAMLTooLarge(yaml.YAMLError):
    """A YAML document that, with every alias expanded, has more than YAML_MAX_NODES nodes or refers to itself."""


def _check_expanded_size(root: yaml.Node) -> None:
    sizes: dict[int, int] = {}  # id(node) -> size with aliases expanded (a shared node is counted once per use)
    open_: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_:
            raise YAMLTooLarge(f"an alias at line {node.start_mark.line + 1} refers to a node that contains it")
        open_.add(id(node))
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        n = 1
        for child in children:
            n += size(child)
            if n > YAML_MAX_NODES:
                raise YAMLTooLarge(f"aliases expand it to more than {YAML_MAX_NODES} values (the node at line "
                                   f"{node.start_mark.line + 1}); write the values out instead of nesting aliases")
        open_.discard(id(node))
        sizes[id(node)] = n
        return n

    size(root)


class BoundedSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a document whose aliases expand beyond YAML_MAX_NODES (YAMLTooLarge, a YAMLError)
    before anything is constructed from it."""

    def construct_document(self, node):
        _check_expanded_size(node)
        return super().construct_document(node)


def load_yaml(text: str, where: str) -> Any:
    """`text` parsed like yaml.safe_load, with aliases bounded (BoundedSafeLoader). Invalid, alias-expanding or too
    deeply nested YAML: ConfigError in one line that starts with `where`."""
    try:
        return yaml.load(text, Loader=BoundedSafeLoader)
    except YAMLTooLarge as e:
        raise ConfigError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {_brief(' '.join(str(e).split()), 300)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None


def load_recipe(name: str, _seen: tuple = ()) -> dict:
    path = recipe_path(name)
    if path.resolve() in _seen:
        raise ConfigError(f"recipe '{name}': circular 'base' chain {[str(p) for p in _seen]}")
    data = load_yaml(path.read_text(), f"recipe {path}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: top level must be a mapping")
    base = data.pop("base", None)
    if base:
        merged = load_recipe(base, _seen + (path.resolve(),))
        _deep_update(merged, data)
        data = merged
    return data


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def split_override(arg: str) -> tuple[str, str]:
    """`key=value` -> (key, raw value text). The key loses surrounding spaces and leading dashes (`--seed=1` is
    `seed=1`); the value is everything after the first `=`, unparsed. Not of that form: ConfigError."""
    if "=" not in arg or arg.startswith("="):
        raise ConfigError(f"argument '{arg}' is not of the form key=value (e.g. {EXAMPLE})")
    key, raw = arg.split("=", 1)
    return key.strip().lstrip("-"), raw


def parse_value(raw: str, key: str = "") -> Any:
    """A value as a YAML scalar (`5e-3` stays text: the config's float check converts it; `stage=1` is an int,
    `true` a bool, `[0.5, 0.5]` a list); an empty value is the empty string, unparseable YAML the raw text. Read
    with bigltr.config's BoundedSafeLoader: aliases that expand beyond YAML_MAX_NODES values, or nesting too deep
    to parse, are a ConfigError naming `key`."""
    if raw == "":
        return ""
    try:
        return yaml.load(raw, Loader=BoundedSafeLoader)
    except YAMLTooLarge as e:
        raise ConfigError(f"config key '{key}' (command line): {e}") from None
    except RecursionError:
        raise ConfigError(f"config key '{key}' (command line): value nested too deeply") from None
    except yaml.YAMLError:
        return raw


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """[`key=value`, ...] -> {key: typed value}; a later key wins."""
    out = {}
    for arg in argv:
        key, raw = split_override(arg)
        out[key] = parse_value(raw, key)
    return out



def config_from_dict(data: dict, overrides: dict[str, Any] | None = None, *, where: str) -> Config:
    """A validated Config from a nested mapping (a saved config.yaml, a checkpoint's `config`) and then dotted
    overrides ({"data.root": ...}, as parse_overrides returns them). Keys are checked as in build_config."""
    cfg = Config()
    _apply(cfg, data, "", where)
    for key, value in (overrides or {}).items():
        _set_dotted(cfg, key, value, "command line")
    validate(cfg)
    return cfg


def build_config(argv: list[str]) -> Config:
    """Config from `recipe=NAME key=value ...` (recipe optional: defaults are the fmnist_lt demo values)."""
    overrides = parse_overrides(argv)
    cfg = Config()
    recipe = overrides.pop("recipe", None)
    if recipe not in (None, ""):  # `recipe=` (the default, as --help shows it): no recipe
        recipe = str(recipe)
        data = load_recipe(recipe)
        _apply(cfg, data, "", f"recipe {recipe_path(recipe)}")
        cfg.recipe = recipe
    for key, value in overrides.items():
        _set_dotted(cfg, key, value, "command line")
    validate(cfg)
    if not cfg.out:
        cfg.out = default_out(cfg.recipe)
    return cfg


def _importable(module: str) -> bool:
    """Whether `module` is installed, without importing it (what uses it imports it when it is used)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _dali_importable() -> bool:
    return _importable("nvidia.dali")


def image_hw(img_size: Any) -> tuple[int, int]:
    """``(H, W)`` of an ``img_size`` given as S, ``[S]`` or ``[H, W]``; ValueError otherwise (or for a side < 1)."""
    if isinstance(img_size, numbers.Integral) and not isinstance(img_size, bool):
        sides = [int(img_size)]
    elif (isinstance(img_size, (list, tuple)) and len(img_size) in (1, 2)
          and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in img_size)):
        sides = [int(s) for s in img_size]
    else:
        raise ValueError(f"img_size must be an integer S or a list [S] or [H, W], got {img_size!r}")
    if min(sides) < 1:
        raise ValueError(f"img_size must be >= 1 pixel per side, got {img_size!r}")
    return sides[0], sides[-1]


def validate(cfg: Config) -> None:
    """Cross-field and range checks (types were checked while applying)."""
    def need(cond: bool, key: str, msg: str):
        if not cond:
            raise ConfigError(f"config key '{key}': {msg}")

    for s in ("stage1", "stage2"):
        sc = getattr(cfg, s)
        need(sc.epochs >= 1, f"{s}.epochs", "must be >= 1")
        need(sc.batch_size >= 1, f"{s}.batch_size", "must be >= 1")
        need(sc.lr > 0, f"{s}.lr", "must be > 0")
        need(sc.weight_decay >= 0, f"{s}.weight_decay", "must be >= 0")
        need(1 <= sc.wd_p < math.inf, f"{s}.wd_p", "must be a finite number >= 1 (p in [1, inf))")
        need(0 <= sc.momentum < 1, f"{s}.momentum", "must be in [0, 1)")
        need(sc.micro_batch_size >= 0, f"{s}.micro_batch_size", "must be >= 0 (0: batch_size / processes)")
        need(sc.micro_batch_size <= sc.batch_size, f"{s}.micro_batch_size",
             f"{sc.micro_batch_size} is larger than {s}.batch_size={sc.batch_size} (the global batch)")
    launched = os.environ.get("WORLD_SIZE", "")
    if launched.isdigit() and int(launched) >= 1:  # under torchrun / accelerate launch: refuse before any set-up
        for s in ("stage1", "stage2"):
            batch_plan(getattr(cfg, s), int(launched), s)
    need(0 <= cfg.stage1.warmup_epochs < cfg.stage1.epochs, "stage1.warmup_epochs", "must be in [0, stage1.epochs)")
    need(0 < cfg.stage2.cb_beta < 1, "stage2.cb_beta", "must be in (0, 1)")
    mn = cfg.stage2.maxnorm
    need(mn.radius >= 0, "stage2.maxnorm.radius", "must be >= 0")
    need(mn.tau > 0, "stage2.maxnorm.tau", "must be > 0")
    need(not (mn.fused and mn.when != "step"), "stage2.maxnorm.fused", "needs stage2.maxnorm.when=step")
    need(cfg.stage2.cache.num_aug >= 1, "stage2.cache.num_aug", "must be >= 1")
    need(cfg.stage1.feature_reg >= 0, "stage1.feature_reg", "must be >= 0")
    need(not (cfg.stage2.sampler == "class_balanced" and cfg.stage2.features != "cached"), "stage2.sampler",
         "class_balanced draws from the cached features: set stage2.features=cached")
    need(not (cfg.stage1.classifier == "etf" and cfg.stage != "1"), "stage1.classifier",
         "etf is one-stage weight balancing: run it with stage=1 (its stage 2 is eval.posthoc=mla)")
    need(not (cache_amp(cfg) == "fp16" and cfg.device == "cpu"), "stage2.cache.compute",
         "fp16 autocast needs CUDA; use bf16 or none on CPU")
    try:
        image_hw(cfg.data.img_size)
    except ValueError as e:
        need(False, "data.img_size", str(e))
    need(not (cfg.stage2.features == "cached" and cfg.stage2.bn_mode == "train"), "stage2.features",
         "cached features need a fixed backbone: use stage2.bn_mode=eval (bn_mode=train changes BatchNorm "
         "statistics every step, so features cannot be computed once)")
    need(cfg.data.few_thr <= cfg.data.many_thr, "data.few_thr", "must be <= data.many_thr")
    need(len(cfg.data.mean) == cfg.data.in_chans, "data.mean", f"needs {cfg.data.in_chans} values (data.in_chans)")
    need(len(cfg.data.std) == cfg.data.in_chans, "data.std", f"needs {cfg.data.in_chans} values (data.in_chans)")
    need(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    need(cfg.data.pipeline != "dali" or _dali_importable(), "data.pipeline",
         "'dali' needs NVIDIA DALI, which is not installed: pip install -e '.[dali]' (or data.pipeline=torch/auto)")
    need(0 <= cfg.data.max_skip_fraction < 1, "data.max_skip_fraction", "must be in [0, 1)")
    need(cfg.log_every >= 1, "log_every", "must be >= 1")
    need(cfg.ckpt_every_steps >= 0, "ckpt_every_steps", "must be >= 0")
    need(cfg.preempt_check_every >= 1, "preempt_check_every", "must be >= 1")
    need(cfg.dist.world_size >= 0, "dist.world_size", "must be >= 0")
    need(cfg.dist.timeout_s > 0, "dist.timeout_s", "must be > 0")
    need(cfg.dist.zero_stage in (1, 2, 3), "dist.zero_stage", "must be 1, 2 or 3")
    need(cfg.dist.zero3_persistence_threshold >= 0, "dist.zero3_persistence_threshold", "must be >= 0")
    for name in cfg.log.trackers:
        close = difflib.get_close_matches(name, TRACKERS, n=1)
        need(name in TRACKERS, "log.trackers", f"unknown tracker '{name}'"
             + (f"; did you mean '{close[0]}'?" if close else "") + f" (valid: {', '.join(TRACKERS)})")
        # each tracker's module is its name (tensorboard: torch.utils.tensorboard needs the tensorboard package)
        need(_importable(name), "log.trackers",
             f"'{name}' is not installed: pip install {name.replace('_', '-')} (or remove it from log.trackers)")
    for s in ("stage1", "stage2"):
        need(not (getattr(cfg, s).amp == "fp16" and cfg.dist.backend == "deepspeed"), f"{s}.amp",
             "fp16 needs a GradScaler, which dist.backend=deepspeed does not take: use bf16 (or none)")
    need(not (mn.fused and cfg.dist.backend == "deepspeed"), "stage2.maxnorm.fused",
         "cannot run under dist.backend=deepspeed: ZeRO's optimizer steps flat 1-D partitions that cut across "
         "class rows; use the default (unfused) MaxNorm, which DeepSpeed projects on the fp32 master")


def cache_amp(cfg: Config) -> str:
    """The autocast precision the stage-2 feature cache is computed in (stage2.cache.compute resolved)."""
    c = cfg.stage2.cache.compute
    return cfg.stage1.amp if c == "stage1" else c


@dataclass(frozen=True)
class BatchPlan:
    """How one stage's global batch is made on this launch: processes x per_process x accum_steps = global_."""
    global_: int
    processes: int
    per_process: int  # images per process per forward pass (the loader's batch)
    accum_steps: int  # forward/backward passes per optimiser step

    def record(self) -> dict:
        return {"global": self.global_, "processes": self.processes, "per_process": self.per_process,
                "accum_steps": self.accum_steps}

    def describe(self) -> str:
        return (f"global batch {self.global_} = {self.processes} process(es) x {self.per_process} per process x "
                f"{self.accum_steps} accumulation step(s)")


def batch_plan(stage_cfg, processes: int, key: str) -> BatchPlan:
    """The stage's BatchPlan for `processes` processes; ConfigError (naming both numbers) when the global batch
    cannot be split into equal micro-batches on that many processes."""
    g, micro = stage_cfg.batch_size, stage_cfg.micro_batch_size
    if g % processes:
        raise ConfigError(f"config key '{key}.batch_size': the global batch {g} does not split over {processes} "
                          f"processes ({g} / {processes} is not a whole number); pick a batch_size that is a "
                          f"multiple of {processes}, or launch a number of processes that divides {g}")
    per_rank = g // processes
    micro = micro or per_rank
    if per_rank % micro:
        raise ConfigError(f"config key '{key}.micro_batch_size': {micro} does not divide the {per_rank} images each "
                          f"of {processes} processes takes of {key}.batch_size={g}; pick a divisor of {per_rank}")
    return BatchPlan(global_=g, processes=processes, per_process=micro, accum_steps=per_rank // micro)


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config mapping as {"section.key": value} (what resume checks, trackers and the ablation compare)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def key_in(key: str, keys: tuple[str, ...]) -> bool:
    """Whether dotted config key `key` is one of `keys`: equal to one, or under one that ends with "." ("eval."
    holds every eval.* key)."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys)


def same_value(old: Any, new: Any) -> bool:
    """Equal, or both numbers (the old one not a bool) of equal value: 5 and 5.0 are the same setting."""
    return old == new or (isinstance(old, (int, float)) and isinstance(new, (int, float))
                          and not isinstance(old, bool) and float(old) == float(new))


def config_diff(saved: dict, new: dict, ignore: tuple[str, ...] = (), defaults: dict | None = None,
                same=None) -> list[tuple[str, Any, Any]]:
    """The keys whose value in config `new` differs from config `saved` (nested or flattened mappings), as
    (dotted key, saved value, new value), in `new`'s key order. A key `saved` lacks counts as its value in
    `defaults` (None without them: a config written by an older bigltr); a key only `saved` has is not compared
    (one this version no longer has); keys in `ignore` (`key_in`) are skipped. `same(key, old, new)` decides
    equality (default: `same_value`)."""
    s, dflt = flatten(saved), flatten(defaults or {})
    diffs = []
    for key, value in flatten(new).items():
        if key_in(key, ignore):
            continue
        old = s.get(key, dflt.get(key))
        if not (same(key, old, value) if same else same_value(old, value)):
            diffs.append((key, old, value))
    return diffs


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike, header: list[str] = ()) -> None:
    """Write the resolved config atomically (tmp file then rename); `header` lines go first as YAML comments
    (what the launch resolved, e.g. each stage's BatchPlan)."""
    head = "".join(f"# {line}\n" for line in header)
    write_text_atomic(path, head + yaml.safe_dump(to_dict(cfg), sort_keys=False))
