"""MNIST / Fashion-MNIST idx files -> long-tailed train, balanced val held out of the training set, official test."""
from __future__ import annotations

import gzip
import os
from typing import Optional

import numpy as np

from ..longtail import IDX_SPLIT_RULE, LONGTAIL_FORMULA, holdout_and_longtail, longtail_counts, train_shuffle
from ..writer import sha256_file
from . import SourceData, array_items, require_dir

HELP = "MNIST / Fashion-MNIST idx files (gzipped or not)"
DESCRIPTION = ("Long-tailed shards from MNIST-style idx files: "
               "train-{images-idx3,labels-idx1}-ubyte[.gz] and t10k-... in --src.")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
MNIST_CLASSES = [str(d) for d in range(10)]
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


def load_idx_pair(src: str, prefix: str) -> tuple[np.ndarray, np.ndarray, dict, str]:
    """Images, labels (int64), ``{file name: sha256}`` and the image file's name of ``prefix``-*-ubyte[.gz]."""
    img_path = find_idx_file(src, f"{prefix}-images-idx3-ubyte")
    lbl_path = find_idx_file(src, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path, 3), read_idx(lbl_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img_path} holds {images.shape[0]} images but {lbl_path} holds {labels.shape[0]} labels")
    files = {os.path.basename(p): sha256_file(p) for p in (img_path, lbl_path)}
    return images, labels.astype(np.int64), files, os.path.basename(img_path)


def load(src: str, *, dataset: str = "fashion-mnist", classes: Optional[str] = None, n_max: int = 5000,
         imbalance: float = 100.0, val_per_class: int = 200, seed: int = 0) -> SourceData:
    """Train: the LDAM-DRW profile cut from the official training set after a balanced val split (``val_per_class``
    per class) is held out of it (:func:`bigltr.data.longtail.holdout_and_longtail`); test: the t10k set.
    ``classes``: comma-separated names (default: those of ``dataset``)."""
    require_dir(src)
    names = classes.split(",") if classes else (
        FASHION_MNIST_CLASSES if dataset == "fashion-mnist" else MNIST_CLASSES
    )
    num_classes = len(names)
    tr_images, tr_labels, tr_files, tr_name = load_idx_pair(src, "train")
    te_images, te_labels, te_files, te_name = load_idx_pair(src, "t10k")
    for what, lab in (("train", tr_labels), ("t10k", te_labels)):
        if lab.size and lab.max() >= num_classes:
            raise ValueError(f"{what} labels reach {int(lab.max())}, but there are only {num_classes} class names")

    counts = longtail_counts(n_max, imbalance, num_classes)
    train_idx, val_idx = holdout_and_longtail(tr_labels, num_classes, counts, val_per_class, seed)
    # Train shards in a seeded shuffled order (so each shard mixes classes); val/test in file order.
    train_order = train_idx[train_shuffle(train_idx.size, seed)]

    splits = {"train": array_items(tr_images, tr_labels, train_order, "train", tr_name),
              "val": array_items(tr_images, tr_labels, np.sort(val_idx), "train", tr_name),
              "test": array_items(te_images, te_labels, np.arange(te_labels.size), "t10k", te_name)}
    source = {
        "converter": "tools/make_shards.py idx",
        "dataset": dataset if not classes else "custom",
        "src": os.path.abspath(src),
        "files_sha256": {**tr_files, **te_files},
        "longtail": {"formula": LONGTAIL_FORMULA, "n_max": n_max, "imbalance": imbalance, "counts": counts},
        "val_per_class": val_per_class,
        "seed": seed,
        "split_rule": IDX_SPLIT_RULE,
        "keys": "train_<index in train-*-ubyte> (train and val), t10k_<index in t10k-*-ubyte> (test)",
    }
    return SourceData(names, splits, source, expected_counts=counts, legacy_source=True)
