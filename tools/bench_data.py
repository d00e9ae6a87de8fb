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
   worker and the ratio shards / ImageFolder (target >= 1.0);
4. when NVIDIA DALI is installed, reads the same shards in the same run through ``bigltr.data.dali.DaliShardLoader``
   (DALI's CPU-only mode, ``--workers`` CPU threads, the same augmentation by name) and prints the ratio
   DALI / ShardLoader in images/s and per CPU-second (target >= 1.5 per core), and the time from ``iter()`` to
   the first batch (DataLoader worker start-up vs DALI's per-epoch pipeline build);
5. repeats 3-4 for ImageNet-style training, ``--imagenet-count`` JPEGs of 500x375 px with the ``imagenet``
   augmentation (random-resized crop to 224, flip, colour jitter) (0 skips it).

Default run (2,000 JPEGs of about 128x128 px, 20 classes, cifar-style augmentation at 64 px, 2 reader workers, then
600 JPEGs of 500x375 px at 224 px) takes 1.5-3 minutes on 2 shared cores (about a minute with --imagenet-count 0)::

    python tools/bench_data.py
    python tools/bench_data.py --count 5000 --image-size 256 --aug imagenet --img-size 224 --workers 4
    python tools/bench_data.py --imagenet-count 0                    # without the 500x375 -> 224 readers

Needs the package installed (``pip install -e .`` or ``make venv`` in the repository root).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def make_imagefolder(root: Path, count: int, classes: int, size: int, seed: int = 0,
                     height: int | None = None) -> int:
    """``count`` JPEGs (quality 90) in ``root/train/<class>/``: bilinear-upsampled noise plus a gradient;
    ``size`` px wide and ``height`` px high (default: ``size`` + 0, 8 or 16)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    total = 0
    for i in range(count):
        c = i % classes
        d = root / "train" / f"class_{c:03d}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        h = height if height is not None else size + (i % 3) * 8
        img = Image.fromarray(small).resize((size, h), Image.Resampling.BILINEAR)
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

    from bigltr.data.decode import _mp_context

    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=2, mp_context=_mp_context()) as ex:
        list(ex.map(abs, [-1, -2]))
    return time.perf_counter() - t0


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished child processes (DataLoader workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def epoch_images_per_s(loader, n_expected: int, first: list | None = None, per_cpu: list | None = None) -> float:
    """Images/s over one epoch, from ``iter()``; appends the seconds to the first batch to ``first`` and the
    images per CPU-second (reader processes and threads, main process included) to ``per_cpu``."""
    import gc

    c0, t0 = cpu_seconds(), time.perf_counter()
    n = 0
    it = iter(loader)
    for batch in it:
        if n == 0 and first is not None:
            first.append(time.perf_counter() - t0)
        n += len(batch[1])
    dt = time.perf_counter() - t0
    del it
    gc.collect()  # DataLoader workers are joined (and their CPU time counted) when the iterator goes
    if per_cpu is not None:
        per_cpu.append(n / max(cpu_seconds() - c0, 1e-9))
    if n < n_expected * 0.9:
        raise RuntimeError(f"read only {n} of {n_expected} images")
    return n / dt


def bench_readers(src: Path, out: Path, n: int, *, aug: str, img_size: int, workers: int, batch_size: int,
                  repeats: int, index_dir: Path, title: str) -> None:
    """One training epoch per reader and repeat, the readers alternating (so that load from other jobs hits
    them alike); prints the best rate of each, and the ratios."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from bigltr.data import ShardLoader, build_transform
    from bigltr.data.dali import dali_available

    torch.set_num_threads(1)
    mean, std = (0.5,) * 3, (0.25,) * 3
    tf = build_transform(img_size=img_size, in_chans=3, mean=mean, std=std, train=True, aug=aug)
    readers = ["ShardLoader (shards)", "ImageFolder + DataLoader"]
    dali = dali_available()
    if dali:
        from bigltr.data.dali import DaliShardLoader

        readers.append("DaliShardLoader (shards, CPU)")
    rate: dict[str, list] = {r: [] for r in readers}
    first: dict[str, list] = {r: [] for r in readers}
    cpu: dict[str, list] = {r: [] for r in readers}
    for r in range(repeats):
        sl = ShardLoader(out, "train", batch_size=batch_size, transform=tf, train=True, seed=0,
                         num_workers=workers, shuffle_buffer=1000, drop_last=False)
        sl.set_epoch(r)
        rate[readers[0]].append(epoch_images_per_s(sl, n, first[readers[0]], cpu[readers[0]]))
        dl = DataLoader(ImageFolder(str(src / "train"), transform=tf), batch_size=batch_size, shuffle=True,
                        num_workers=workers, generator=torch.Generator().manual_seed(r))
        rate[readers[1]].append(epoch_images_per_s(dl, n, first[readers[1]], cpu[readers[1]]))
        if dali:  # the first epoch also indexes the shards (cached in index_dir)
            dd = DaliShardLoader(out, "train", batch_size=batch_size, train=True, img_size=img_size, in_chans=3,
                                 mean=mean, std=std, aug=aug, seed=0, num_workers=workers, drop_last=False,
                                 index_dir=str(index_dir))
            dd.set_epoch(r)
            rate[readers[2]].append(epoch_images_per_s(dd, n, first[readers[2]], cpu[readers[2]]))
    w = max(1, workers)
    print(f"\n== training reader: {title}: one epoch of {n} images, decode + '{aug}' augmentation to {img_size}px, "
          f"batch {batch_size}, {workers} workers (DALI: threads), best of {repeats}")
    for name in readers:
        best = max(rate[name])
        print(f"{name:<30}: {best:8.0f} images/s ({best / w:6.0f} per worker, {max(cpu[name]):5.0f} per CPU-second)"
              f"   first batch after {sorted(first[name])[len(first[name]) // 2]:.2f} s (median)")
    s, f = max(rate[readers[0]]), max(rate[readers[1]])
    print(f"{'ratio shards / ImageFolder':<30}: {s / f:8.2f}  (target >= 1.0)")
    if dali:
        print(f"{'ratio DALI / ShardLoader':<30}: {max(rate[readers[2]]) / s:8.2f} images/s, "
              f"{max(cpu[readers[2]]) / max(cpu[readers[0]]):.2f} per CPU-second  (target >= 1.5 per core)")
    else:
        print("DaliShardLoader: NVIDIA DALI is not installed (pip install -e '.[dali]'): no DALI rows")


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
    p.add_argument("--imagenet-count", type=int, default=600,
                   help="500x375 JPEGs for the ImageNet-style reader benchmark (224 px, 'imagenet' augmentation; "
                        "default 600, 0 skips it)")
    p.add_argument("--keep", default=None, help="keep the generated files in this folder (default: temp dir)")
    args = p.parse_args(argv)

    import bigltr.data.sources.cli as make_shards  # the converter behind bigltr-make-shards / tools/make_shards.py

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
        bench_readers(src, out, info["splits"]["train"]["num_samples"], aug=args.aug, img_size=args.img_size,
                      workers=args.workers, batch_size=args.batch_size, repeats=args.repeats,
                      index_dir=tmp / "dali_index", title=f"{args.image_size}px JPEGs")
        if args.imagenet_count:
            src2, out2 = tmp / "imagefolder_500x375", tmp / "shards_500x375"
            if src2.exists():
                shutil.rmtree(src2)
            t0 = time.perf_counter()
            nbytes = make_imagefolder(src2, args.imagenet_count, args.classes, 500, seed=1, height=375)
            print(f"\ngenerated {args.imagenet_count} JPEGs ({nbytes / args.imagenet_count / 1024:.1f} KiB each, "
                  f"500x375 px) in {time.perf_counter() - t0:.1f} s")
            dt, info2 = bench_convert(make_shards, src2, out2, 1, [])
            bench_readers(src2, out2, info2["splits"]["train"]["num_samples"], aug="imagenet", img_size=224,
                          workers=args.workers, batch_size=args.batch_size, repeats=args.repeats,
                          index_dir=tmp / "dali_index", title="500x375 JPEGs, ImageNet-style")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
