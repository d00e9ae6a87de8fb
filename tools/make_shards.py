#!/usr/bin/env python
"""Convert image datasets into bigltr's WebDataset shards (``<split>-NNNNNN.tar`` + ``_info.json``).

Subcommands (one per source format; the writing itself lives in ``bigltr.data``):

  idx   MNIST / Fashion-MNIST idx files -> long-tailed train (LDAM-DRW profile), balanced val held out from
        the official training set, and the official test set.

Example (Fashion-MNIST-LT, imbalance 100, as in the project's measurements)::

    python tools/make_shards.py idx --src /usr/share/datasets/fashion-mnist --out data/fmnist_lt
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np

try:
    import bigltr.data  # noqa: F401
except ImportError:
    # Run as `python tools/make_shards.py` from a checkout without `pip install -e .`: make the repository
    # root (the parent of tools/) importable so that `bigltr` resolves to this checkout.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bigltr.data.longtail import holdout_and_longtail, longtail_counts  # noqa: E402
from bigltr.data.writer import write_dataset  # noqa: E402

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
MNIST_CLASSES = [str(d) for d in range(10)]


# --------------------------------------------------------------------------------------------- shared parts
def add_output_args(p: argparse.ArgumentParser) -> None:
    """Options every subcommand shares: output folder, shard size, image format."""
    p.add_argument("--out", required=True, help="output folder (refused if not empty, unless --overwrite)")
    p.add_argument("--name", default=None, help="dataset name stored in _info.json (default: basename of --out)")
    p.add_argument("--maxcount", type=int, default=5000, help="samples per shard (default 5000)")
    p.add_argument("--maxsize", type=float, default=None, help="optional max bytes per shard")
    p.add_argument("--format", dest="image_format", choices=("png", "jpg"), default="png",
                   help="image encoding inside the shards (default png, lossless)")
    p.add_argument("--overwrite", action="store_true", help="replace the shards of a non-empty --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_longtail_args(p: argparse.ArgumentParser, *, n_max: int, val_per_class: int) -> None:
    """Options of subcommands that cut a long-tailed training split out of a balanced pool."""
    p.add_argument("--imbalance", type=float, default=100.0,
                   help="imbalance factor n_max / n_min of the exponential profile (default 100; 1 = balanced)")
    p.add_argument("--n-max", type=int, default=n_max, help=f"training images of class 0 (default {n_max})")
    p.add_argument("--val-per-class", type=int, default=val_per_class,
                   help=f"balanced validation images per class, held out first (default {val_per_class})")
    p.add_argument("--seed", type=int, default=0, help="seed of the hold-out, long-tail and shard order (default 0)")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def print_summary(info: dict, seconds: float) -> None:
    """Per-class counts of every split, then totals."""
    classes = info["classes"]
    splits = info["splits"]
    per_split = {
        s: [sum(h[c] for h in e.get("class_hist", [])) for c in range(len(classes))] for s, e in splits.items()
    }
    width = max(8, max(len(c) for c in classes))
    header = f"{'class':>{width}}  " + "  ".join(f"{s:>7}" for s in splits)
    print(f"\n{info['name']}: {len(classes)} classes")
    print(header)
    for c, cname in enumerate(classes):
        print(f"{cname:>{width}}  " + "  ".join(f"{per_split[s][c]:>7d}" for s in splits))
    print(f"{'total':>{width}}  " + "  ".join(f"{splits[s]['num_samples']:>7d}" for s in splits))
    print("shards: " + ", ".join(f"{s} {len(e['filenames'])}" for s, e in splits.items())
          + f"; written in {seconds:.1f} s")


# --------------------------------------------------------------------------------------------- idx format
_IDX_DTYPES = {0x08: np.uint8}


def find_idx_file(src: str, stem: str) -> str:
    """``src/stem`` or ``src/stem.gz``, whichever exists."""
    for cand in (stem, stem + ".gz"):
        path = os.path.join(src, cand)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no {stem} or {stem}.gz in {src}")


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Parse an idx file (gzipped or not): magic 0x0000 <dtype 0x08> <ndim>, big-endian int32 dims, uint8 data."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # bad gzip stream, truncated file
        raise ValueError(f"{path}: cannot read idx file ({e})") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an idx file ({len(raw)} bytes)")
    zero, dtype_code, nd = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or dtype_code not in _IDX_DTYPES or nd != ndim:
        raise ValueError(
            f"{path}: bad idx magic number 0x{raw[:4].hex()} (expected 0x0000080{ndim}: unsigned byte data "
            f"with {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    head = 4 + 4 * nd
    if len(raw) < head:
        raise ValueError(f"{path}: truncated idx header")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(nd)]
    expected = int(np.prod(dims))
    if len(raw) - head != expected:
        raise ValueError(
            f"{path}: idx header says dims {dims} ({expected} bytes of data) but the file holds {len(raw) - head}"
        )
    return np.frombuffer(raw, dtype=_IDX_DTYPES[dtype_code], offset=head).reshape(dims)


def load_idx_pair(src: str, prefix: str) -> tuple[np.ndarray, np.ndarray, dict]:
    img_path = find_idx_file(src, f"{prefix}-images-idx3-ubyte")
    lbl_path = find_idx_file(src, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path, 3), read_idx(lbl_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img_path} holds {images.shape[0]} images but {lbl_path} holds {labels.shape[0]} labels")
    files = {os.path.basename(p): sha256_file(p) for p in (img_path, lbl_path)}
    return images, labels.astype(np.int64), files


def cmd_idx(args: argparse.Namespace) -> dict:
    src = args.src
    if not os.path.isdir(src):
        raise FileNotFoundError(f"--src {src} is not a folder")
    classes = args.classes.split(",") if args.classes else (
        FASHION_MNIST_CLASSES if args.dataset == "fashion-mnist" else MNIST_CLASSES
    )
    num_classes = len(classes)
    tr_images, tr_labels, tr_files = load_idx_pair(src, "train")
    te_images, te_labels, te_files = load_idx_pair(src, "t10k")
    for what, lab in (("train", tr_labels), ("t10k", te_labels)):
        if lab.size and lab.max() >= num_classes:
            raise ValueError(f"{what} labels reach {int(lab.max())}, but there are only {num_classes} class names")

    counts = longtail_counts(args.n_max, args.imbalance, num_classes)
    train_idx, val_idx = holdout_and_longtail(tr_labels, num_classes, counts, args.val_per_class, args.seed)
    # Train shards in a seeded shuffled order (so each shard mixes classes); val/test in file order.
    train_order = train_idx[np.random.default_rng([args.seed, 1]).permutation(train_idx.size)]
    val_order = np.sort(val_idx)

    def samples(images, labels, order, prefix):
        for i in order:
            i = int(i)
            yield f"{prefix}_{i:05d}", images[i], int(labels[i])

    name = args.name or os.path.basename(os.path.normpath(args.out))
    source = {
        "converter": "tools/make_shards.py idx",
        "dataset": args.dataset if not args.classes else "custom",
        "src": os.path.abspath(src),
        "files_sha256": {**tr_files, **te_files},
        "longtail": {"formula": "int(n_max * (1/imbalance) ** (c / (C-1)))  # LDAM-DRW",
                     "n_max": args.n_max, "imbalance": args.imbalance, "counts": counts},
        "val_per_class": args.val_per_class,
        "seed": args.seed,
        "split_rule": "per class: numpy default_rng(seed) permutation; first val_per_class -> val, next n_c -> "
                      "train; train shard order default_rng([seed, 1]); test = official t10k set",
        "keys": "train_<index in train-*-ubyte> (train and val), t10k_<index in t10k-*-ubyte> (test)",
        "image_format": args.image_format,
        "maxcount": args.maxcount,
    }
    info = write_dataset(
        args.out, name=name, classes=classes, source=source,
        splits={
            "train": (samples(tr_images, tr_labels, train_order, "train"), train_order.size),
            "val": (samples(tr_images, tr_labels, val_order, "train"), val_order.size),
            "test": (samples(te_images, te_labels, np.arange(te_labels.size), "t10k"), te_labels.size),
        },
        maxcount=args.maxcount, maxsize=args.maxsize, image_format=args.image_format,
        overwrite=args.overwrite, progress=args.progress,
    )
    if info["class_counts"] != counts:  # cheap self-check of the whole chain
        raise RuntimeError(f"written class counts {info['class_counts']} differ from the profile {counts}")
    return info


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="make_shards.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="FORMAT", required=True)

    p = sub.add_parser("idx", help="MNIST / Fashion-MNIST idx files (gzipped or not)",
                       description="Long-tailed shards from MNIST-style idx files: "
                                   "train-{images-idx3,labels-idx1}-ubyte[.gz] and t10k-... in --src.")
    p.add_argument("--src", required=True, help="folder holding the four idx files")
    p.add_argument("--dataset", choices=("fashion-mnist", "mnist"), default="fashion-mnist",
                   help="names the classes (default fashion-mnist)")
    p.add_argument("--classes", default=None, help="comma-separated class names (overrides --dataset)")
    add_longtail_args(p, n_max=5000, val_per_class=200)
    add_output_args(p)
    p.set_defaults(func=cmd_idx)
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Entry point; returns the ``_info.json`` dict written. User errors exit with a one-line message."""
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        info = args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"make_shards.py {args.command}: error: {e}") from e
    print_summary(info, time.perf_counter() - t0)
    print(f"wrote {os.path.join(args.out, '_info.json')}")
    return info


if __name__ == "__main__":
    main()
