#!/usr/bin/env python
"""MaxNorm on a classifier stored as ZeRO stores it: gather-then-project vs partial row sums (bigltr's way).

Each of P processes holds what DeepSpeed ZeRO-1/2 gives a rank: the whole working weight (C x D, replicated) and
its equal, padded 1-D slice of the flattened fp32 master. Both methods project rows onto the ball and update the
master slice and the working weight:

- gather (baseline): all-gather the master slices into the full weight, `maxnorm_` it, copy the rank's slice back
  and the full result over the working weight (C x D values moved per rank and step);
- partial sums (`Dist.row_projector` under DeepSpeed): partial row sums of squares of the slice, one all-reduce of
  C values, per-row factors, scale the slice and the working weight.

The first application of each is checked equal (same master, same working weight); then each is timed (median of
--iters, alternating). Plain torch.distributed with the same layout as DeepSpeed, so the comparison isolates the
projection; `tests/test_distributed.py` checks the real thing inside DeepSpeed.

    python tools/bench_zero_maxnorm.py --rows 8142 --cols 2048 --procs 2      # iNaturalist's classifier, CPU/gloo

Needs the package installed (``pip install -e .`` or ``make venv`` in the repository root).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bigltr.ops import flat_row_sumsq, flat_rows_scale_, maxnorm_, maxnorm_scales


def setup_weights(rank: int, world: int, rows: int, cols: int, device):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=g)
    w[: rows // 2] *= 3.0  # half the rows outside the ball
    radius = float(w[rows // 2:].norm(dim=1).max())
    part = -(-w.numel() // world)
    padded = torch.zeros(part * world)
    padded[: w.numel()] = w.view(-1)
    return w.to(device), padded[rank * part:(rank + 1) * part].clone().to(device), part, radius


def gather_project(working, master, part, radius, world, rank):
    full = torch.empty(part * world, device=master.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.14
    gather(full, master)
    w = full[: working.numel()].view_as(working)
    maxnorm_(w, radius)
    master.copy_(full[rank * part:(rank + 1) * part])
    working.copy_(w)


def partial_sums_project(working, master, part, radius, world, rank):
    start = min(rank * part, working.numel())
    valid = min(part, working.numel() - start)
    rows, cols = working.shape
    sumsq = flat_row_sumsq(master[:valid], start, rows, cols)
    dist.all_reduce(sumsq)
    scales = maxnorm_scales(sumsq, radius)
    flat_rows_scale_(master[:valid], start, cols, scales)
    working.mul_(scales.unsqueeze(1))


def worker(rank: int, world: int, args, port: int, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    sync = torch.cuda.synchronize if use_cuda else (lambda: None)
    methods = {"gather": gather_project, "partial sums": partial_sums_project}
    state = {}
    for name, fn in methods.items():  # equal results from the same start
        working, master, part, radius = setup_weights(rank, world, args.rows, args.cols, device)
        fn(working, master, part, radius, world, rank)
        state[name] = (working, master, part, radius)
    (w_a, m_a, _, _), (w_b, m_b, _, _) = state.values()
    torch.testing.assert_close(w_b, w_a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m_b, m_a, rtol=1e-6, atol=1e-7)
    times = {name: [] for name in methods}
    for i in range(args.iters):
        order = list(methods.items()) if i % 2 == 0 else list(methods.items())[::-1]
        for name, fn in order:
            working, master, part, radius = state[name]
            dist.barrier()
            sync()
            t = time.perf_counter()
            fn(working, master, part, radius, world, rank)
            sync()
            times[name].append(time.perf_counter() - t)
    if rank == 0:
        out.put({k: statistics.median(v) * 1e3 for k, v in times.items()})
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8142)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args(argv)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.spawn(worker, args=(args.procs, args, port, out), nprocs=args.procs, join=True)
    ms = out.get()
    gathered = args.rows * args.cols * 4 / 2**20  # the all-gather's output on every rank
    reduced = args.rows * 4 / 2**20
    print(f"MaxNorm over ZeRO-style partitions: {args.rows} x {args.cols} fp32, {args.procs} processes "
          f"({args.device}, {'nccl' if args.device == 'cuda' else 'gloo'}), {args.threads} thread(s)/process, "
          f"median of {args.iters}; results checked equal")
    print("| method | ms / projection | collective |")
    print("|---|---|---|")
    print(f"| gather (baseline) | {ms['gather']:.2f} | all-gather, {gathered:.1f} MiB result |")
    print(f"| partial sums (bigltr) | {ms['partial sums']:.2f} | all-reduce of {reduced * 1024:.1f} KiB |")
    print(f"ratio gather / partial sums = {ms['gather'] / ms['partial sums']:.2f}x")


if __name__ == "__main__":
    main()
