#!/usr/bin/env python
"""Weak scaling of stage 1 on CPU: 1 -> N processes (gloo), same per-process batch, for each backend.

Runs `torchrun --nproc_per_node P -m bigltr.train ... stage=1 stage1.epochs=E` on the same shards, one OpenMP
thread per process, and reads the training throughput of the last epoch from summary.csv (img/s per rank x P).
One process is the baseline (nothing is wrapped at world size 1, so it is measured once, in the same run);
efficiency = throughput(P) / (P x throughput(1)).

    python tools/bench_scaling.py --data data/fmnist_lt --procs 1,2 --backends ddp,fsdp2,zero1,zero2,zero3
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
BACKENDS = {"ddp": ["dist.backend=ddp"], "fsdp2": ["dist.backend=fsdp2"],
            **{f"zero{s}": ["dist.backend=deepspeed", f"dist.zero_stage={s}"] for s in (1, 2, 3)}}


def run(args, procs: int, backend_keys: list[str]) -> float:
    """Training images/s per rank of the last epoch."""
    out = Path(tempfile.mkdtemp(prefix=f"scale{procs}_"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           "-m", "bigltr.train", f"recipe={args.recipe}", f"data.root={args.data}", "stage=1",
           f"stage1.epochs={args.epochs}", f"stage1.batch_size={args.batch}", f"out={out}",
           f"dist.world_size={procs}", "data.num_workers=1", *backend_keys, *args.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{procs} process(es), {' '.join(backend_keys)} failed:\n{r.stderr[-3000:]}")
    return float(list(csv.DictReader(open(out / "stage1" / "summary.csv")))[-1]["img_per_s"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/fmnist_lt")
    ap.add_argument("--recipe", default="fmnist_lt")
    ap.add_argument("--procs", default="1,2", help="process counts; the first is the baseline")
    ap.add_argument("--backends", default="ddp", help=f"comma-separated, of {', '.join(BACKENDS)}")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64, help="per-process batch")
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads per process")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    backends = args.backends.split(",")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        ap.error(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    procs = [int(x) for x in args.procs.split(",")]
    base_p = procs[0]
    base = run(args, base_p, BACKENDS[backends[0]])  # img/s per rank
    rows = [("-", base_p, base, base * base_p)]
    for b in backends:
        for p in procs[1:]:
            per_rank = run(args, p, BACKENDS[b])
            rows.append((b, p, per_rank, per_rank * p))
    print(f"weak scaling, stage 1, {args.recipe} on {args.data}, per-process batch {args.batch}, {args.threads} "
          f"thread(s)/process, {os.cpu_count()} cores; baseline: {base_p} process(es), measured in the same run")
    print("| backend | processes | img/s per rank | img/s total | efficiency |")
    print("|---|---|---|---|---|")
    for b, p, per_rank, total in rows:
        print(f"| {b} | {p} | {per_rank:.1f} | {total:.1f} | {total / (p * base):.2f} |")


if __name__ == "__main__":
    main()
