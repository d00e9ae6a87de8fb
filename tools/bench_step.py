#!/usr/bin/env python
"""Stage-1 step throughput: bigltr's training loop vs a minimal plain PyTorch loop doing identical work.

Same model, batch, in-memory synthetic data, precision and optimiser; the two loops alternate for --rounds
rounds and the median images/s of each is compared (target ratio bigltr/plain >= 0.97). Also prints the peak
memory of the process (RSS on CPU, max allocated on GPU).

    python tools/bench_step.py --device cpu --model resnet32_cifar --img 32 --batch 64 --steps 20
    python tools/bench_step.py --device cuda --model resnet50 --img 224 --batch 128 --amp bf16 --channels-last

Needs the package installed (``pip install -e .`` or ``make venv`` in the repository root).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from bigltr.distributed import Trainable
from bigltr.engine.device import autocast, peak_memory_mib
from bigltr.engine.loop import train_epoch
from bigltr.engine.optim import build_sgd, cosine_schedule, param_groups
from bigltr.models import build_model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(model, batches, opt, sched, device, amp, channels_last):
    loss_fn = nn.CrossEntropyLoss()
    for x, y, _ in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="resnet32_cifar")
    ap.add_argument("--img", type=int, default=32)
    ap.add_argument("--chans", type=int, default=3)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model, args.classes, in_chans=args.chans).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_sgd(param_groups(model, 5e-4, "all"), 0.01, 0.9)
    sched = cosine_schedule(opt, 10**9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.steps, args.batch, args.chans, args.img, args.img, generator=g)
    y = torch.randint(0, args.classes, (args.steps, args.batch), generator=g)
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    batches = [(x[i], y[i], None) for i in range(args.steps)]
    loss_fn = nn.CrossEntropyLoss()
    trainer = Trainable(model, opt)  # what Dist.prepare returns for one process

    def run_bigltr():
        train_epoch(trainer=trainer, loader=batches, loss_fn=loss_fn, scheduler=sched, device=device,
                    amp=args.amp, channels_last=args.channels_last, log_every=10**9)

    def run_plain():
        plain_loop(model, batches, opt, sched, device, args.amp, args.channels_last)

    model.train()
    run_plain(), run_bigltr()  # warm-up (cudnn autotune, allocator, first-touch)
    times = {"plain": [], "bigltr": []}
    for r in range(args.rounds):
        for name, fn in (("plain", run_plain), ("bigltr", run_bigltr)) if r % 2 == 0 else \
                (("bigltr", run_bigltr), ("plain", run_plain)):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(args.steps * args.batch / (time.perf_counter() - t))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, threads {torch.get_num_threads()}, model {args.model}, "
          f"{args.chans}x{args.img}x{args.img}, batch {args.batch}, amp {args.amp}, channels_last "
          f"{args.channels_last}, {args.rounds} rounds x {args.steps} steps")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in ("plain", "bigltr"):
        print(f"  {k:7s} median {med[k]:9.1f} img/s   (rounds: {', '.join(f'{v:.1f}' for v in times[k])})")
    print(f"  ratio bigltr/plain = {med['bigltr'] / med['plain']:.3f}  (target >= 0.97)")
    print(f"  peak memory {peak_memory_mib(device):.0f} MiB ({'max allocated' if device.type == 'cuda' else 'RSS'})")
    return med


if __name__ == "__main__":
    main()
