"""Runs the requested stages, then writes results.json, the plots and the summary table."""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
import yaml

from bigltr import plots
from bigltr.atomic import write_json_atomic
from bigltr.checkpoint import load_run_checkpoint
from bigltr.config import Config, ConfigError, batch_plan, save_config, to_dict
from bigltr.engine.context import RunContext
from bigltr.engine.resume import StopGuard, resume_candidates
from bigltr.engine.rundir import RunLock, RunLocked, compare_for_resume
from bigltr.engine.stage1 import run_stage1
from bigltr.engine.stage2 import run_stage2
from bigltr.engine.tracking import Tracking
from bigltr.distributed import Dist, resolve_device
from bigltr.results import GROUPS, group_sizes, per_class_accuracy, read_results, read_weight_norms
from bigltr.rundir import STAGES, RunDir

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
        _check_resume_config(cfg, out, results)
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
    log.info(f"run {out}: stage {cfg.stage}, device {dist.device}, {dist.describe()}, data {cfg.data.root} "
             f"({ctx.num_classes} classes)")

    with Tracking.open(cfg, out, dist.is_main) as tracking:  # log.trackers, main rank; finished however this ends
        ctx.stop = StopGuard(out, dist, cfg.preempt_check_every)
        try:
            ctx.stop.clear_stale()
            return _run_stages(cfg, ctx, results, results_path, tracking)
        finally:
            ctx.stop.close()


def _check_resume_config(cfg: Config, out: Path, results: dict) -> None:
    """resume=auto continues checkpoints trained with out/config.yaml: a key that changes the model, data or
    method of a stage that has started is an error; keys that may change are listed."""
    run_dir = RunDir(out)
    saved_path = run_dir.config
    if not saved_path.exists():
        return
    try:
        saved = run_dir.read_config()
    except (yaml.YAMLError, OSError) as e:
        raise ConfigError(f"resume=auto: {saved_path} is not readable ({e})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"resume=auto: {saved_path} does not hold a config mapping")
    started = {s for s in STAGES if s in results or resume_candidates(run_dir.stage(s).path)}
    if not started:
        return
    errors, allowed = compare_for_resume(saved, to_dict(cfg), to_dict(Config()), started)
    if errors:
        raise ConfigError(f"resume=auto in {out}: the checkpoints there were trained with {saved_path}, and these "
                          f"keys change the model, data or method: " + "; ".join(errors)
                          + ". Use another out= for a new run, or resume with the saved values")
    if allowed:
        log.info("resume=auto: changed since the run started: " + "; ".join(allowed))


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
    if cfg.log.plots:  # off in tuning trials (bigltr-tune passes log.plots=false): nobody looks at them there
        write_plots(results, out)
    table = summary_table(results, stage_configs(cfg, out, results, ran))
    RunDir(out).table.write_text(table + "\n")
    print("\n" + table + "\n")
    return results


def stage_configs(cfg: Config, out: Path, results: dict, ran: set[str]) -> dict[str, dict]:
    """The config each stage in `results` was trained with: this run's for the stages it ran; for a stage it reused
    (stage=2 after an earlier stage=1 run, resume=auto after a finished stage) the config its best.pt embeds, which
    may differ from this run's (say stage1.weight_decay=0 then). A stage whose best.pt is unreadable is left out."""
    configs = {}
    for s in STAGES:
        if s not in results:
            continue
        if s in ran:
            configs[s] = to_dict(cfg)
            continue
        best = RunDir(out).best(s)
        try:  # mmap: only the config is read, not the weights
            configs[s] = load_run_checkpoint(best, strict=False, mmap=True)["config"]
        except Exception as e:  # noqa: BLE001 - a label is not worth failing a finished run for
            log.warning(f"{best}: no config readable ({type(e).__name__}: {e}); table.md names the "
                        f"row without its settings")
    return configs


LOSS_NAMES = {"ce": "CE", "cb_ce": "CB", "cb_official_bce": "CB-BCE (official)"}


def _num(v: float) -> str:
    """Short and exact: 0, 0.1, 0.05, 5e-3, 2.5e-4, 1e-5."""
    v = float(v)
    if v == 0 or 0.01 <= abs(v) < 1e4:
        return f"{v:g}"
    mant, exp = f"{v:.6e}".split("e")
    return f"{float(mant):g}e{int(exp)}"


def _wd(stage_cfg: dict) -> str:
    p = stage_cfg.get("wd_p", 2.0)
    return f"WD {_num(stage_cfg['weight_decay'])}" + (f" (p={_num(p)})" if p != 2 else "")


def stage_label(stage: str, config: dict | Config | None, radius: float | None = None) -> str:
    """Row name of one stage from the config that trained it, e.g. "stage 1 (CE + WD 5e-3)", "stage 1 (CE, WD 0)",
    "stage 2 (CB + WD 0.1 + MaxNorm step, r=0.662)", "stage 2 (CE, WD 0, MaxNorm off)": what is on joined by " + ",
    what is off after a comma. `radius`: stage 2's resolved MaxNorm radius (results' maxnorm_radius)."""
    name = f"stage {stage[-1]}"
    if config is None:
        return name
    if isinstance(config, Config):
        config = to_dict(config)
    sc = config[stage]
    on = ["CE" if stage == "stage1" else LOSS_NAMES.get(sc["loss"], sc["loss"])]
    off = []
    (on if sc["weight_decay"] > 0 else off).append(_wd(sc))
    if stage == "stage2":
        mn = sc["maxnorm"]
        if mn["when"] == "off":
            off.append("MaxNorm off")
        else:
            r = radius if radius is not None else mn["radius"] if mn["radius_mode"] == "absolute" else None
            m = f"MaxNorm {mn['when']}" + ("" if r is None else f", r={r:.3g}")
            if mn.get("tau", 1.0) != 1:
                m += f", tau={_num(mn['tau'])}" + (" (official projection)" if mn.get("projection") == "official"
                                                   else "")
            on.append(m)
    return f"{name} ({', '.join([' + '.join(on)] + off)})"


def summary_table(results: dict, configs: dict[str, dict | Config] | None = None) -> str:
    """Many / Medium / Few / All on test, each column headed with its number of classes ("Many (n=842)"); each row
    named from the config that trained its stage (`configs`: {"stage1": ..., "stage2": ...}, see `stage_configs`; a
    stage without one is named "stage N"). A group without classes is reported as absent, a group whose classes
    have no test sample as n/a."""
    configs = configs or {}
    rows = {}
    if "stage1" in results:
        rows[stage_label("stage1", configs.get("stage1"))] = results["stage1"]["test"]
        if "posthoc" in results["stage1"]:
            rows[f"stage 1 + {results['stage1']['posthoc']['method']}"] = results["stage1"]["posthoc"]["test"]
    if "stage2" in results:
        rows[stage_label("stage2", configs.get("stage2"), results["stage2"].get("maxnorm_radius"))] = \
            results["stage2"]["test"]
    title = "Test top-1 (%), balanced test set"
    partial = [r for r in rows.values() if r.get("expected_samples")]
    if partial:  # data.eval_partial: a truncated test split was evaluated as far as it could be read
        title += f", {partial[0]['samples']} of {partial[0]['expected_samples']} test samples (partial)"
    return format_table(rows, title, _sizes(results, configs))


def _sizes(results: dict, configs: dict) -> dict | None:
    """Classes per group: results' "groups", else (a results.json written before) counted from its class counts
    with the thresholds of a stage's config; None when neither is known."""
    if isinstance(results.get("groups"), dict):
        return results["groups"]
    counts = results.get("group_counts") or results.get("class_counts")
    for c in configs.values():
        data = (to_dict(c) if isinstance(c, Config) else c or {}).get("data", {})
        if counts is not None and "many_thr" in data and "few_thr" in data:
            return group_sizes(counts, data["many_thr"], data["few_thr"])
    return None


def format_table(rows: dict[str, dict], title: str = "", sizes: dict | None = None) -> str:
    """Markdown table of Many / Medium / Few / All for {row name: metrics}; `sizes` ({"many": n, ...}, see
    bigltr.results.group_sizes) heads each column with its number of classes; a group of 0 classes reads "absent"
    in every row, a value of None (no test sample in the group) "n/a"."""
    cols = list(GROUPS) + ["all"]
    n = dict(sizes or {})
    if sizes is not None:
        n["all"] = sum(int(sizes[g]) for g in GROUPS)

    def head(g):
        return g.capitalize() + (f" (n={int(n[g]):,})" if g in n else "")

    def cell(g, v):
        if g in n and int(n[g]) == 0:
            return "absent"
        return "n/a" if v is None else f"{v:.2f}"

    lines = [title] if title else []
    lines += ["| | " + " | ".join(head(g) for g in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(g, m.get(g)) for g in cols) + " |")
    return "\n".join(lines)


def write_plots(results: dict, out: Path) -> None:
    """weight_norms.png, per_class_accuracy.png and stage{1,2}_norm_evolution.png (bigltr.plots; O(classes))."""
    # classes ordered and grouped by the counts that define the groups (the official training counts when the
    # run trains on fewer, after a validation hold-out)
    counts, names = results.get("group_counts") or results["class_counts"], results.get("classes")
    groups = results.get("groups") or {}
    thr = {"many_thr": groups.get("many_thr", 100), "few_thr": groups.get("few_thr", 20)}
    run_dir = RunDir(out)
    norms = {f"stage {s[-1]}": results[s]["weight_norms"] for s in STAGES if s in results}
    radius = results.get("stage2", {}).get("maxnorm_radius")
    plots.plot_weight_norms(norms, counts, run_dir.plot("weight_norms"), radius=radius, class_names=names, **thr)
    accs = {f"stage {s[-1]}": per_class_accuracy(results[s]["test"]) for s in STAGES if s in results}
    plots.plot_per_class_accuracy(accs, counts, run_dir.plot("per_class_accuracy"), class_names=names, **thr)
    for s in STAGES:
        wn = read_weight_norms(run_dir.stage(s).path) if s in results else None
        if wn is not None:
            plots.plot_norm_evolution(wn["per_epoch"], counts, run_dir.plot(f"{s}_norm_evolution"),
                                      f"{s}: classifier row norms per epoch", radius=wn.get("radius"), **thr)
