#!/usr/bin/env python
"""The iNaturalist-shaped rehearsal, timed: this checkout against a baseline checkout, on the same generated data.

Generates one synthetic iNat-2018-shaped source tree (`bigltr-rehearsal`: 8,142 classes, COCO JSON, 2-image classes,
odd files), then for each code tree (the baseline first, then this one) runs, as subprocesses with
OMP_NUM_THREADS=1: the converter with one worker (img/s per core), stage 1 for `--epochs` epochs with a small timm
model (img/s), stage 2 on cached features (feature cache build, stage-2 epoch, per-epoch val, final evaluation), and
a stage-2 run as a phase-2 tuning trial runs it (the baseline plots in every run; this checkout's tuner passes
`log.plots=false`). Prints one table with both and the ratio this / baseline, and the held-out share of train.

    git worktree add /tmp/base <commit>
    python tools/bench_rehearsal.py --baseline /tmp/base --scale 0.1 --out /tmp/rehearsal_bench

The baseline must be a checkout of bigltr whose package imports with this venv (PYTHONPATH is set to it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bigltr.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent


def _run(tree: Path, args: list[str], log: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n=== {' '.join(args)}\n")
        f.flush()
        r = subprocess.run([sys.executable, *args], cwd=tree, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.exit(f"{tree}: {' '.join(args[:4])} ... failed (exit {r.returncode}); see {log}")
    return time.perf_counter() - t


def measure(tree: Path, src: Path, out: Path, args) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    shards = out / "shards"
    convert = [str(tree / "tools" / "make_shards.py"), "inat", "--src", str(src), "--train-json",
               str(src / "train2018.json"), "--val-json", str(src / "val2018.json"), "--out", str(shards),
               "--workers", "1", "--no-progress", "--overwrite"]
    conv_s = _run(tree, convert, log)
    info = json.loads((shards / "_info.json").read_text())
    n_train = info["splits"]["train"]["num_samples"]
    n_val = info["splits"].get("val", {}).get("num_samples", 0)
    common = [f"data.root={shards}", f"data.img_size={args.img_size}", f"model.name={args.model}",
              "data.train_aug=none", "data.num_workers=1", "data.many_thr=100", "data.few_thr=20",
              f"stage1.epochs={args.epochs}", "stage2.epochs=2", "stage1.batch_size=64", "stage1.lr=0.05",
              "stage2.batch_size=256", "stage1.amp=none", "stage2.features=cached", "stage2.cache.views=center"]
    run = RunDir(out / "run")
    _run(tree, ["-m", "bigltr.train", "recipe=inat2018", f"out={run.path}", "stage=all", *common], log)
    res = json.loads(run.results.read_text())
    import csv

    s1 = list(csv.DictReader(open(run.stage(1).summary)))
    s2 = list(csv.DictReader(open(run.stage(2).summary)))
    w2 = res["stage2"]["wall_time_s"]
    trial_args = ["-m", "bigltr.train", "recipe=inat2018", f"out={out / 'trial'}", "stage=2",
                  f"stage1_checkpoint={run.best(1)}", *common, "stage2.weight_decay=1e-3"]
    if args.trial_keys:
        trial_args += args.trial_keys
    trial_s = _run(tree, trial_args, log)
    return {"held-out val (% of train+val)": 100.0 * n_val / max(1, n_train + n_val),
            "convert img/s (1 core)": (n_train + n_val + info["splits"]["test"]["num_samples"]) / conv_s,
            "stage-1 train img/s": sum(float(r["img_per_s"]) for r in s1) / len(s1),
            "stage-2 feature cache s": w2.get("feature_cache_build"),
            "stage-2 epoch s": sum(float(r["epoch_time_s"]) for r in s2) / len(s2),
            "stage-2 per-epoch val s": w2.get("per_epoch_val"),
            "stage-2 final eval s": w2.get("final_eval"),
            "tuning trial (stage 2) s": trial_s,
            "test All stage 2": res["stage2"]["test"]["all"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="a checkout of the code to compare with (e.g. a git worktree)")
    ap.add_argument("--out", default="runs/bench_rehearsal")
    ap.add_argument("--scale", type=float, default=0.1, help="bigltr-rehearsal --scale")
    ap.add_argument("--img-size", type=int, default=16)
    ap.add_argument("--model", default="test_resnet")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--trial-keys", nargs="*", default=["log.plots=false"],
                    help="keys this checkout's tuner adds to a trial")
    args = ap.parse_args(argv)
    out = Path(args.out)
    src = out / "src"
    out.mkdir(parents=True, exist_ok=True)
    if not (src / "rehearsal.json").is_file():  # one source tree for both checkouts (generated by this one)
        _run(ROOT, ["-m", "bigltr.data.rehearsal", "--dataset", "inat2018", "--out", str(src), "--scale",
                    str(args.scale), "--img-size", str(args.img_size), "--overwrite"], out / "generate.txt")
    base_keys, args.trial_keys = args.trial_keys, []
    base = measure(Path(args.baseline).resolve(), src, out / "baseline", args)
    args.trial_keys = base_keys
    this = measure(ROOT, src, out / "this", args)
    print(f"rehearsal at 8,142 classes (scale {args.scale}, {args.img_size}x{args.img_size}, {args.model}), "
          f"OMP_NUM_THREADS=1")
    print(f"| measure | baseline ({args.baseline}) | this checkout | this / baseline |")
    print("|---|---|---|---|")
    for k in this:
        a, b = base[k], this[k]
        ratio = f"{b / a:.2f}" if isinstance(a, (int, float)) and a else "-"
        print(f"| {k} | {a if a is None else round(a, 2)} | {b if b is None else round(b, 2)} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
