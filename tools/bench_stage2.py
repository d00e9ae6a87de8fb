#!/usr/bin/env python
"""Stage 2, online vs cached features: wall time and accuracy, through the real trainer.

Runs stage 2 from the same stage-1 checkpoint (same seed, same loss / weight decay / MaxNorm): with
`stage2.features=online` (the frozen backbone runs on every batch of every epoch and on the validation split after
every epoch, as the reference code), with `stage2.features=cached` (backbone once over the training split per view
and once over the validation split, into a disk cache: a tuner's first stage-2 trial), and `cached_reused` (the same
cache dir again: every later trial). Timed per mode: the train loops, the per-epoch validation and the cache build,
i.e. everything stage 2 does before its final evaluation (`wall_time_s.train_incl_val`: the cost of one stage-2
trial of a tuner); the final val/test evaluation (which also builds the test split's cache in the cached modes) is
reported apart. Also prints the balanced test accuracy difference.

    # on the demo data, reusing the demo's stage 1
    python tools/bench_stage2.py --data data/fmnist_lt --stage1-checkpoint runs/demo/stage1/best.pt
    # on the demo data, a 1-epoch stage 1 trained first
    python tools/bench_stage2.py --data data/fmnist_lt --stage1-epochs 1
    # anywhere (e.g. a lent GPU): synthetic idx data through the real converter, stage 1 trained first
    python tools/bench_stage2.py --synthetic 3000 --stage1-epochs 1

Needs the package installed (``pip install -e .`` or ``make venv`` in the repository root).
"""
from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
from pathlib import Path

from bigltr.rundir import RunDir


def train_seconds(run: Path) -> float:
    rows = list(csv.DictReader(open(RunDir(run).stage(2).summary)))
    return sum(float(r["epoch_time_s"]) for r in rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="")
    ap.add_argument("--synthetic", type=int, default=0, help="images per class of generated data (no --data)")
    ap.add_argument("--stage1-checkpoint", default="")
    ap.add_argument("--stage1-epochs", type=int, default=1)
    ap.add_argument("--recipe", default="fmnist_lt")
    ap.add_argument("--epochs", type=int, default=10, help="stage-2 epochs (paper: 10)")
    ap.add_argument("--views", default="center", choices=["center", "center_flip", "augment"])
    ap.add_argument("--num-aug", type=int, default=4)
    ap.add_argument("--out", default="runs/bench_stage2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--modes", default="online,cached,cached_reused",
                    help="online; cached (disk cache in <out>/cache, built: a tuner's first trial); cached_reused "
                         "(the same cache dir again: every later trial; needs cached first)")
    ap.add_argument("overrides", nargs="*", help="extra key=value for every run")
    args = ap.parse_args(argv)

    from bigltr.train import main as train
    from bigltr.results import read_results

    out = Path(args.out)
    data = args.data
    if not data:
        from bigltr.data.sources.cli import main as make_shards_main
        from bigltr.data.synthetic import make_fake_idx

        tmp = Path(tempfile.mkdtemp(prefix="bench_stage2_"))
        make_fake_idx(tmp / "idx", per_class_train=args.synthetic or 3000, per_class_test=100)
        data = str(tmp / "shards")
        n_max = int((args.synthetic or 3000) * 0.8)
        make_shards_main(["idx", "--src", str(tmp / "idx"), "--out", data, "--n-max", str(n_max), "--imbalance",
                          "10", "--val-per-class", "10", "--maxcount", "2000", "--no-progress"])
    common = [f"recipe={args.recipe}", f"data.root={data}", f"device={args.device}", *args.overrides]
    ckpt = args.stage1_checkpoint
    if not ckpt:
        assert train(common + ["stage=1", f"out={out / 'stage1'}", f"stage1.epochs={args.stage1_epochs}"]) == 0
        ckpt = str(RunDir(out / "stage1").best(1))  # the stage-1 run's out= is <out>/stage1
    s2 = common + ["stage=2", f"stage1_checkpoint={ckpt}", f"stage2.epochs={args.epochs}"]
    cached = ["stage2.features=cached", f"stage2.cache.views={args.views}", f"stage2.cache.num_aug={args.num_aug}",
              "stage2.cache.location=disk", f"stage2.cache.dir={out / 'cache'}"]
    modes = args.modes.split(",")
    if "cached" in modes and (out / "cache").exists():
        shutil.rmtree(out / "cache")  # the cached mode measures the build
    res = {}
    for mode in modes:
        run = out / mode
        assert train(s2 + [f"out={run}"] + (cached if mode.startswith("cached") else ["stage2.features=online"])) == 0
        r = read_results(run)["stage2"]
        w = r["wall_time_s"]
        res[mode] = {"total_s": w["train_incl_val"], "loops_s": train_seconds(run), "val_s": w["per_epoch_val"],
                     "cache_s": w["feature_cache_build"], "final_s": w["final_eval"], "test": r["test"],
                     "epochs_s": [round(float(row["epoch_time_s"]), 1)
                                  for row in csv.DictReader(open(RunDir(run).stage(2).summary))]}
    print(f"\nstage 2, {args.epochs} epochs, views={args.views}, data={data}")
    print("| mode | trial: loops + per-epoch val + cache build (s) | train loops (s) | per-epoch val (s) | "
          "cache build (s) | final val+test eval, apart (s) | test All | Many | Medium | Few |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, r in res.items():
        t = r["test"]
        print(f"| {mode} | {r['total_s']:.1f} | {r['loops_s']:.1f} | {r['val_s']:.1f} | {r['cache_s']:.1f} | "
              f"{r['final_s']:.1f} | {t['all']:.2f} | {t['many']} | {t['medium']} | {t['few']} |")
    for mode, r in res.items():
        print(f"{mode}: train loop per epoch (s) {r['epochs_s']}")
    on = res.get("online")
    for mode in ("cached", "cached_reused"):
        if on and mode in res:
            ca = res[mode]
            print(f"speed-up {mode} vs online (loops + per-epoch val + cache build): "
                  f"{on['total_s'] / ca['total_s']:.1f}x (target >= 8x); train loops alone: "
                  f"{on['loops_s'] / max(ca['loops_s'], 1e-9):.0f}x; test All cached - online: "
                  f"{ca['test']['all'] - on['test']['all']:+.2f} points")
    if "cached" in res and "cached_reused" in res:
        assert res["cached_reused"]["test"] == res["cached"]["test"], "a reused cache must give the same model"
        print(f"cached_reused: cache build {res['cached_reused']['cache_s']:.1f} s (the cache of the first trial)")
    return res


if __name__ == "__main__":
    main()
