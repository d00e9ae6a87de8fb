#!/usr/bin/env python
"""Class-balanced image stream (BalancedShardLoader: single images read by offset) against the sequential reader
(ShardLoader: whole shards front to back) on the same shards, transform, batch size and workers, in one run:

1. the shard index the balanced stream needs: built cold (tar-header pass, plus one PIL decode of every image with
   ``--decode-check``, into a fresh index folder) and loaded warm (the cached JSON), in seconds;
2. images/s of a training epoch through each reader (decode + augment + collate, no model), the readers
   alternating epoch by epoch (``--epochs`` each, the median reported, so that a load change hits both), and the
   ratio balanced / sequential.

    python tools/bench_balanced_stream.py --root data/fmnist_lt --workers 2 --epochs 5
    python tools/bench_balanced_stream.py --generate 2048 --workers 2 --epochs 3      # 500x375 JPEGs, imagenet aug at 224

Needs the package installed (``pip install -e .`` or ``make venv`` in the repository root).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _generated(root: Path, count: int) -> Path:
    import importlib.util

    # bench_dali.py is a sibling script, not a package module: loaded from its file
    spec = importlib.util.spec_from_file_location("bench_dali", Path(__file__).with_name("bench_dali.py"))
    bench_dali = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_dali)
    return bench_dali.make_shards_500x375(root, count)


def _epoch(loader, epoch: int) -> tuple[float, int]:
    n, t0 = 0, time.perf_counter()
    loader.set_epoch(epoch)
    for _x, y, _k in loader:
        n += len(y)
    return n / (time.perf_counter() - t0), n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="data/fmnist_lt", help="shards (with _info.json) to read")
    ap.add_argument("--generate", type=int, default=0, metavar="N",
                    help="instead: generate N 500x375 JPEGs (20 classes) and read them at 224 with the imagenet aug")
    ap.add_argument("--split", default="train")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--img-size", type=int, default=28, help="data.img_size (without --generate)")
    ap.add_argument("--in-chans", type=int, default=1, help="data.in_chans (without --generate)")
    ap.add_argument("--decode-check", action="store_true", help="index with BalancedShardLoader(decode_check=True)")
    ap.add_argument("--aug", default=None, help="data.train_aug (default: cifar, or imagenet with --generate)")
    args = ap.parse_args(argv)

    from bigltr.data.balanced_stream import BalancedShardLoader
    from bigltr.data.loader import ShardLoader
    from bigltr.data.transforms import build_transform

    with tempfile.TemporaryDirectory() as tmp:
        if args.generate:
            root, size, chans, aug = _generated(Path(tmp), args.generate), 224, 3, args.aug or "imagenet"
        else:
            root, size, chans, aug = Path(args.root), args.img_size, args.in_chans, args.aug or "cifar"
        tf = build_transform(img_size=size, in_chans=chans, mean=(0.5,) * chans, std=(0.5,) * chans, train=True,
                             aug=aug)
        index = Path(tmp) / "index"
        t0 = time.perf_counter()
        kw = {"batch_size": args.batch_size, "transform": tf, "num_workers": args.workers, "index_dir": str(index),
              "decode_check": args.decode_check}
        balanced = BalancedShardLoader(root, args.split, **kw)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        balanced = BalancedShardLoader(root, args.split, **kw)
        warm = time.perf_counter() - t0
        sequential = ShardLoader(root, args.split, batch_size=args.batch_size, transform=tf, train=True,
                                 num_workers=args.workers)
        runs = [(_epoch(sequential, e), _epoch(balanced, e)) for e in range(args.epochs)]
        seq_ips, seq_n = statistics.median(r[0][0] for r in runs), runs[0][0][1]
        bal_ips, bal_n = statistics.median(r[1][0] for r in runs), runs[0][1][1]
    print(f"shards: {root if not args.generate else f'{args.generate} generated 500x375 JPEGs'}, split "
          f"'{args.split}' ({balanced.expected_samples} samples, {balanced.sampler.num_classes} classes), "
          f"aug {aug} at {size}, batch {args.batch_size}, {args.workers} worker(s), {args.epochs} epoch(s)")
    print(f"index (balanced stream only): cold {cold:.2f} s (header pass"
          f"{' + one decode of every image' if args.decode_check else ''}), warm {warm:.2f} s")
    print(f"sequential ShardLoader:       {seq_ips:8.1f} img/s (median of {args.epochs} epochs of {seq_n} images)")
    print(f"balanced BalancedShardLoader: {bal_ips:8.1f} img/s (median of {args.epochs} epochs of {bal_n} images)")
    print(f"ratio balanced / sequential:  {bal_ips / seq_ips:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
