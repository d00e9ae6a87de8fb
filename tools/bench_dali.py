#!/usr/bin/env python
"""DALI data pipeline on one device: eval outputs against the torch path, decode + augment throughput, and what
a training step of resnet50 needs (a prepared GPU check: ``tools/gpu_check.sh`` runs it with ``--device cuda``).

1. generates ``--count`` JPEGs of 500x375 px (like ImageNet originals) and converts them to shards;
2. eval transform (``none`` at 224 and timm's ``imagenet`` eval at 224) through DaliShardLoader on the device
   vs the torch path (ShardLoader + PIL): max / mean difference in 0..255 grey levels (nvJPEG and libjpeg-turbo
   may round differently);
3. ImageNet-style training augmentation (random-resized crop 224, flip, colour jitter) through DaliShardLoader on
   the device with ``--threads`` CPU threads, images/s over ``--epochs`` epochs (index scan excluded), next to
   ShardLoader with as many workers;
4. resnet50 bf16 channels_last training steps, batch ``--batch-size``: img/s on one synthetic batch vs fed by the
   DALI loader (end to end). The loader keeps up when the two are close.

    python tools/bench_dali.py --device cuda --threads 4
    python tools/bench_dali.py --device cpu --threads 2 --count 256 --epochs 1 --no-model   # smoke test on CPU

Needs the package installed (``pip install -e .`` or ``make venv`` in the repository root).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_shards_500x375(root: Path, count: int) -> Path:
    import contextlib
    import importlib.util
    import io

    from bigltr.data.sources.cli import main as make_shards_main

    # bench_data.py is a sibling script, not a package module: loaded from its file
    spec = importlib.util.spec_from_file_location("bench_data", Path(__file__).with_name("bench_data.py"))
    bench_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_data)

    t0 = time.perf_counter()
    bench_data.make_imagefolder(root / "src", count, 20, 500, seed=1, height=375)
    with contextlib.redirect_stdout(io.StringIO()):  # the converter's summary
        make_shards_main(["imagefolder", "--src", str(root / "src"), "--out", str(root / "shards"), "--workers", "4",
                          "--val-per-class", "0", "--maxcount", "256", "--no-progress", "--overwrite",
                          "--name", "bench"])
    print(f"generated and converted {count} JPEGs of 500x375 px in {time.perf_counter() - t0:.1f} s", flush=True)
    return root / "shards"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=4, help="DALI CPU threads = ShardLoader workers (default 4)")
    p.add_argument("--count", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--no-model", action="store_true", help="skip the resnet50 step part")
    p.add_argument("--keep", default=None, help="work folder (default: a temp dir)")
    args = p.parse_args(argv)

    import torch

    device = torch.device(args.device)
    torch.set_num_threads(max(1, args.threads))
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="bigltr_dali_"))
    try:
        run(args, tmp, device)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def run(args, tmp: Path, device) -> None:
    import nvidia.dali
    import torch

    from bigltr.data.dali import DaliShardLoader
    from bigltr.data.loader import ShardLoader
    from bigltr.data.transforms import build_transform

    print(f"torch {torch.__version__}, nvidia-dali {nvidia.dali.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    shards = make_shards_500x375(tmp, args.count)
    n = args.count
    common = dict(img_size=224, in_chans=3, mean=MEAN, std=STD, index_dir=str(tmp / "index"))

    # 2. eval outputs against the torch path (and against DALI's CPU mode when on a GPU)
    for aug in ("none", "imagenet"):
        d = DaliShardLoader(shards, "train", batch_size=64, train=False, aug=aug, num_workers=args.threads,
                            device=device, **common)
        t = ShardLoader(shards, "train", batch_size=64, train=False, num_workers=2,
                        transform=build_transform(img_size=224, in_chans=3, mean=MEAN, std=STD, train=False, aug=aug))
        std = torch.tensor(STD).view(1, 3, 1, 1) * 255
        worst, total, count = 0.0, 0.0, 0
        for (x, _, k), (tx, _, tk) in zip(d, t):
            assert list(k) == list(tk), "key order differs"
            lv = (x.float().cpu() - tx).abs() * std
            worst, total, count = max(worst, lv.max().item()), total + lv.sum().item(), count + lv.numel()
        print(f"eval '{aug}' 224 px on {device.type} vs torch path: max {worst:.1f}, mean {total / count:.3f} grey "
              f"levels over {count // (3 * 224 * 224)} images", flush=True)

    # 3. training augmentation throughput
    def epoch_rate(loader, sync) -> float:
        t0, seen = time.perf_counter(), 0
        for x, y, _ in loader:
            seen += y.shape[0]
        sync()
        return seen / (time.perf_counter() - t0)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dl = DaliShardLoader(shards, "train", batch_size=args.batch_size, train=True, aug="imagenet",
                         num_workers=args.threads, device=device, **common)
    dl.set_epoch(0)
    epoch_rate(dl, sync)  # first epoch: index scan + warm-up
    rates = []
    for e in range(1, args.epochs + 1):
        dl.set_epoch(e)
        rates.append(epoch_rate(dl, sync))
    print(f"DALI train 'imagenet' 224 px, {device.type} decode + augment, {args.threads} CPU threads: "
          f"{max(rates):.0f} img/s best, {sorted(rates)[len(rates) // 2]:.0f} median of {len(rates)} epochs of {n}",
          flush=True)
    sl = ShardLoader(shards, "train", batch_size=args.batch_size, train=True, num_workers=args.threads,
                     transform=build_transform(img_size=224, in_chans=3, mean=MEAN, std=STD, train=True,
                                               aug="imagenet"))
    print(f"ShardLoader train 'imagenet' 224 px (CPU: PIL + torchvision), {args.threads} workers: "
          f"{epoch_rate(sl, lambda: None):.0f} img/s (one epoch)", flush=True)

    # 4. resnet50 bf16 steps: synthetic batch vs fed by DALI
    if args.no_model:
        return
    import timm

    model = timm.create_model("resnet50", num_classes=1000).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x, y):
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(model(x), y.to(device, non_blocking=True) % 1000)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    x0 = torch.randn(args.batch_size, 3, 224, 224, device=device)
    y0 = torch.randint(0, 1000, (args.batch_size,), device=device)
    for _ in range(5):
        step(x0, y0)
    sync()
    steps = max(10, n // args.batch_size)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x0, y0)
    sync()
    synth = steps * args.batch_size / (time.perf_counter() - t0)
    fed = []
    for e in range(args.epochs + 1, args.epochs + 3):
        dl.set_epoch(e)
        t0, seen = time.perf_counter(), 0
        for x, y, _ in dl:
            step(x, y)
            seen += y.shape[0]
        sync()
        fed.append(seen / (time.perf_counter() - t0))
    print(f"resnet50 bf16 channels_last train step, batch {args.batch_size}: {synth:.0f} img/s on one synthetic "
          f"batch, {max(fed):.0f} img/s fed by DALI ({args.threads} threads): loader-bound fraction "
          f"{max(0.0, 1 - max(fed) / synth):.0%}", flush=True)


if __name__ == "__main__":
    main()
