"""Runs the requested stages, then writes results.json, the plots and the summary table."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch

from bigltr import plots
from bigltr.config import Config, save_config
from bigltr.engine.common import resolve_device
from bigltr.engine.context import RunContext, write_json
from bigltr.engine.resume import StopFlag
from bigltr.engine.stage1 import run_stage1
from bigltr.engine.stage2 import run_stage2
from bigltr.distributed import Dist
from bigltr.metrics import format_table

log = logging.getLogger("bigltr")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: Config, dist: Dist | None = None) -> dict:
    dist = dist or Dist("ddp", device=resolve_device(cfg.device))
    ctx = RunContext.create(cfg, dist)  # reads _info.json: fails fast with a how-to if shards are missing
    out = Path(cfg.out)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    dist.barrier()  # every rank has read the old results before rank 0 rewrites them
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    results["classes"] = ctx.info.get("classes")
    results["class_counts"] = ctx.class_counts
    results["world_size"] = dist.world_size
    log.info(f"run {out}: stage {cfg.stage}, device {dist.device}, {dist.describe()}, data {cfg.data.root} "
             f"({ctx.num_classes} classes)")

    ctx.stop = StopFlag(out, dist, cfg.preempt_check_every)
    try:
        ctx.stop.clear_stale()
        return _run_stages(cfg, ctx, results, results_path)
    finally:
        ctx.stop.close()


def _run_stages(cfg: Config, ctx: RunContext, results: dict, results_path: Path) -> dict:
    dist, out = ctx.dist, ctx.out
    done = set(results) if cfg.resume == "auto" else set()  # a finished stage is not rerun on resume
    if cfg.stage in ("1", "all") and "stage1" not in done:
        seed_everything(cfg.seed)
        results["stage1"] = run_stage1(ctx)
        results.pop("stage2", None)  # a new stage 1 invalidates any earlier stage 2
        done.discard("stage2")
        if dist.is_main:
            write_json(results_path, results)
    if cfg.stage in ("2", "all") and "stage2" not in done:
        seed_everything(cfg.seed + 1)
        ckpt = cfg.stage1_checkpoint or str(out / "stage1" / "best.pt")
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"stage 2 needs stage 1's checkpoint; {ckpt} does not exist (run stage=1 with "
                                    f"out={cfg.out} first, or set stage1_checkpoint=PATH)")
        results["stage2"] = run_stage2(ctx, ckpt)
        if dist.is_main:
            write_json(results_path, results)
    dist.barrier()
    if not dist.is_main:
        return results
    write_plots(results, out)
    table = summary_table(results)
    (out / "table.md").write_text(table + "\n")
    print("\n" + table + "\n")
    return results


def summary_table(results: dict) -> str:
    rows = {}
    if "stage1" in results:
        rows["stage 1 (CE + WD)"] = results["stage1"]["test"]
        if "posthoc" in results["stage1"]:
            rows[f"stage 1 + {results['stage1']['posthoc']['method']}"] = results["stage1"]["posthoc"]["test"]
    if "stage2" in results:
        rows["stage 2 (CB + WD + MaxNorm)"] = results["stage2"]["test"]
    return format_table(rows, "Test top-1 (%), balanced test set")


def write_plots(results: dict, out: Path) -> None:
    counts = results["class_counts"]
    norms = {f"stage {s[-1]}": results[s]["weight_norms"] for s in ("stage1", "stage2") if s in results}
    radius = results.get("stage2", {}).get("maxnorm_radius")
    plots.plot_weight_norms(norms, counts, out / "weight_norms.png", radius=radius)
    accs = {f"stage {s[-1]}": results[s]["test"]["per_class"] for s in ("stage1", "stage2") if s in results}
    plots.plot_per_class_accuracy(accs, counts, out / "per_class_accuracy.png")
    for s in ("stage1", "stage2"):
        f = out / s / "weight_norms.json"
        if s in results and f.exists():
            plots.plot_norm_evolution(json.loads(f.read_text())["per_epoch"], counts,
                                      out / f"{s}_norm_evolution.png", f"{s}: classifier row norms per epoch")
