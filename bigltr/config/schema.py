"""The config schema: one dataclass per section, each field with its default and one-line description, and the one
walk of it (SCHEMA) that the parser, valid_keys, `--help` (bigltr.cli) and a checkpoint's known keys read.

Every field carries its one-line description (`opt(default, "help")`, kept in `field.metadata["help"]`):
`bigltr-train --help` lists all keys with type, default and description from these dataclasses. Comments next to
a field say *why* a default is what it is.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal


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


# The augmentation names (data.train_aug): the readers in bigltr.data check the `aug` they are given against AUGS.
TrainAug = Literal["none", "cifar", "crop", "imagenet"]
AUGS: tuple[str, ...] = typing.get_args(TrainAug)

@dataclass
class DataConfig:
    root: str = opt("data/fmnist_lt", "folder with _info.json and the train/val/test shards")
    img_size: int | list[int] = opt(28, "network input size: S (S x S) or [H, W] (e.g. [28, 56]); images of "
                                        "another size are resized")
    in_chans: int = opt(1, "image channels: 1 (grey, read as L) or 3 (RGB)")
    mean: list[float] = opt([0.2860], "per-channel normalisation mean (data.in_chans values)")
    std: list[float] = opt([0.3530], "per-channel normalisation std (data.in_chans values)")
    train_aug: TrainAug = opt(
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
    dali_index_dir: str = opt("", "cache of shard indexes (data.pipeline=dali, the start-up label check, class-balanced "
                                  "sampling of the image stream; empty: ~/.cache/bigltr/dali_index)")


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
    # LWS (Kang et al., ICLR 2020): bigltr.objective.lws.LWSClassifier; checkpoints hold the folded nn.Linear.
    classifier: Literal["linear", "lws"] = opt(
        "linear", "linear (train the classifier's rows and bias); lws (learnable weight scaling, Kang et al.: stage "
                  "1's classifier frozen, one scale s_y per class trained, logits s_y (w_y.x + b_y); weight decay "
                  "pulls s to 0; needs classifier_init=keep and maxnorm.when=off; checkpoints hold the folded rows "
                  "s_y w_y, s_y b_y; with sampler=class_balanced, loss=ce)")
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


# ----------------------------------------------------------------------------------------------- the walk
@dataclass(frozen=True)
class SchemaKey:
    """A key (`stage2.maxnorm.radius`) or a section (`stage2.maxnorm`) of Config."""
    key: str  # dotted, as on the command line
    type: Any  # the field's annotation, resolved; a section's is its dataclass
    help: str
    default: Any  # the value in Config(); a section's is its default instance

    @property
    def is_section(self) -> bool:
        return dataclasses.is_dataclass(self.type)


def _walk(cls: type, prefix: str, instance: Any) -> Iterator[SchemaKey]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        entry = SchemaKey(f"{prefix}{f.name}", hints[f.name], f.metadata.get("help", ""), getattr(instance, f.name))
        yield entry
        if entry.is_section:
            yield from _walk(entry.type, f"{entry.key}.", entry.default)


# Every section and key of Config by dotted name, in declaration order, each section before its keys.
SCHEMA: dict[str, SchemaKey] = {entry.key: entry for entry in _walk(Config, "", Config())}


def field_entry(prefix: str, name: Any) -> SchemaKey | None:
    """The entry of field `name` of the section `prefix` ("" for the top level, else e.g. "stage2.maxnorm."), as a
    nested mapping (a recipe, a saved config) names it; None when that section has no such field."""
    return SCHEMA.get(prefix + name) if isinstance(name, str) and "." not in name else None


def valid_keys() -> list[str]:
    """Every dotted key that takes a value (sections left out), in declaration order."""
    return [key for key, entry in SCHEMA.items() if not entry.is_section]
