"""One run: the run-folder lock, the resume check, the requested stages in order, results.json after each, then the
report (bigltr.engine.report)."""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from bigltr.atomic import write_json_atomic
from bigltr.config import Config, ConfigError, batch_plan, save_config
from bigltr.engine.context import RunContext
from bigltr.engine.report import write_report
from bigltr.engine.resume import check_resume_config
from bigltr.engine.lock import RunLock, RunLocked
from bigltr.engine.stage1 import run_stage1
from bigltr.engine.stage2 import run_stage2
from bigltr.engine.stop import StopGuard
from bigltr.engine.tracking import Tracking
from bigltr.distributed import Dist, resolve_device
from bigltr.results import group_sizes, read_results
from bigltr.rundir import RunDir

log = logging.getLogger("bigltr")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: Config, dist: Dist | None = None) -> dict:
    dist = dist or Dist("ddp", device=resolve_device(cfg.device))
    ctx = RunContext.create(cfg, dist)  # reads _info.json: fails fast with a how-to if shards are missing
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={cfg.out} exists and is not a directory")
    lock, err = None, None
    if dist.is_main:  # one run per directory: a second one started into it stops here
        try:
            lock = RunLock(out).acquire()
        except RunLocked as e:
            err = e
    if int(dist.all_reduce_(torch.tensor(0 if err else 1, device=dist.device), "min")) == 0:
        raise err or RunLocked(f"{out} is in use by another run (rank 0 says why)")
    try:
        return _run_locked(cfg, ctx, out)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(cfg: Config, ctx: RunContext, out: Path) -> dict:
    dist = ctx.dist
    results_path = RunDir(out).results
    results = read_results(out)
    if cfg.resume == "auto":
        check_resume_config(cfg, out, results)
    dist.barrier()  # every rank has read the old results and config before rank 0 rewrites them
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, RunDir(out).config, header=[
            f"{s}: {batch_plan(getattr(cfg, s), dist.world_size, s).describe()}" for s in ("stage1", "stage2")])
    results["classes"] = ctx.info.get("classes")
    results["class_counts"] = ctx.class_counts
    results["groups"] = group_sizes(ctx.group_counts, cfg.data.many_thr, cfg.data.few_thr)
    if ctx.group_counts != ctx.class_counts:  # groups from the official training counts (bigltr.metrics)
        results["group_counts"] = ctx.group_counts
    else:
        results.pop("group_counts", None)
    results["world_size"] = dist.world_size
    results["device"] = dist.device.type  # "cpu" / "cuda": what the stages' wall_time_s are hours of
    log.info(f"run {out}: stage {cfg.stage}, device {dist.device}, {dist.describe()}, data {cfg.data.root} "
             f"({ctx.num_classes} classes)")

    with Tracking.open(cfg, out, dist.is_main) as tracking:  # log.trackers, main rank; finished however this ends
        ctx.stop = StopGuard(out, dist, cfg.preempt_check_every)
        try:
            ctx.stop.clear_stale()
            return _run_stages(cfg, ctx, results, results_path, tracking)
        finally:
            ctx.stop.close()


def _run_stages(cfg: Config, ctx: RunContext, results: dict, results_path: Path, tracking: Tracking) -> dict:
    dist, out = ctx.dist, ctx.out
    done = set(results) if cfg.resume == "auto" else set()  # a finished stage is not rerun on resume
    ran = set()
    if cfg.stage in ("1", "all") and "stage1" not in done:
        seed_everything(cfg.seed)
        results["stage1"] = run_stage1(ctx, tracking)
        ran.add("stage1")
        results.pop("stage2", None)  # a new stage 1 invalidates any earlier stage 2
        done.discard("stage2")
        if dist.is_main:
            write_json_atomic(results_path, results)
    if cfg.stage in ("2", "all") and "stage2" not in done:
        seed_everything(cfg.seed + 1)
        ckpt = cfg.stage1_checkpoint or str(RunDir(out).best(1))
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"stage 2 needs stage 1's checkpoint; {ckpt} does not exist (run stage=1 with "
                                    f"out={cfg.out} first, or set stage1_checkpoint=PATH)")
        results["stage2"] = run_stage2(ctx, ckpt, tracking)
        ran.add("stage2")
        if dist.is_main:
            write_json_atomic(results_path, results)
    dist.barrier()
    if not dist.is_main:
        return results
    print("\n" + write_report(results, out, cfg, ran) + "\n")
    return results
