"""The checks of a Config that its types do not express: ranges and combinations of keys, and whether what a key
asks for (DALI, a tracker's package) is installed; plus the readings of keys that those checks share with the
code that uses them (image_hw, cache_amp)."""
from __future__ import annotations

import difflib
import importlib.util
import math
import numbers
import os
from typing import Any

from bigltr.config.errors import ConfigError
from bigltr.config.plan import batch_plan
from bigltr.config.schema import TRACKERS, Config


def _importable(module: str) -> bool:
    """Whether `module` is installed, without importing it (what uses it imports it when it is used)."""
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
    need(not (cfg.stage2.sampler == "class_balanced" and cfg.stage2.features == "online"
              and cfg.data.pipeline == "dali"), "data.pipeline",
         "dali reads each tar shard front to back and cannot draw single images; class-balanced sampling of the "
         "image stream (stage2.sampler=class_balanced, stage2.features=online) reads with the torch reader: set "
         "data.pipeline=torch or auto (or stage2.features=cached), see docs/baselines.md")
    if cfg.stage2.classifier == "lws":  # LWS trains scales on stage 1's classifier (bigltr.objective.lws)
        need(cfg.stage2.classifier_init == "keep", "stage2.classifier",
             "lws scales stage 1's classifier: it needs stage2.classifier_init=keep (reinit would scale random rows)")
        need(mn.when == "off", "stage2.classifier",
             f"lws trains one scale per class, not the rows; MaxNorm (stage2.maxnorm.when={mn.when}) would project "
             f"the folded rows s_y w_y, which is not LWS: set stage2.maxnorm.when=off")
        need(cfg.dist.backend == "ddp", "stage2.classifier",
             f"lws runs on one process or under dist.backend=ddp, not {cfg.dist.backend}")
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
