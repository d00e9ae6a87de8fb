#!/usr/bin/env python
"""Weak scaling of stage 1 on CPU: 1 -> N processes (gloo, DDP or FSDP2), same per-process batch.

Runs `torchrun --nproc_per_node P -m bigltr.train ... stage=1 stage1.epochs=E` for each P on the same shards,
one OpenMP thread per process, and reads the training throughput of the last epoch from summary.csv
(img/s per rank x P). Efficiency = throughput(P) / (P x throughput(1)).

    python tools/bench_scaling.py --data data/fmnist_lt --procs 1,2 --backend ddp
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/fmnist_lt")
    ap.add_argument("--recipe", default="fmnist_lt")
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--backend", default="ddp", choices=["ddp", "fsdp2"])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64, help="per-process batch")
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads per process")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    rows = []
    for p in [int(x) for x in args.procs.split(",")]:
        out = Path(tempfile.mkdtemp(prefix=f"scale{p}_"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(p),
               "-m", "bigltr.train", f"recipe={args.recipe}", f"data.root={args.data}", "stage=1",
               f"stage1.epochs={args.epochs}", f"stage1.batch_size={args.batch}", f"out={out}",
               f"dist.backend={args.backend}", f"dist.world_size={p}", "data.num_workers=1", *args.overrides]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"{p} process(es) failed:\n{r.stderr[-3000:]}")
        last = list(csv.DictReader(open(out / "stage1" / "summary.csv")))[-1]
        per_rank = float(last["img_per_s"])
        rows.append((p, per_rank, per_rank * p))
    base = rows[0][2] / rows[0][0]
    print(f"weak scaling, stage 1, {args.recipe} on {args.data}, backend {args.backend}, per-process batch "
          f"{args.batch}, {args.threads} thread(s)/process, {os.cpu_count()} cores")
    print("| processes | img/s per rank | img/s total | efficiency |")
    print("|---|---|---|---|")
    for p, per_rank, total in rows:
        print(f"| {p} | {per_rank:.1f} | {total:.1f} | {total / (p * base):.2f} |")


if __name__ == "__main__":
    main()
