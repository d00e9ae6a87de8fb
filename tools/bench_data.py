#!/usr/bin/env python
"""Benchmark the data path: shard conversion and training-time reading, shards vs a plain ImageFolder.

One run:
1. writes a synthetic ImageFolder of real JPEG files (smooth random images, so they compress like photos);
2. converts it with ``tools/make_shards.py imagefolder`` with ``--workers 1`` and ``--workers 2`` (images/s),
   once storing the original JPEG bytes (``--format keep``, after a full decode check) and once re-encoding
   (``--convert-args``, default ``--resize 64 --format jpg --jpeg-quality 90``);
3. reads one training epoch, decode + augmentation (``bigltr.data.build_transform``), through
   ``bigltr.data.ShardLoader`` from the shards and through torchvision ``ImageFolder`` + ``DataLoader`` from the
   same JPEG files, with the same transform, batch size and worker count, and prints images/s, images/s per
   worker and the ratio shards / ImageFolder (target >= 1.0).

Default run (2,000 JPEGs of about 128x128 px, 20 classes, cifar-style augmentation at 64 px, 2 reader workers) takes
about a minute on 2 cores::

    python tools/bench_data.py
    python tools/bench_data.py --count 5000 --image-size 256 --aug imagenet --img-size 224 --workers 4
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    import bigltr.data  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_imagefolder(root: Path, count: int, classes: int, size: int, seed: int = 0) -> int:
    """``count`` JPEGs (quality 90) in ``root/train/<class>/``: bilinear-upsampled noise plus a gradient."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    total = 0
    for i in range(count):
        c = i % classes
        d = root / "train" / f"class_{c:03d}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size + (i % 3) * 8), Image.Resampling.BILINEAR)
        grad = np.linspace(0, 40, img.size[0], dtype=np.float32)[None, :, None]
        arr = np.clip(np.asarray(img, dtype=np.float32) + grad + rng.normal(0, 6, (img.size[1], img.size[0], 3)),
                      0, 255).astype(np.uint8)
        path = d / f"img_{i:06d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        total += path.stat().st_size
    return total


def bench_convert(make_shards, src: Path, out: Path, workers: int, extra: list[str]) -> tuple[float, dict]:
    """Seconds of one in-process conversion (worker start-up included; its summary output is swallowed)."""
    import contextlib
    import io

    sink = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        info = make_shards.main(["imagefolder", "--src", str(src), "--out", str(out), "--workers", str(workers),
                                 "--val-per-class", "0", "--maxcount", "500", "--no-progress", "--overwrite",
                                 "--name", "bench", *extra])
    return time.perf_counter() - t0, info


def pool_startup_s() -> float:
    """Seconds to start 2 converter worker processes and get a first result (what --workers 2 pays once)."""
    from concurrent.futures import ProcessPoolExecutor

    from bigltr.data.convert import _mp_context

    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=2, mp_context=_mp_context()) as ex:
        list(ex.map(abs, [-1, -2]))
    return time.perf_counter() - t0


def epoch_images_per_s(loader, n_expected: int) -> float:
    t0 = time.perf_counter()
    n = 0
    for batch in loader:
        n += len(batch[1])
    dt = time.perf_counter() - t0
    if n < n_expected * 0.9:
        raise RuntimeError(f"read only {n} of {n_expected} images")
    return n / dt


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=2000, help="JPEG files to generate (default 2000)")
    p.add_argument("--classes", type=int, default=20, help="classes (default 20)")
    p.add_argument("--image-size", type=int, default=128, help="generated image width in px (default 128)")
    p.add_argument("--aug", choices=("cifar", "imagenet", "none"), default="cifar",
                   help="training transform of bigltr.data.build_transform (default cifar)")
    p.add_argument("--img-size", type=int, default=64, help="transform output size (default 64)")
    p.add_argument("--workers", type=int, default=2, help="reader workers for both loaders (default 2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3,
                   help="epochs per reader, alternating the two readers; the best is reported (default 3)")
    p.add_argument("--convert-args", default="--resize 64 --format jpg --jpeg-quality 90",
                   help="options of the second, re-encoding conversion benchmark "
                        "(default '--resize 64 --format jpg --jpeg-quality 90')")
    p.add_argument("--keep", default=None, help="keep the generated files in this folder (default: temp dir)")
    args = p.parse_args(argv)

    import importlib.util

    spec = importlib.util.spec_from_file_location("make_shards", Path(__file__).with_name("make_shards.py"))
    make_shards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_shards)

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bigltr_bench_"))
    try:
        src, out = tmp / "imagefolder", tmp / "shards"
        if src.exists():
            shutil.rmtree(src)
        t0 = time.perf_counter()
        nbytes = make_imagefolder(src, args.count, args.classes, args.image_size)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"generated {args.count} JPEGs ({nbytes / args.count / 1024:.1f} KiB each, {args.image_size}px) "
              f"in {time.perf_counter() - t0:.1f} s; cpu cores: {os.cpu_count()}, load average {load:.1f}")

        import webdataset  # noqa: F401  (imports torch: seconds, paid once here rather than inside a timing)

        modes = [("--format keep (default)", []), (args.convert_args, args.convert_args.split())]
        print("\n== conversion: make_shards.py imagefolder (images/s, worker start-up included)")
        print(f"(starting a pool of 2 worker processes takes {pool_startup_s():.2f} s of that, once per conversion)")
        for label, extra in modes:
            rates = {}
            for w in (1, 2):
                dt, info = bench_convert(make_shards, src, out, w, extra)
                rates[w] = args.count / dt
            files = info["splits"]["train"]["filenames"]
            mib = sum((out / f).stat().st_size for f in files) / 2**20
            print(f"{label:<40} --workers 1: {rates[1]:6.0f}   --workers 2: {rates[2]:6.0f}   "
                  f"({len(files)} shards, {mib:.1f} MiB)")
        dt, info = bench_convert(make_shards, src, out, 1, [])  # the reader benchmark reads the original JPEGs

        import torch
        from torch.utils.data import DataLoader
        from torchvision.datasets import ImageFolder

        from bigltr.data import ShardLoader, build_transform

        torch.set_num_threads(1)
        tf = build_transform(img_size=args.img_size, in_chans=3, mean=(0.5,) * 3, std=(0.25,) * 3, train=True,
                             aug=args.aug)
        n = info["splits"]["train"]["num_samples"]
        shard_rate, folder_rate = [], []
        for r in range(args.repeats):
            sl = ShardLoader(out, "train", batch_size=args.batch_size, transform=tf, train=True, seed=0,
                             num_workers=args.workers, shuffle_buffer=1000, drop_last=False)
            sl.set_epoch(r)
            shard_rate.append(epoch_images_per_s(sl, n))
            dl = DataLoader(ImageFolder(str(src / "train"), transform=tf), batch_size=args.batch_size, shuffle=True,
                            num_workers=args.workers, generator=torch.Generator().manual_seed(r))
            folder_rate.append(epoch_images_per_s(dl, n))
        s, f = max(shard_rate), max(folder_rate)
        w = max(1, args.workers)
        print(f"\n== training reader: one epoch of {n} images, decode + '{args.aug}' augmentation to "
              f"{args.img_size}px, batch {args.batch_size}, {args.workers} workers, best of {args.repeats}")
        print(f"ShardLoader (shards)        : {s:8.0f} images/s ({s / w:6.0f} per worker)")
        print(f"ImageFolder + DataLoader    : {f:8.0f} images/s ({f / w:6.0f} per worker)")
        print(f"ratio shards / ImageFolder  : {s / f:8.2f}  (target >= 1.0)")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
