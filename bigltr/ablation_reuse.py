"""Which finished runs stand in for bigltr-ablation's rows (bigltr.ablation): a row's finished run, reused or else
trained (`run_or_reuse`), whether a run's config is the row's (`reuse_problem`), a tuning study's trials
(`study_trial`) and what the study cost (`study_budget`), and the rows' tuned values (`tuned_overrides`)."""
from __future__ import annotations

from pathlib import Path

from bigltr.ablation_cost import Row, run_cost


def _finished(run: Path, stage: str) -> dict | None:
    """The run's stage-`stage` results when that stage has finished (bigltr.results' rule), else None."""
    from bigltr.config import ConfigError
    from bigltr.results import finished_stage, read_results

    try:
        return finished_stage(read_results(run), stage)
    except ConfigError as e:  # a damaged results.json: one line, what to do
        raise SystemExit(f"[ablation] {e}") from None


def run_or_reuse(train, run: Path, stage: str, argv: list[str], trial: Path | None = None) -> tuple[Path, Row]:
    """(run folder, results as a Row, with its cost): the finished results of `trial` (a tuning study's run, when its
    config is this row's) or of `run` (this ablation's own folder, which must hold this row's config); else train
    `run` (train=None: --no-train, an error saying which row is missing)."""
    res = _finished(trial, stage) if trial is not None else None
    why = reuse_problem(trial, argv, stage) if res is not None else None
    if res is not None and not why:
        print(f"[ablation] reusing {trial}")
        return trial, Row(res, run_cost(trial, stage))
    if why:
        print(f"[ablation] not reusing {trial}: {why}")
    res = _finished(run, stage)
    if res is not None:
        other = reuse_problem(run, argv, stage)
        if other:
            raise SystemExit(f"[ablation] {run} holds another run ({other}): give this ablation its own out=DIR")
        print(f"[ablation] reusing {run}")
        return run, Row(res, run_cost(run, stage))
    if train is None:
        raise SystemExit(f"[ablation] --no-train: no finished run for {run.name}"
                         + (f" ({trial} is not it: {why})" if why else "") + f"; it would train {' '.join(argv)}")
    rc = train(argv + [f"stage={stage}", f"out={run}"])
    if rc != 0:
        raise SystemExit(f"[ablation] run {run} failed with exit code {rc}")
    res = _finished(run, stage)
    if res is None:
        raise SystemExit(f"[ablation] run {run} exited 0 but its results.json has no finished stage{stage}")
    return run, Row(res, run_cost(run, stage))


def _same(a: str, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a).lower() == str(b).lower()


def study_trial(d: str | None, phase: int, params: dict | None = None) -> Path | None:
    """The run folder of a finished trial in bigltr-tune output `d`: the phase's best trial, or (`params` given) the
    COMPLETE trial of the phase's study whose values are exactly `params` (bigltr.tune.TuneFolder: tune_trials.json,
    or an older folder's tune_summary.csv). None when there is none."""
    from bigltr.tune.folder import TuneFolder

    if not d:
        return None
    folder = TuneFolder(d)
    try:
        sel = folder.selected(phase)
    except (OSError, ValueError):
        return None
    if not sel:
        return None
    if params is None:
        return Path(sel["dir"]) if sel.get("dir") else None
    try:
        trials = folder.trials(phase)
    except (OSError, ValueError):
        return None
    for t in trials:
        if t.state == "COMPLETE" and t.params.keys() == params.keys() and \
                all(_same(t.params[k], v) for k, v in params.items()):
            return t.folder
    return None


def study_budget(d: str | None, phase: int) -> str:
    """What tuning the phase's study of bigltr-tune output `d` cost: its trials (by state) and their summed wall
    time (bigltr.tune.TuneFolder); "" when there is no such study."""
    from bigltr.tune.folder import TuneFolder

    if not d:
        return ""
    try:
        trials = TuneFolder(d).trials(phase)
    except (OSError, ValueError):
        return ""
    if not trials:
        return ""
    states = {st: sum(t.state == st for t in trials) for st in ("COMPLETE", "PRUNED", "FAIL")}
    wall = sum(t.wall_s or 0 for t in trials)
    extra = ", ".join(f"{n} {st.lower()}" for st, n in states.items() if n and st != "COMPLETE")
    return f"{len(trials)} trial{'s' * (len(trials) != 1)}{f' ({extra})' if extra else ''}, {wall / 60:.1f} min"


# Keys that do not change a run's numbers: where and how it ran. Everything else must be equal for a study's trial to
# stand in for an ablation row (a trial of another dataset, schedule or evaluation is never reused silently).
REUSE_IGNORED = ("recipe", "out", "resume", "stage", "device", "log_every", "ckpt_every_steps", "preempt_check_every",
                 "data.num_workers", "data.pin_memory", "stage2.cache.location", "stage2.cache.dir", "dist.", "log.")


def reuse_problem(run: Path, argv: list[str], stage: str) -> str | None:
    """Why `run` (its config.yaml) is not the stage-`stage` run that `argv` describes; None when it is. The first
    key that differs (bigltr.config.config_diff, in the config's key order) is named; the other stage's keys do not
    count, nor (for stage 1) stage1_checkpoint."""
    import yaml

    from bigltr.config import Config, build_config, config_diff, flatten, to_dict
    from bigltr.rundir import RunDir

    try:
        saved = flatten(RunDir(run).read_config() or {})
    except (OSError, yaml.YAMLError, AttributeError) as e:
        return f"its config.yaml is unreadable ({e})"
    ignore = REUSE_IGNORED + (("stage2.", "stage1_checkpoint") if stage == "1" else ("stage1.",))
    # a key the saved config lacks (a run of an older bigltr) counts as its default, as resume=auto reads it
    diffs = config_diff(saved, to_dict(build_config(argv)), ignore, defaults=to_dict(Config()), same=_same_setting)
    if diffs:
        key, have, want = diffs[0]
        return f"it ran with {key}={have!r}, this row needs {want!r}"
    return None


def _same_setting(key: str, have, want) -> bool:
    """Whether a run's saved value `have` of `key` is the wanted one: paths (data.root, stage1_checkpoint) that
    resolve to the same place, lists equal, anything else equal or `_same` (numbers by value, text by case)."""
    if key in ("data.root", "stage1_checkpoint"):
        return bool(have) == bool(want) and (not want or Path(have).resolve() == Path(want).resolve())
    return have == want if isinstance(want, (list, dict)) else (have == want or _same(str(have), want))


def tuned_overrides(tuned: str | None, row5: str | None = None, row6: str | None = None,
                    row7: str | None = None) -> dict[int, list[str]]:
    """key=value overrides per ablation row (2, 5, 6, 7) from bigltr-tune's tune_result.json files."""
    def load(d: str, phase: int) -> dict | None:
        from bigltr.tune.folder import TuneFolder

        try:
            sel = TuneFolder(d).selected(phase)
        except OSError as e:
            raise SystemExit(f"[ablation] {e.filename} not readable ({e.strerror}): run bigltr-tune with out={d} "
                             "first") from None
        except ValueError as e:
            raise SystemExit(f"[ablation] {d}: damaged tune_result.json ({e})") from None
        return sel["params"] if sel else None

    def kv(params: dict) -> list[str]:
        return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in params.items()]

    rows: dict[int, list[str]] = {2: [], 5: [], 6: [], 7: []}
    if tuned:
        rows[2] = kv(load(tuned, 1) or {})
        p2 = load(tuned, 2) or {}
        rows[7] = kv(p2)
        rows[5] = kv({k: v for k, v in p2.items() if not k.startswith("stage2.maxnorm.")})
        rows[6] = kv({k: v for k, v in p2.items() if k != "stage2.weight_decay"})
    for row, d in ((5, row5), (6, row6), (7, row7)):
        if d:
            params = load(d, 2)
            if params is None:
                raise SystemExit(f"[ablation] {d}/tune_result.json has no phase-2 result for row {row}")
            rows[row] = kv(params)
    return rows
