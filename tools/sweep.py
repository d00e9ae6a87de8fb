#!/usr/bin/env python
"""Weight-decay sweep: tune stage-1 weight decay (and optionally stage 2) on the balanced VALIDATION accuracy.

    python tools/sweep.py recipe=NAME out=DIR --grid 1e-4,5e-4,1e-3,5e-3,1e-2 [key=value ...]
    python tools/sweep.py recipe=NAME out=DIR --log-uniform 1e-5:1e-1 --trials 8 --seed 0
    python tools/sweep.py recipe=NAME out=DIR --grid 1e-3,5e-3 --stage2-wd 0.01,0.1 --radius 0.05,0.1
    python tools/sweep.py ... --launcher slurm [--dry-run]      # one Slurm job array per phase (slurm/sweep.sh)
    python tools/sweep.py ... --collect                          # summary from the trials finished so far

A trial is one ordinary run (`python -m bigltr.train recipe=NAME out=DIR/trials/<trial> ...`) in its own process;
every `key=value` given here is passed to every trial. Phase 1 runs stage 1 only (`stage=1`), one trial per
stage-1 weight decay. With --stage2-wd and/or --radius, phase 2 runs stage 2 only (`stage=2`) from the best
phase-1 trial's `stage1/best.pt`, one trial per (stage2.weight_decay, stage2.maxnorm.radius) combination.
Selection uses `results.json` stage1.val.all / stage2.val.all (balanced validation accuracy); test accuracy is
reported for information only. Ties go to the trial listed first (smallest value).

Resume rule: a trial is finished when its results.json holds the val metrics of its stage; finished trials are
never rerun (their config.yaml must match what the sweep would run now, else the sweep stops and says so);
anything else (no folder, partial folder, failed run) is run again.

Writes DIR/sweep_summary.{csv,md}, DIR/sweep.png (val accuracy against weight decay, log x axis) and
DIR/sweep_result.json (selected trials and the command for the full run). See docs/sweep.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bigltr.config import ConfigError, build_config, to_dict  # noqa: E402

SLURM_SCRIPT = ROOT / "slurm" / "sweep.sh"
S1_WD, S2_WD, RADIUS = "stage1.weight_decay", "stage2.weight_decay", "stage2.maxnorm.radius"
SHORT = {S1_WD: "wd", S2_WD: "wd", RADIUS: "radius"}  # names inside trial names: s1_wd=5e-03, s2_wd=1e-01_radius=...
GROUPS = ("all", "many", "medium", "few")
TAIL_LINES = 20  # stderr lines kept for a failed trial


class SweepError(Exception):
    """A usage error; the message says what to change."""


# ----------------------------------------------------------------------------------------------- values
def fmt_value(v: float) -> str:
    """Shortest exact scientific form, for trial names: 0.005 -> 5e-03, 0.0015 -> 1.5e-03, 0 -> 0."""
    if v == 0:
        return "0"
    for p in range(0, 16):
        s = f"{v:.{p}e}"
        if float(s) == v:
            return s
    return repr(v)


def yaml_float(v: float) -> str:
    """A float as the config's YAML parser reads it back as a float (PyYAML needs the dot: '1.0e-05', not '1e-05')."""
    s = repr(float(v))
    if "e" in s and "." not in s.split("e")[0]:
        mant, exp = s.split("e")
        s = f"{mant}.0e{exp}"
    return s


def parse_grid(text: str, option: str) -> list[float]:
    """'1e-4,5e-4,1e-3' -> sorted unique floats >= 0; any other syntax is an error naming the bad item."""
    items = [t.strip() for t in text.split(",")]
    values = []
    for t in items:
        if not t:
            raise SweepError(f"{option} {text!r}: empty item (expected comma-separated numbers, e.g. 1e-4,5e-4,1e-3)")
        try:
            v = float(t)
        except ValueError:
            raise SweepError(f"{option} {text!r}: {t!r} is not a number (expected comma-separated numbers, "
                             f"e.g. 1e-4,5e-4,1e-3)") from None
        if not math.isfinite(v) or v < 0:
            raise SweepError(f"{option} {text!r}: {t!r} must be a finite number >= 0")
        values.append(v)
    return sorted(set(values))


def log_uniform(text: str, trials: int | None, seed: int) -> list[float]:
    """`trials` samples of 10**U(log10 lo, log10 hi), rounded to 3 significant digits (readable, stable names)."""
    parts = text.split(":")
    try:
        lo, hi = (float(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        lo = hi = None
    if lo is None or not (0 < lo < hi) or not math.isfinite(hi):
        raise SweepError(f"--log-uniform {text!r}: expected LO:HI with 0 < LO < HI, e.g. 1e-5:1e-1")
    if not trials or trials < 1:
        raise SweepError("--log-uniform needs --trials N (N >= 1)")
    rng = random.Random(seed)
    values = {float(f"{10 ** rng.uniform(math.log10(lo), math.log10(hi)):.2e}") for _ in range(trials)}
    return sorted(values)


# ----------------------------------------------------------------------------------------------- trials
@dataclass
class Trial:
    name: str
    phase: int  # 1: stage 1 only; 2: stage 2 only from the best phase-1 checkpoint
    params: dict[str, float]  # the searched keys of this trial
    extra: list[str] = field(default_factory=list)  # overrides set by the sweep besides params (checkpoint)

    @property
    def stage(self) -> str:
        return str(self.phase)

    def overrides(self) -> list[str]:
        return [f"{k}={yaml_float(v)}" for k, v in self.params.items()]

    def argv(self, sw: "Sweep") -> list[str]:
        """The trainer's command line (after `python -m bigltr.train`)."""
        return ([f"recipe={sw.recipe}"] + sw.overrides + [f"out={self.dir(sw)}", f"stage={self.stage}"]
                + self.overrides() + self.extra)

    def dir(self, sw: "Sweep") -> Path:
        return sw.out / "trials" / self.name


def phase1_trials(values: list[float]) -> list[Trial]:
    return [Trial(f"s1_wd={fmt_value(v)}", 1, {S1_WD: v}) for v in values]


def phase2_trials(s2: dict[str, list[float]], source: Trial | None, checkpoint: str) -> list[Trial]:
    """One trial per combination of the stage-2 values, named after the phase-1 trial it starts from."""
    combos: list[dict[str, float]] = [{}]
    for key, values in s2.items():
        combos = [{**c, key: v} for c in combos for v in values]
    base = source.name if source else "s1_best"
    trials = []
    for c in combos:
        tag = "_".join(f"{SHORT[k]}={fmt_value(v)}" for k, v in c.items())
        trials.append(Trial(f"{base}__s2_{tag}", 2, c, [f"stage1_checkpoint={checkpoint}"]))
    return trials


# ----------------------------------------------------------------------------------------------- sweep state
@dataclass
class Sweep:
    recipe: str
    out: Path
    overrides: list[str]  # key=value passed to every trial
    s1_values: list[float]
    s2: dict[str, list[float]]  # stage-2 key -> values (empty: no phase 2)
    retry_failed: bool = True

    def results(self, t: Trial) -> dict | None:
        f = t.dir(self) / "results.json"
        try:
            return json.loads(f.read_text()) if f.is_file() else None
        except (OSError, json.JSONDecodeError):
            return None  # a half-written file (the trainer writes atomically, but be safe): not finished

    def finished(self, t: Trial) -> bool:
        res = self.results(t) or {}
        return "all" in res.get(f"stage{t.stage}", {}).get("val", {})

    def exit_code(self, t: Trial) -> int | None:
        f = t.dir(self) / "exit_code"
        try:
            return int(f.read_text().strip()) if f.is_file() else None
        except ValueError:
            return None

    def status(self, t: Trial) -> str:
        if self.finished(t):
            return "ok"
        rc = self.exit_code(t)
        if rc not in (None, 0):
            return f"failed (exit {rc})"
        if t.dir(self).exists():
            return "incomplete"
        return "pending"

    def todo(self, t: Trial) -> bool:
        """Run this trial now? Not when finished; not when failed and --no-retry-failed."""
        if self.finished(t):
            return False
        return self.retry_failed or not self.status(t).startswith("failed")

    def metrics(self, t: Trial, split: str) -> dict | None:
        res = self.results(t) or {}
        return res.get(f"stage{t.stage}", {}).get(split)

    def best(self, trials: list[Trial]) -> Trial | None:
        """Highest balanced validation accuracy; ties go to the first trial listed."""
        done = [t for t in trials if self.finished(t)]
        return max(done, key=lambda t: self.metrics(t, "val")["all"], default=None)

    def check_not_stale(self, t: Trial) -> None:
        """A finished trial must have been run with the config this sweep would use now."""
        f = t.dir(self) / "config.yaml"
        if not f.is_file():
            return
        import yaml

        old = yaml.safe_load(f.read_text())
        if not isinstance(old, dict):
            return
        new = to_dict(build_config(t.argv(self)))
        # out / stage1_checkpoint are paths (a moved sweep folder is fine); the trial name fixes what they point to
        diff = sorted(k for k in _diff_keys(old, new) if k not in ("out", "stage1_checkpoint"))
        if diff:
            raise SweepError(f"trial {t.dir(self)} was finished with a different config ({', '.join(diff[:6])}"
                             f"{' ...' if len(diff) > 6 else ''} differ from this sweep's); use another out= or "
                             f"delete that trial folder to rerun it")

    def phase2(self, best1: Trial | None) -> list[Trial]:
        if not self.s2:
            return []
        ckpt = best1.dir(self) / "stage1" / "best.pt" if best1 else self.out / "trials" / "s1_best" / "stage1/best.pt"
        return phase2_trials(self.s2, best1, str(ckpt))


def _diff_keys(a, b, prefix="") -> list[str]:
    """Keys whose values differ. Keys on one side only are skipped: a run written before a config key existed
    (or after one was removed) still counts as the same run."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) & set(b)):
            out += _diff_keys(a[k], b[k], f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


# ----------------------------------------------------------------------------------------------- running
def run_local(sw: Sweep, t: Trial) -> None:
    """Run one trial in a subprocess; a crash is recorded (exit_code, stderr tail), never raised."""
    d = t.dir(sw)
    d.mkdir(parents=True, exist_ok=True)
    (d / "exit_code").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bigltr.train", *t.argv(sw)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    err_path = d / "stderr.log"
    t0 = time.perf_counter()
    with open(d / "stdout.log", "ab") as fo, open(err_path, "ab") as fe:
        stamp = f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode()
        fo.write(stamp)
        fe.write(stamp)
        fe.flush()
        start = err_path.stat().st_size
        rc = subprocess.run(cmd, stdout=fo, stderr=fe, env=env).returncode
    (d / "exit_code").write_text(f"{rc}\n")
    secs = time.perf_counter() - t0
    if rc == 0 and sw.finished(t):
        val = sw.metrics(t, "val")["all"]
        print(f"[sweep]   done in {secs:.0f} s: val all {val:.2f}", flush=True)
    else:
        print(f"[sweep]   FAILED (exit {rc}) after {secs:.0f} s; last lines of {err_path}:", flush=True)
        print("\n".join("      " + line for line in stderr_tail(err_path, start).splitlines()), flush=True)


def stderr_tail(path: Path, start: int = 0, lines: int = TAIL_LINES) -> str:
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    return "\n".join(text.strip().splitlines()[-lines:])


def run_phase_local(sw: Sweep, trials: list[Trial], dry_run: bool) -> None:
    for i, t in enumerate(trials, 1):
        head = f"[sweep] phase {t.phase} trial {i}/{len(trials)} {t.name}"
        if sw.finished(t):
            print(f"{head}: skipped (finished: val all {sw.metrics(t, 'val')['all']:.2f})", flush=True)
            continue
        if not sw.todo(t):
            print(f"{head}: skipped ({sw.status(t)}; --no-retry-failed)", flush=True)
            continue
        cmd = shlex.join([sys.executable, "-m", "bigltr.train", *t.argv(sw)])
        if dry_run:
            print(f"{head}: would run\n    {cmd}", flush=True)
            continue
        print(f"{head}: running (logs in {t.dir(sw)}/std{{out,err}}.log)", flush=True)
        run_local(sw, t)
        write_summary(sw, plot=False)  # keep the table current while the sweep runs


def index_ranges(idx: list[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2,5,7-8' (Slurm's --array syntax)."""
    parts, i = [], 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        parts.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ",".join(parts)


def launch_slurm(sw: Sweep, trials: list[Trial], args) -> int:
    """Write the phase's trials file (line i = trial i's trainer arguments) and submit an array of the unfinished."""
    phase = trials[0].phase
    tfile = sw.out / ("trials.txt" if phase == 1 else f"trials_phase{phase}.txt")
    sw.out.mkdir(parents=True, exist_ok=True)
    tfile.write_text("".join(shlex.join(t.argv(sw)) + "\n" for t in trials))
    todo = [i for i, t in enumerate(trials) if sw.todo(t)]
    for i, t in enumerate(trials):
        if i not in todo:
            print(f"[sweep] phase {phase} {t.name}: skipped ({sw.status(t)})")
    array = index_ranges(todo) + (f"%{args.max_parallel}" if args.max_parallel else "")
    (sw.out / "slurm").mkdir(exist_ok=True)
    export = {"BIGLTR_ROOT": str(ROOT), "BIGLTR_PYTHON": os.environ.get("BIGLTR_PYTHON", sys.executable)}
    cmd = (["sbatch", "--parsable", f"--array={array}", f"--job-name=sweep-{sw.out.name}-p{phase}",
            f"--output={sw.out / 'slurm' / '%A_%a.out'}", f"--chdir={os.getcwd()}",
            "--export=ALL," + ",".join(f"{k}={v}" for k, v in export.items())]
           + shlex.split(args.sbatch_args or "") + [str(SLURM_SCRIPT), str(tfile)])
    print(f"[sweep] phase {phase}: {len(todo)} of {len(trials)} trials to run; trials file {tfile}")
    if args.dry_run:
        print("[sweep] dry run; submit with:\n" + shlex.join(cmd))
        return 0
    _refuse_if_active(sw)
    if shutil.which("sbatch") is None:
        raise SweepError("sbatch not found on PATH; run on a Slurm login node, or use --dry-run to see the command")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SweepError(f"sbatch failed (exit {proc.returncode}): {proc.stderr.strip()}")
    job = proc.stdout.strip().split(";")[0]
    launches = _launches(sw)
    launches.append({"phase": phase, "job": job, "array": array, "trials_file": str(tfile),
                     "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    (sw.out / "slurm_launches.json").write_text(json.dumps(launches, indent=1))
    print(f"[sweep] submitted job array {job} ({shlex.join(cmd)})")
    print("[sweep] when it has finished: rerun this command (next phase / retries), or add --collect for the summary")
    return 0


def _launches(sw: Sweep) -> list:
    f = sw.out / "slurm_launches.json"
    return json.loads(f.read_text()) if f.is_file() else []


def _refuse_if_active(sw: Sweep) -> None:
    """Do not submit a second array while an earlier one of this sweep still has tasks queued or running."""
    launches = _launches(sw)
    if not launches or shutil.which("squeue") is None:
        return
    job = launches[-1]["job"]
    q = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T"], capture_output=True, text=True)
    if q.returncode == 0 and q.stdout.strip():
        raise SweepError(f"job array {job} of this sweep is still queued/running; wait for it (or scancel {job}), "
                         f"then rerun; --collect shows the trials finished so far")


# ----------------------------------------------------------------------------------------------- summary
def write_summary(sw: Sweep, plot: bool = True) -> dict:
    p1 = phase1_trials(sw.s1_values)
    best1 = sw.best(p1)
    p2 = sw.phase2(best1) if best1 else []
    best2 = sw.best(p2)
    rows = []
    for t in p1 + p2:
        val, test = sw.metrics(t, "val") or {}, sw.metrics(t, "test") or {}
        rows.append({"phase": t.phase, "trial": t.name, "overrides": " ".join(t.overrides()),
                     **{f"val_{g}": _num(val.get(g)) for g in GROUPS}, "test_all_info_only": _num(test.get("all")),
                     "status": sw.status(t), "selected": "yes" if t in (best1, best2) else ""})
    sw.out.mkdir(parents=True, exist_ok=True)
    with open(sw.out / "sweep_summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (sw.out / "sweep_summary.md").write_text(_markdown(sw, rows, p1 + p2))
    command = final_command(sw, best1, best2)
    result = {"recipe": sw.recipe, "overrides": sw.overrides,
              "selected_on": "balanced validation accuracy (results.json stageN.val.all)",
              "phase1": _sel(sw, best1), "phase2": _sel(sw, best2) if sw.s2 else None, "command": command}
    (sw.out / "sweep_result.json").write_text(json.dumps(result, indent=1))
    if plot:
        plot_sweep(sw, p1, best1, p2, best2, sw.out / "sweep.png")
    return result


def _num(v):
    return "" if v is None else f"{v:.2f}"


def _sel(sw: Sweep, t: Trial | None):
    if t is None:
        return None
    return {"trial": t.name, "params": t.params, "val": {g: sw.metrics(t, "val")[g] for g in GROUPS},
            "test_all_info_only": (sw.metrics(t, "test") or {}).get("all"), "dir": str(t.dir(sw))}


def _markdown(sw: Sweep, rows: list[dict], trials: list[Trial]) -> str:
    lines = [f"# Weight-decay sweep: recipe `{sw.recipe}`", "",
             f"Common overrides: `{shlex.join(sw.overrides) or '(none)'}`. Selection: highest balanced **validation** "
             "accuracy (val all); the test column is for information only and plays no part in the selection. "
             "Selected rows are marked **\u2605**.", "",
             "| phase | trial | overrides | val all | val many | val medium | val few | test all (info only) "
             "| status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " **\u2605**" if r["selected"] else ""
        lines.append(f"| {r['phase']} | {r['trial']}{mark} | `{r['overrides']}` | {r['val_all']} | {r['val_many']} | "
                     f"{r['val_medium']} | {r['val_few']} | {r['test_all_info_only']} | {r['status']} |")
    failed = [t for t in trials if sw.status(t).startswith("failed")]
    if failed:
        lines += ["", "## Failed trials", ""]
        for t in failed:
            lines += [f"`{t.name}` ({sw.status(t)}), last lines of `{t.dir(sw) / 'stderr.log'}`:", "", "```",
                      stderr_tail(t.dir(sw) / "stderr.log", lines=10), "```", ""]
    return "\n".join(lines) + "\n"


def final_command(sw: Sweep, best1: Trial | None, best2: Trial | None) -> str | None:
    if best1 is None:
        return None
    params = {**best1.params, **(best2.params if best2 else {})}
    tag = "_".join(f"{'s1' if k == S1_WD else 's2'}{SHORT[k]}{fmt_value(v)}" for k, v in params.items())
    out = f"runs/{Path(sw.recipe).stem}_{tag}"
    return shlex.join(["python", "-m", "bigltr.train", f"recipe={sw.recipe}", f"out={out}", *sw.overrides,
                       *[f"{k}={yaml_float(v)}" for k, v in params.items()]])


def plot_sweep(sw: Sweep, p1, best1, p2, best2, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(p1, best1, S1_WD, "phase 1: stage 1 only")]
    if sw.s2:
        keys = list(sw.s2)
        x_key = S2_WD if S2_WD in keys and len(sw.s2[S2_WD]) > 1 or RADIUS not in keys else RADIUS
        panels.append((p2, best2, x_key, f"phase 2: stage 2 from {best1.name if best1 else '(no phase-1 result)'}"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.2), squeeze=False)
    for ax, (trials, best, x_key, title) in zip(axes[0], panels):
        done = [t for t in trials if sw.finished(t)]
        xs = sorted({t.params[x_key] for t in trials})
        pos = _log_positions(xs)
        # one line per value of the other stage-2 key (if both vary), else a single line
        other = [k for k in (trials[0].params if trials else {}) if k != x_key]
        series: dict[tuple, list[Trial]] = {}
        for t in done:
            series.setdefault(tuple((k, t.params[k]) for k in other), []).append(t)
        for label_key, ts in series.items():
            ts = sorted(ts, key=lambda t: t.params[x_key])
            lab = ", ".join(f"{SHORT[k]}={fmt_value(v)}" for k, v in label_key)
            ax.plot([pos[t.params[x_key]] for t in ts], [sw.metrics(t, "val")["all"] for t in ts], "o-", lw=2,
                    label=f"val all{' (' + lab + ')' if lab else ''}")
            if not label_key:
                for g, style in (("many", ":"), ("medium", "--"), ("few", "-.")):
                    ax.plot([pos[t.params[x_key]] for t in ts], [sw.metrics(t, "val")[g] for t in ts], style,
                            marker=".", lw=1, alpha=0.7, label=f"val {g}")
        failed = [t for t in trials if sw.status(t).startswith("failed")]
        if failed:
            ax.plot([pos[t.params[x_key]] for t in failed], [0] * len(failed), "rx", ms=9, label="failed")
        if best is not None:
            bx, by = pos[best.params[x_key]], sw.metrics(best, "val")["all"]
            ax.axvline(bx, color="grey", lw=1, ls="--")
            ax.plot([bx], [by], "*", ms=16, color="C3", label=f"selected {x_key}={fmt_value(best.params[x_key])}")
        ax.set_xscale("log")
        ax.set_xticks(list(pos.values()))
        ax.set_xticklabels([fmt_value(x) for x in pos], rotation=30, fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel(x_key + (" (0 drawn left of the smallest value)" if 0.0 in pos else "") + ", log scale")
        ax.set_ylabel("balanced validation accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"weight-decay sweep, recipe {sw.recipe} (selection on validation)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log_positions(xs: list[float]) -> dict[float, float]:
    """x -> position on a log axis; 0 (no weight decay) is drawn one decade left of the smallest positive value."""
    pos_vals = [x for x in xs if x > 0]
    zero_at = (min(pos_vals) / 10) if pos_vals else 1e-4
    return {x: (x if x > 0 else zero_at) for x in xs}


# ----------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/sweep.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe=NAME and out=DIR (required), then overrides passed to every trial")
    s = p.add_argument_group("search (stage-1 weight decay: one of --grid / --log-uniform)")
    s.add_argument("--grid", help="stage1.weight_decay values, comma-separated, e.g. 0,1e-4,5e-4,1e-3,5e-3")
    s.add_argument("--log-uniform", metavar="LO:HI", help="sample stage1.weight_decay log-uniformly in [LO, HI]")
    s.add_argument("--trials", type=int, help="number of --log-uniform samples")
    s.add_argument("--seed", type=int, default=0, help="seed of the --log-uniform samples (default 0)")
    s.add_argument("--stage2-wd", metavar="GRID", help="phase 2: stage2.weight_decay values (comma-separated)")
    s.add_argument("--radius", metavar="GRID", help="phase 2: stage2.maxnorm.radius values (comma-separated)")
    r = p.add_argument_group("running")
    r.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local: trials one after another here (default); slurm: a job array per phase")
    r.add_argument("--dry-run", action="store_true", help="print the trial commands / the sbatch command only")
    r.add_argument("--collect", action="store_true", help="only build the summary from the finished trials")
    r.add_argument("--no-retry-failed", dest="retry_failed", action="store_false",
                   help="do not rerun trials that failed (exit code != 0) in an earlier invocation")
    r.add_argument("--sbatch-args", metavar="'OPTS'",
                   help="extra sbatch options, in the = form: --sbatch-args='--partition=gpu --time=8:00:00'")
    r.add_argument("--max-parallel", type=int, help="Slurm: at most this many array tasks at once (--array=...%%N)")
    return p


def make_sweep(args) -> Sweep:
    if args.grid is None and args.log_uniform is None:
        raise SweepError("no search given: use --grid 1e-4,5e-4,1e-3 or --log-uniform 1e-5:1e-1 --trials N "
                         "(stage1.weight_decay values)")
    if args.grid is not None and args.log_uniform is not None:
        raise SweepError("give either --grid or --log-uniform, not both")
    if args.trials is not None and args.log_uniform is None:
        raise SweepError("--trials goes with --log-uniform (a --grid lists its values)")
    values = parse_grid(args.grid, "--grid") if args.grid is not None else \
        log_uniform(args.log_uniform, args.trials, args.seed)
    s2 = {}
    if args.stage2_wd is not None:
        s2[S2_WD] = parse_grid(args.stage2_wd, "--stage2-wd")
    if args.radius is not None:
        s2[RADIUS] = parse_grid(args.radius, "--radius")

    bad = [a for a in args.overrides if "=" not in a or a.startswith("=")]
    if bad:
        raise SweepError(f"argument {bad[0]!r} is neither a --flag nor key=value (e.g. stage1.epochs=10)")
    keyed = {}
    for a in args.overrides:
        keyed.setdefault(a.split("=", 1)[0].strip().lstrip("-"), []).append(a)
    recipe = keyed.pop("recipe", [None])[-1]
    out = keyed.pop("out", [None])[-1]
    if not recipe or recipe == "recipe=":
        raise SweepError("recipe=NAME is required (a name in recipes/ or a path)")
    if not out or out == "out=":
        raise SweepError("out=DIR is required (the sweep folder; trials go to DIR/trials/<name>)")
    owned = {"stage": "the sweep sets stage=1 (phase 1) and stage=2 (phase 2) itself",
             "stage1_checkpoint": "phase 2 starts from the best phase-1 trial's checkpoint",
             S1_WD: "it is the searched key: give its values with --grid or --log-uniform"}
    if S2_WD in s2:
        owned[S2_WD] = "it is searched in phase 2 (--stage2-wd)"
    if RADIUS in s2:
        owned[RADIUS] = "it is searched in phase 2 (--radius)"
    for k in keyed:
        if k in owned:
            raise SweepError(f"'{k}' cannot be overridden in a sweep: {owned[k]}")
    overrides = [a for a in args.overrides if a.split("=", 1)[0].strip().lstrip("-") not in ("recipe", "out")]
    return Sweep(recipe=recipe.split("=", 1)[1], out=Path(out.split("=", 1)[1]).expanduser().resolve(),
                 overrides=overrides, s1_values=values, s2=s2, retry_failed=args.retry_failed)


def validate(sw: Sweep, local: bool) -> None:
    """Build every trial's config (phase 2 with a placeholder checkpoint) before anything runs."""
    p1 = phase1_trials(sw.s1_values)
    for t in p1 + sw.phase2(None):
        try:
            cfg = build_config(t.argv(sw))
        except ConfigError as e:
            raise SweepError(f"config error in trial {t.name}: {e}") from None
    root = Path(cfg.data.root)
    if not (root / "_info.json").is_file():
        msg = f"data.root {root} has no _info.json (make shards with tools/make_shards.py)"
        if local:
            raise SweepError(msg + "; every trial would fail")
        print(f"[sweep] warning: {msg} on this machine; the Slurm nodes must see it", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        sw = make_sweep(args)
        validate(sw, local=args.launcher == "local" and not args.collect and not args.dry_run)
        p1 = phase1_trials(sw.s1_values)
        for t in p1:
            if sw.finished(t):
                sw.check_not_stale(t)
        if args.collect:
            return report(sw, collect=True)
        if args.launcher == "slurm":
            todo1 = [t for t in p1 if sw.todo(t)]
            if todo1:
                return launch_slurm(sw, p1, args)
            best1 = sw.best(p1)
            p2 = sw.phase2(best1)
            if not p2:
                print("[sweep] phase 1: every trial is finished; nothing to launch")
                return report(sw)
            if best1 is None:
                print("[sweep] phase 1: no trial finished, so phase 2 cannot start", file=sys.stderr)
                return report(sw)
            for t in p2:
                if sw.finished(t):
                    sw.check_not_stale(t)
            if any(sw.todo(t) for t in p2):
                return launch_slurm(sw, p2, args)
            print("[sweep] phase 2: every trial is finished; nothing to launch")
            return report(sw)

        print(f"[sweep] {sw.out}: phase 1 = {len(p1)} stage-1 trials"
              + (f", then phase 2 = {len(sw.phase2(None))} stage-2 trials from the best" if sw.s2 else ""))
        run_phase_local(sw, p1, args.dry_run)
        if sw.s2:
            best1 = sw.best(p1)
            if best1 is None:
                print("[sweep] phase 1: no trial finished; phase 2 not run", file=sys.stderr)
            else:
                print(f"[sweep] phase 1 selected {best1.name} (val all {sw.metrics(best1, 'val')['all']:.2f})")
                p2 = sw.phase2(best1)
                for t in p2:
                    if sw.finished(t):
                        sw.check_not_stale(t)
                run_phase_local(sw, p2, args.dry_run)
        if args.dry_run:
            return 0
        return report(sw)
    except SweepError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2


def report(sw: Sweep, collect: bool = False) -> int:
    """Write the summary files and plot; print the selection and the command for the full run."""
    res = write_summary(sw)
    p1 = phase1_trials(sw.s1_values)
    counts = {}
    for t in p1 + (sw.phase2(sw.best(p1)) if sw.best(p1) else []):
        counts[sw.status(t).split(" ")[0]] = counts.get(sw.status(t).split(" ")[0], 0) + 1
    print(f"[sweep] trials: {', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}; summary in "
          f"{sw.out / 'sweep_summary.md'}, plot {sw.out / 'sweep.png'}")
    print((sw.out / "sweep_summary.md").read_text())
    if res["phase1"] is None:
        print("[sweep] no phase-1 trial finished: nothing selected", file=sys.stderr)
        return 1
    s1 = res["phase1"]
    print(f"[sweep] selected {S1_WD}={fmt_value(s1['params'][S1_WD])} (trial {s1['trial']}, val all "
          f"{s1['val']['all']:.2f}; test all {s1['test_all_info_only']:.2f}, for information only)")
    if sw.s2:
        if res["phase2"] is None:
            print("[sweep] phase 2: no trial finished yet" + (" (run the sweep without --collect to launch it)"
                                                              if collect else ""), file=sys.stderr)
        else:
            s2 = res["phase2"]
            print("[sweep] selected " + " ".join(f"{k}={fmt_value(v)}" for k, v in s2["params"].items())
                  + f" (trial {s2['trial']}, val all {s2['val']['all']:.2f}; test all "
                  f"{s2['test_all_info_only']:.2f}, for information only)")
    print(f"[sweep] full run with the selected value(s):\n  {res['command']}")
    return 0 if (res["phase2"] is not None or not sw.s2) else 1


if __name__ == "__main__":
    sys.exit(main())
