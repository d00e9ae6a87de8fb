"""The cost columns of bigltr-ablation (bigltr.ablation): what reaching each row cost, in device-hours, read from the
runs' files: a row's metrics with its cost (`Row`), a stage's hours (`stage_hours`, from results.json), a trained
row's (`run_cost`), a post-hoc row's (`posthoc_cost`), a tuning study's (`study_cost`), one row's columns
(`row_costs`) and their unit (`cost_unit`)."""
from __future__ import annotations

from pathlib import Path


# What reaching a row cost, in device-hours (wall seconds x processes / 3600: CPU-hours on CPU, GPU-hours on GPU).
# A stage's seconds are the trainer's own record (results.json wall_time_s): training with the per-epoch validation,
# the feature-cache build (stage 2), the final val/test evaluation; process start-up is not in it.
COST_PARTS = ("train_incl_val", "feature_cache_build", "final_eval")


class Row(dict):
    """A row's metrics ({"val": ..., "test": ...}; compares and serialises as that dict) with `cost`: {"train_h" (the
    row's own training), "stage1_h" (the stage-1 run it starts from, a post-hoc or stage-2 row's), "tune_h" (the tau
    sweep of a post-hoc row), "run", "stage1_run", "devices"}; an hour value None: not recorded in the files."""
    cost: dict

    def __init__(self, metrics: dict, cost: dict):
        super().__init__(metrics)
        self.cost = cost


def stage_hours(run: Path, stage: str) -> tuple[float | None, str | None]:
    """(device-hours, device) of the stage-`stage` run in `run`, from its results.json (None: not recorded there)."""
    from bigltr.config import ConfigError
    from bigltr.results import read_results

    try:
        res = read_results(run)
    except ConfigError:
        return None, None
    times = (res.get(f"stage{stage}") or {}).get("wall_time_s")
    if not isinstance(times, dict):
        return None, res.get("device")
    return (sum(float(times.get(k) or 0) for k in COST_PARTS) * int(res.get("world_size") or 1) / 3600,
            res.get("device"))


def _run_of(checkpoint) -> Path | None:
    """The run folder of `checkpoint` (RunDir.of_checkpoint: RUN/stage1/best.pt -> RUN) when it holds a results.json;
    None otherwise (a checkpoint copied out of its run has no cost on record)."""
    from bigltr.rundir import RunDir

    run = RunDir.of_checkpoint(checkpoint) if checkpoint else None
    return run.path if run is not None and run.results.is_file() else None


def run_cost(run: Path, stage: str) -> dict:
    """Row.cost of a trained row: its stage-`stage` run and, for stage 2, the stage-1 run of its stage1_checkpoint."""
    import yaml

    from bigltr.rundir import RunDir

    train_h, dev = stage_hours(run, stage)
    cost = {"train_h": train_h, "stage1_h": 0.0, "tune_h": 0.0, "run": str(run), "stage1_run": None,
            "devices": {dev}}
    if stage == "2":
        try:
            base = _run_of((RunDir(run).read_config() or {}).get("stage1_checkpoint"))
        except (OSError, yaml.YAMLError, AttributeError):
            base = None
        cost["stage1_h"], dev1 = stage_hours(base, "1") if base else (None, None)
        cost["stage1_run"] = str(base) if base else None
        cost["devices"].add(dev1)
    return cost


def posthoc_cost(ph: dict, checkpoint: Path, own: bool = False) -> dict:
    """Row.cost of a post-hoc row: the sweep (posthoc.json's wall_s, x its world_size) is its tuning, the checkpoint's
    stage-1 run the run it starts from (`own`: the row's own training, one-stage WB's)."""
    base = _run_of(checkpoint)
    base_h, dev = stage_hours(base, "1") if base else (None, None)
    sweep = ph.get("wall_s")
    sweep_h = None if sweep is None else float(sweep) * int(ph.get("world_size") or 1) / 3600
    cost = {"train_h": 0.0, "stage1_h": base_h, "tune_h": sweep_h, "run": None,
            "stage1_run": str(base) if base else None, "devices": {dev, ph.get("device")}}
    if own:
        cost.update(train_h=base_h, stage1_h=0.0, run=cost["stage1_run"], stage1_run=None)
    return cost


def study_cost(d: str | None, phase: int) -> dict | None:
    """What the phase's study of bigltr-tune output `d` cost: {"hours": sum of its trials' wall_s x world size (the
    trial's results.json, else another trial's, else 1), "runs": the trial folders, "devices"}; None: no study."""
    from bigltr.config import ConfigError
    from bigltr.results import read_results
    from bigltr.tune.folder import TuneFolder

    if not d:
        return None
    try:
        trials = TuneFolder(d).trials(phase)
    except (OSError, ValueError):
        return None
    if not trials:
        return None
    sizes, devices = {}, set()
    for t in trials:
        try:
            res = read_results(t.folder) if t.folder else {}
        except ConfigError:
            res = {}
        if res.get("world_size"):
            sizes[t.number] = int(res["world_size"])
        devices.add(res.get("device"))
    usual = max(sizes.values(), key=list(sizes.values()).count) if sizes else 1
    hours = sum((t.wall_s or 0) * sizes.get(t.number, usual) for t in trials) / 3600
    return {"hours": hours, "runs": {str(Path(t.folder).resolve()) for t in trials if t.folder},
            "devices": devices - {None} or {None}}


def row_costs(row: dict, study: dict | None = None) -> dict:
    """The cost columns of one row (hours; None: not recorded): train, stage 1, tune (the tau sweep and/or the study
    the row's values came from) and total = their sum, a run counted once (a row whose run is one of its study's
    trials has it in tune already)."""
    c = dict(getattr(row, "cost", None) or {"train_h": None, "stage1_h": None, "tune_h": None, "devices": {None}})
    devices = set(c.get("devices") or {None})
    if study:
        c["tune_h"] = None if c["tune_h"] is None else c["tune_h"] + study["hours"]
        devices |= study["devices"]
    parts = [c["stage1_h"], c["tune_h"]]
    if not (study and c.get("run") and str(Path(c["run"]).resolve()) in study["runs"]):
        parts.append(c["train_h"])
    total = None if any(p is None for p in parts) else sum(parts)
    return {"train_h": c["train_h"], "stage1_h": c["stage1_h"], "tune_h": c["tune_h"], "total_h": total,
            "devices": devices}


def cost_unit(devices: set) -> str:
    """CPU-h, GPU-h, or device-h when the runs used both or did not record which."""
    return {frozenset({"cpu"}): "CPU-h", frozenset({"cuda"}): "GPU-h"}.get(frozenset(devices) - {None}, "device-h")
