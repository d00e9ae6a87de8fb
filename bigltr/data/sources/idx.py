"""MNIST / Fashion-MNIST idx files -> long-tailed train, balanced val held out of the training set, official test."""
from __future__ import annotations

import gzip
import os
from typing import Optional

import numpy as np

from ..convert import Item
from ..longtail import (CLASS_ORDER_RULE, IDX_SPLIT_RULE, LONGTAIL_FORMULA, class_order, counts_by_class,
                        holdout_and_longtail, longtail_counts, train_order_rule, train_shuffle, warn)
from ..pairs import PAIRS_SPLIT_RULE, draw_pairs, pairs_holdout
from ..writer import sha256_file
from . import SourceData, array_items, require_dir

HELP = "MNIST / Fashion-MNIST idx files (gzipped or not)"
DESCRIPTION = (
    "Long-tailed shards from MNIST-style idx files: train-{images-idx3,labels-idx1}-ubyte[.gz] and t10k-... in --src. "
    "Train: n_c = int(n_max * (1/IF)^(r/(C-1))) images for the class of rank r (label order, or a seeded "
    "permutation with --class-order-seed), after a balanced val split is held out of the official training set; "
    "test: the official t10k set.\n\n"
    "--pairs: C*C classes of ordered pairs of items side by side (28x56 for Fashion-MNIST; class = C*left + right), "
    "CIFAR-100-LT's profile by default (n_max 500, IF 100: 10,847 train images), a balanced val set of pairs of "
    "held-out training items and a balanced test set of pairs of official test items.\n\nExamples:\n"
    "  python tools/make_shards.py idx --src DIR --out data/fmnist_lt\n"
    "  python tools/make_shards.py idx --src DIR --out data/fmnist_lt_perm --class-order-seed 1\n"
    "  python tools/make_shards.py idx --pairs --src DIR --out data/fmnist_pairs_lt")
PAIRS_DEFAULTS = {"n_max": 500, "val_per_class": 20, "test_per_class": 100}  # CIFAR-100-LT's n_max and val size
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


def _class_names(dataset: str, classes: Optional[str]) -> list[str]:
    return classes.split(",") if classes else (FASHION_MNIST_CLASSES if dataset == "fashion-mnist" else MNIST_CLASSES)


def _read_sets(src: str, num_classes: int):
    tr = load_idx_pair(src, "train")
    te = load_idx_pair(src, "t10k")
    for what, lab in (("train", tr[1]), ("t10k", te[1])):
        if lab.size and lab.max() >= num_classes:
            raise ValueError(f"{what} labels reach {int(lab.max())}, but there are only {num_classes} class names")
    return tr, te


def _longtail_record(n_max: int, imbalance: float, counts: list[int], order: np.ndarray,
                     class_order_seed: Optional[int], always: bool) -> dict:
    """``source.longtail``: the profile and, with a class order seed (or ``always``), the order used."""
    rec = {"formula": LONGTAIL_FORMULA, "n_max": n_max, "imbalance": imbalance, "counts": counts}
    if class_order_seed is not None or always:
        rec.update(class_order_seed=class_order_seed, class_order=order.tolist(), class_order_rule=CLASS_ORDER_RULE)
    return rec


def load(src: str, *, dataset: str = "fashion-mnist", classes: Optional[str] = None, n_max: Optional[int] = None,
         imbalance: float = 100.0, val_per_class: Optional[int] = None, seed: int = 0,
         class_order_seed: Optional[int] = None, pairs: bool = False,
         test_per_class: Optional[int] = None) -> SourceData:
    """Train: the LDAM-DRW profile cut from the official training set after a balanced val split (``val_per_class``
    per class, default 200) is held out of it (:func:`bigltr.data.longtail.holdout_and_longtail`); test: the t10k
    set. ``classes``: comma-separated names (default: those of ``dataset``). ``class_order_seed``: which class gets
    which count (:func:`bigltr.data.longtail.class_order`; None: label order, class 0 gets ``n_max``, default
    5000). ``pairs``: the side-by-side pairs dataset instead (:func:`load_pairs`)."""
    if pairs:
        return load_pairs(src, dataset=dataset, classes=classes, n_max=n_max, imbalance=imbalance,
                          val_per_class=val_per_class, test_per_class=test_per_class, seed=seed,
                          class_order_seed=class_order_seed)
    if test_per_class is not None:
        raise ValueError("--test-per-class goes with --pairs (without it the test split is the whole t10k set)")
    n_max = 5000 if n_max is None else n_max
    val_per_class = 200 if val_per_class is None else val_per_class
    require_dir(src)
    names = _class_names(dataset, classes)
    num_classes = len(names)
    order = class_order(num_classes, class_order_seed)
    (tr_images, tr_labels, tr_files, tr_name), (te_images, te_labels, te_files, te_name) = _read_sets(src, num_classes)

    counts = counts_by_class(longtail_counts(n_max, imbalance, num_classes), order)
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
        # without --class-order-seed exactly the earlier layout (byte-identical _info.json)
        "longtail": _longtail_record(n_max, imbalance, counts, order, class_order_seed, always=False),
        "val_per_class": val_per_class,
        "seed": seed,
        "split_rule": IDX_SPLIT_RULE,
        "keys": "train_<index in train-*-ubyte> (train and val), t10k_<index in t10k-*-ubyte> (test)",
    }
    return SourceData(names, splits, source, expected_counts=counts, idx_info_layout=True)


def _pair_items(images: np.ndarray, left: np.ndarray, right: np.ndarray, pair_labels: np.ndarray, order,
                prefix: str, origin: str) -> list[Item]:
    """Items ``<prefix>_<left index>_<right index>``: the two source images side by side (H x 2W), in ``order``."""
    return [Item(f"{prefix}_{int(left[i]):05d}_{int(right[i]):05d}",
                 np.concatenate([images[int(left[i])], images[int(right[i])]], axis=1), int(pair_labels[i]),
                 f"{origin}[{int(left[i])}] + [{int(right[i])}]") for i in order]


def load_pairs(src: str, *, dataset: str = "fashion-mnist", classes: Optional[str] = None,
               n_max: Optional[int] = None, imbalance: float = 100.0, val_per_class: Optional[int] = None,
               test_per_class: Optional[int] = None, seed: int = 0,
               class_order_seed: Optional[int] = None) -> SourceData:
    """The pairs dataset: class ``c = C*left + right`` shows an item of source class ``left`` and one of ``right``
    side by side (two 28x28 images -> 28x56). Train: ``n_c`` pairs per the long-tail profile (default CIFAR-100-LT:
    n_max 500, IF 100 over 100 classes, 10,847 pairs); val: ``val_per_class`` (20) pairs per class of training
    items held out first; test: ``test_per_class`` (100) pairs per class of official test items. Rules:
    :data:`bigltr.data.pairs.PAIRS_SPLIT_RULE`."""
    n_max = PAIRS_DEFAULTS["n_max"] if n_max is None else n_max
    val_per_class = PAIRS_DEFAULTS["val_per_class"] if val_per_class is None else int(val_per_class)
    test_per_class = PAIRS_DEFAULTS["test_per_class"] if test_per_class is None else int(test_per_class)
    if test_per_class < 1:
        raise ValueError(f"--test-per-class must be >= 1, got {test_per_class}")
    require_dir(src)
    base = _class_names(dataset, classes)
    C = len(base)
    names = [f"{a}+{b}" for a in base for b in base]
    (tr_images, tr_labels, tr_files, tr_name), (te_images, te_labels, te_files, te_name) = _read_sets(src, C)
    for what, imgs in (("train", tr_images), ("t10k", te_images)):
        if imgs.shape[1:] != tr_images.shape[1:]:
            raise ValueError(f"{what} images are {imgs.shape[1:]}, train images {tr_images.shape[1:]}: pairs need "
                             f"one image size")

    order = class_order(C * C, class_order_seed)
    counts = counts_by_class(longtail_counts(n_max, imbalance, C * C), order)
    train_items, val_items = pairs_holdout(tr_labels, C, val_per_class, seed)
    drawn = {"train": draw_pairs(tr_labels, train_items, C, counts, [seed, 2]),
             "val": draw_pairs(tr_labels, val_items, C, [val_per_class] * (C * C), [seed, 3]),
             "test": draw_pairs(te_labels, np.arange(te_labels.size), C, [test_per_class] * (C * C), [seed, 4])}
    uses = {s: d[3] for s, d in drawn.items()}
    if uses["train"] > 1:
        warn(f"pairs: the training items of some source class are too few for distinct items: an item appears in "
             f"up to {uses['train']} training pairs (lower --n-max or --val-per-class)")
    left, right, labels, _ = drawn["train"]
    splits = {"train": _pair_items(tr_images, left, right, labels, train_shuffle(left.size, seed), "train", tr_name)}
    if val_per_class:
        left, right, labels, _ = drawn["val"]
        splits["val"] = _pair_items(tr_images, left, right, labels, range(left.size), "train", tr_name)
    else:
        warn("no val split (--val-per-class 0): bigltr's trainer needs train, val and test")
    left, right, labels, _ = drawn["test"]
    splits["test"] = _pair_items(te_images, left, right, labels, range(left.size), "t10k", te_name)
    h, w = tr_images.shape[1:3]
    source = {
        "converter": "tools/make_shards.py idx --pairs",
        "dataset": dataset if not classes else "custom",
        "src": os.path.abspath(src),
        "files_sha256": {**tr_files, **te_files},
        "pairs": {"base_classes": base, "label": f"{C} * left + right", "image_size": [int(h), 2 * int(w)],
                  "image": f"source items side by side: left | right, each {h}x{w}",
                  "source_items": {"train": int(train_items.size), "val": int(val_items.size),
                                   "test": int(te_labels.size)},
                  "max_item_uses": uses},
        "longtail": _longtail_record(n_max, imbalance, counts, order, class_order_seed, always=True),
        "val_per_class": val_per_class,
        "test_per_class": test_per_class,
        "seed": seed,
        "split_rule": PAIRS_SPLIT_RULE,
        "train_order": train_order_rule(seed, "pair-class order"),
        "keys": "train_<left>_<right> (train and val: indices in train-*-ubyte), t10k_<left>_<right> (test: indices "
                "in t10k-*-ubyte)",
    }
    return SourceData(names, splits, source, expected_counts=counts)
