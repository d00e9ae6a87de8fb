#!/usr/bin/env python
"""Weak scaling of stage 1 on CPU: 1 -> N processes (gloo), same per-process batch, for each backend.

Runs `torchrun --nproc_per_node P -m bigltr.train ... stage=1 stage1.epochs=E` on the same shards, one OpenMP
thread per process, and reads the training throughput of the last epoch from summary.csv (img/s per rank x P).
One process is the baseline (nothing is wrapped at world size 1, so it is measured once, in the same run);
efficiency = throughput(P) / (P x throughput(1)). The machine may be shared: the 1-minute load average before and
after every run is printed with the table, and so is how the train split is read at each process count (whole
shards per rank, or split by sample when the shards are too few or too uneven: see docs/data.md, "Shard size").
"CPU s" is the user + system time of all processes of a run (start-up and validation included): less sensitive
to other jobs than img/s, it compares two shard layouts at the same process count.

    python tools/bench_scaling.py --data data/fmnist_lt --procs 1,2 --backends ddp,fsdp2,zero1,zero2,zero3
    python tools/bench_scaling.py --data data/fmnist_lt,/tmp/fmnist_lt_auto --procs 1,2   # two layouts, interleaved
"""
from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from bigltr.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = {"ddp": ["dist.backend=ddp"], "fsdp2": ["dist.backend=fsdp2"],
            **{f"zero{s}": ["dist.backend=deepspeed", f"dist.zero_stage={s}"] for s in (1, 2, 3)}}


LOADS: list[tuple[str, int, str, float, float]] = []  # (data, processes, backend keys, load before, after) per run
CPU: dict[tuple[str, int, str], float] = {}  # (data, processes, backend keys) -> CPU seconds of all its processes


def load() -> float:
    """The 1-minute load average (what `uptime` prints first)."""
    return os.getloadavg()[0]


def layout(data: str, procs: int) -> str:
    """How ShardLoader reads the train split on `procs` ranks (from _info.json only; no shard is opened)."""
    import logging

    from bigltr.data import ShardLoader

    logging.getLogger("bigltr.data.loader").setLevel(logging.WARNING)
    ld = ShardLoader(ROOT / data, "train", batch_size=1, transform=None, train=True, num_workers=1, rank=0,
                     world_size=procs)
    n, total = len(ld._files), ld.expected_samples
    mode = "by sample (every rank reads every shard)" if ld._split_samples else "whole shards"
    return f"{n} shards, {procs} rank(s): {mode}, {ld.num_samples} of {total} samples per rank"


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes (torchrun, its ranks and their loader workers)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run(args, data: str, procs: int, backend_keys: list[str]) -> float:
    """Training images/s per rank of the last epoch; records the load average before and after."""
    out = Path(tempfile.mkdtemp(prefix=f"scale{procs}_"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           "-m", "bigltr.train", f"recipe={args.recipe}", f"data.root={data}", "stage=1",
           f"stage1.epochs={args.epochs}", f"stage1.batch_size={args.batch * procs}", f"out={out}",  # global
           f"dist.world_size={procs}", "data.num_workers=1", *backend_keys, *args.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    before = load()
    cpu0 = _children_cpu()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    CPU[(data, procs, " ".join(backend_keys))] = _children_cpu() - cpu0
    if r.returncode != 0:
        sys.exit(f"{data}, {procs} process(es), {' '.join(backend_keys)} failed:\n{r.stderr[-3000:]}")
    LOADS.append((data, procs, " ".join(backend_keys), before, load()))
    return float(list(csv.DictReader(open(RunDir(out).stage(1).summary)))[-1]["img_per_s"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/fmnist_lt",
                    help="shard folder; several, comma-separated, are measured interleaved (each process count "
                         "on every folder before the next), so a change in the machine's load hits them alike")
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
    datas = args.data.split(",")
    base_p = procs[0]
    rows: dict[str, list] = {d: [] for d in datas}  # data -> [(backend, processes, img/s per rank)]
    for p in procs:
        for b in (["-"] if p == base_p else backends):
            for d in datas:
                rows[d].append((b, p, run(args, d, p, BACKENDS[backends[0] if b == "-" else b])))
    for d in datas:
        base = rows[d][0][2]  # img/s per rank of the baseline
        print(f"weak scaling, stage 1, {args.recipe} on {d}, per-process batch {args.batch}, {args.threads} "
              f"thread(s)/process, {os.cpu_count()} cores; baseline: {base_p} process(es), measured in the same run")
        for p in procs:
            print(f"train split: {layout(d, p)}")
        print("load average (1 min) before -> after each run: "
              + "; ".join(f"{p} proc {keys}: {a:.2f} -> {z:.2f}" for dd, p, keys, a, z in LOADS if dd == d))
        print("| backend | processes | img/s per rank | img/s total | efficiency | CPU s, whole run |")
        print("|---|---|---|---|---|---|")
        for b, p, per_rank in rows[d]:
            cpu = CPU[(d, p, " ".join(BACKENDS[backends[0] if b == "-" else b]))]
            print(f"| {b} | {p} | {per_rank:.1f} | {per_rank * p:.1f} | {per_rank / base:.2f} | {cpu:.0f} |")


if __name__ == "__main__":
    main()
